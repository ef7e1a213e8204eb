#!/bin/sh
# edgefleet release pipeline in plain shell: optimize → bench → package → gate → publish with the evidence.
# A failed gate stops the pipeline (exit 1) before anything is published. See docs/ci.md.
#
# Inputs (environment):
#   MODEL      float ONNX model to release (required)
#   POLICY     release policy YAML, see docs/gate.md (required)
#   EDGEFLEET_SERVER     control plane URL: upload the package there with its gate verdict and bench results
#                        (the control plane signs it into its own TUF repository). EDGEFLEET_API_TOKEN: an
#                        operator token for it.
#   REPO       without EDGEFLEET_SERVER: local TUF repository folder to sign into (`edgefleet repo init` if
#              missing; default: $WORK/tuf-repo). EDGEFLEET_REPO_PASSPHRASE, REPO_KEYS: its key passphrase and
#              private-key folder (default: <repo>/keys)
#   NAME, VERSION   package name and semantic version (default: model, 0.1.0)
#   CALIB, EVAL     per-call .npz for optimize; LABELS: key of the labels array in EVAL (optional)
#   SAMPLES    per-call .npz for the package's golden vectors (default: EVAL, else CALIB, else random inputs)
#   REFERENCE  per-call .npz of drift reference data for the package (default: CALIB)
#   TIERS      space-separated tier names to bench on, package for and gate (default: x86-avx2); a tier other
#              than this machine's is benched emulated (the policy needs allow_emulated: true to pass on it)
#   BASELINE   model the candidate must not be slower than (default: MODEL)
#   WORK       folder for the artifacts (default: ./edgefleet-ci)
#   EDGEFLEET  the edgefleet command (default: edgefleet)
#   EDGEFLEET_SKIP_OPTIMIZE=1  release MODEL as it is (no CALIB/EVAL needed); also skipped when CALIB is unset
#   OPTIMIZE_ARGS, BENCH_ARGS, PACKAGE_ARGS  extra flags for those steps (e.g. BENCH_ARGS="--time-budget 5")
#
# Outputs in $WORK: optimize.json, bench.json, NAME-VERSION.efpkg, gate.json (the verdict), gate.xml (JUnit).
set -eu

: "${MODEL:?set MODEL to the ONNX model to release}"
: "${POLICY:?set POLICY to the release policy YAML}"
NAME=${NAME:-model}
VERSION=${VERSION:-0.1.0}
TIERS=${TIERS:-x86-avx2}
BASELINE=${BASELINE:-$MODEL}
WORK=${WORK:-edgefleet-ci}
REPO=${REPO:-$WORK/tuf-repo}
SAMPLES=${SAMPLES:-${EVAL:-${CALIB:-}}}
REFERENCE=${REFERENCE:-${CALIB:-}}
EF=${EDGEFLEET:-edgefleet}
mkdir -p "$WORK"

step() { printf '\n== %s\n' "$*"; }

# 1. optimize
OPT_REPORT=""
if [ "${EDGEFLEET_SKIP_OPTIMIZE:-0}" = "1" ] || [ -z "${CALIB:-}" ]; then
    step "optimize: skipped, releasing $MODEL as it is"
    CANDIDATE=$MODEL
else
    step "optimize $MODEL"
    CANDIDATE=$WORK/candidate.onnx
    OPT_REPORT=$WORK/optimize.json
    # shellcheck disable=SC2086
    $EF optimize "$MODEL" --calib "$CALIB" --eval "${EVAL:?set EVAL with CALIB}" -o "$CANDIDATE" \
        --report "$OPT_REPORT" ${LABELS:+--labels "$LABELS"} ${OPTIMIZE_ARGS:-}
fi

# 2. bench on every target tier, paired against the baseline
TIER_FLAGS=""
for t in $TIERS; do TIER_FLAGS="$TIER_FLAGS --tier $t"; done
step "bench $CANDIDATE on $TIERS"
# shellcheck disable=SC2086
$EF bench "$CANDIDATE" $TIER_FLAGS --baseline "$BASELINE" -o "$WORK/bench.json" ${BENCH_ARGS:-}

# 3. package, with its lineage (optimize report) and metrics (bench results) in the manifest
PKG=$WORK/$NAME-$VERSION.efpkg
step "package $PKG"
# shellcheck disable=SC2086
$EF package "$CANDIDATE" -o "$PKG" --name "$NAME" --version "$VERSION" $TIER_FLAGS \
    ${SAMPLES:+--samples "$SAMPLES"} ${REFERENCE:+--reference "$REFERENCE"} \
    ${OPT_REPORT:+--optimize-report "$OPT_REPORT"} --bench "$WORK/bench.json" ${PACKAGE_ARGS:-}

# 4. gate: exit 1 = failed (stop here, publish nothing), 2 = usage error
step "gate $PKG against $POLICY"
status=0
$EF gate --policy "$POLICY" --bench "$WORK/bench.json" ${OPT_REPORT:+--optimize-report "$OPT_REPORT"} \
    --package "$PKG" --junit "$WORK/gate.xml" --json >"$WORK/gate.json" || status=$?
if [ "$status" -ne 0 ]; then
    echo "gate did not pass (exit $status): not publishing $PKG; see $WORK/gate.json and $WORK/gate.xml" >&2
    exit "$status"
fi

# 5. publish with the evidence: the control plane rolls out only a version whose passing verdict names its package
if [ -n "${EDGEFLEET_SERVER:-}" ]; then
    step "publish $PKG to $EDGEFLEET_SERVER"
    $EF publish "$PKG" --server "$EDGEFLEET_SERVER" --gate "$WORK/gate.json" --bench "$WORK/bench.json"
else
    step "publish $PKG to $REPO"
    [ -f "$REPO/metadata/root.json" ] || $EF repo init "$REPO" ${REPO_KEYS:+--keys "$REPO_KEYS"} --json >/dev/null
    $EF publish "$PKG" --repo "$REPO" ${REPO_KEYS:+--keys "$REPO_KEYS"}
fi
echo "released $NAME $VERSION"
