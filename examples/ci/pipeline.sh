#!/bin/sh
# edgefleet release pipeline in plain shell: optimize → bench → package → gate → publish.
# A failed gate stops the pipeline (exit 1) before anything is published.
#
# Inputs (environment):
#   MODEL      float ONNX model to release (required)
#   POLICY     release policy YAML, see docs/gate.md (required)
#   REPO       TUF repository folder to publish into (created with `edgefleet repo init` if missing; required)
#   NAME, VERSION   package name and semantic version (default: model, 0.1.0)
#   CALIB, EVAL     per-call .npz for optimize; LABELS: key of the labels array in EVAL (optional)
#   TIERS      space-separated tier names or tier YAML files to bench on (default: x86-avx2)
#   BASELINE   model the candidate must not be slower than (default: MODEL)
#   WORK       folder for the artifacts (default: ./edgefleet-ci)
#   EDGEFLEET  the edgefleet command (default: edgefleet)
#   EDGEFLEET_SKIP_OPTIMIZE=1  release MODEL as it is (no CALIB/EVAL needed); also skipped when CALIB is unset
#   OPTIMIZE_ARGS, BENCH_ARGS, PACKAGE_ARGS  extra flags for those steps
set -eu

: "${MODEL:?set MODEL to the ONNX model to release}"
: "${POLICY:?set POLICY to the release policy YAML}"
: "${REPO:?set REPO to the TUF repository folder}"
NAME=${NAME:-model}
VERSION=${VERSION:-0.1.0}
TIERS=${TIERS:-x86-avx2}
BASELINE=${BASELINE:-$MODEL}
WORK=${WORK:-edgefleet-ci}
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
step "bench $CANDIDATE on $TIERS"
TIER_FLAGS=""
for t in $TIERS; do TIER_FLAGS="$TIER_FLAGS --tier $t"; done
# shellcheck disable=SC2086
$EF bench "$CANDIDATE" $TIER_FLAGS --baseline "$BASELINE" -o "$WORK/bench.json" ${BENCH_ARGS:-}

# 3. package
PKG=$WORK/$NAME-$VERSION.efpkg
step "package $PKG"
# shellcheck disable=SC2086
$EF package "$CANDIDATE" -o "$PKG" --name "$NAME" --version "$VERSION" ${PACKAGE_ARGS:-}

# 4. gate: exit 1 = failed (stop here, publish nothing), 2 = usage error
step "gate $PKG against $POLICY"
status=0
$EF gate --policy "$POLICY" --bench "$WORK/bench.json" ${OPT_REPORT:+--optimize-report "$OPT_REPORT"} \
    --package "$PKG" --junit "$WORK/gate.xml" || status=$?
if [ "$status" -ne 0 ]; then
    echo "gate did not pass (exit $status): not publishing $PKG; see $WORK/gate.xml" >&2
    exit "$status"
fi

# 5. publish
step "publish $PKG to $REPO"
[ -d "$REPO/metadata" ] || $EF repo init "$REPO" --json >/dev/null
$EF publish "$PKG" --repo "$REPO"
echo "released $NAME $VERSION"
