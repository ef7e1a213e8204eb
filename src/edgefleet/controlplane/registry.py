"""The model registry: models, versions, lineage, gate verdicts and bench results attached to a version, channels
(``dev → canary → stable``), promotion, and the release policy that decides which versions may be promoted or
rolled out (ADR 0096).

The release decision itself (:func:`release_refusal`) is a pure function over a version's evidence record and the
effective policy; the rest of this module reads and writes them."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.controlplane import audit, compat
from edgefleet.controlplane.db import ModelVersion, ReleasePolicyRow, utcnow
from edgefleet.errors import ConflictError, NotFoundError, UsageError
from edgefleet.package.manifest import Manifest
from edgefleet.telemetry.drift import DriftReference

__all__ = [
    "CHANNELS",
    "DEFAULT_POLICY",
    "GLOBAL_SCOPE",
    "ReleasePolicy",
    "attach_bench",
    "attach_gate",
    "clear_policy",
    "effective_policy",
    "get_version",
    "list_models",
    "manifest_of",
    "policy_doc",
    "promote",
    "register_version",
    "release_refusal",
    "release_refusal_of",
    "release_status",
    "set_policy",
    "version_dict",
]

CHANNELS = ("dev", "canary", "stable")


def version_dict(mv: ModelVersion, *, full: bool = False) -> dict[str, Any]:
    d: dict[str, Any] = {
        "model": mv.model,
        "version": mv.version,
        "channel": mv.channel,
        "target": mv.target,
        "package_sha256": mv.package_sha256,
        "model_sha256": mv.model_sha256,
        "length": mv.length,
        "requirements": mv.requirements,
        "lineage": mv.lineage,
        "gate": (mv.gate or {}).get("verdict", (mv.gate or {}).get("passed")) if not full else mv.gate,
        "created_at": mv.created_at.isoformat(),
    }
    if full:
        d["evidence"] = mv.evidence
    d["drift_features"] = (
        None if mv.drift_reference is None else [f.get("name") for f in mv.drift_reference.get("features", [])]
    )
    if full:
        d["bench"] = mv.bench
        d["manifest"] = mv.manifest
    return d


def register_version(
    s: Session,
    manifest: Manifest,
    *,
    target: str,
    package_sha256: str,
    length: int,
    reference: DriftReference | None = None,
) -> ModelVersion:
    """Add a published package; re-publishing the identical package is a no-op, a different one a conflict.

    The package's drift reference (``reference.json``) is kept with the version: the fleet's merged per-bin counts
    are scored against it on the server."""
    existing = s.scalar(
        select(ModelVersion).where(ModelVersion.model == manifest.name, ModelVersion.version == manifest.version)
    )
    if existing is not None:
        if existing.package_sha256 == package_sha256:
            if existing.drift_reference is None and reference is not None:
                existing.drift_reference = reference.model_dump(mode="json")  # registered before it was kept
            return existing
        raise ConflictError(
            f"{manifest.name} {manifest.version} is already registered with another package; bump the version"
        )
    mv = ModelVersion(
        model=manifest.name,
        version=manifest.version,
        target=manifest.target_name,
        package_sha256=package_sha256,
        model_sha256=manifest.model_sha256,
        length=length,
        channel="dev",
        requirements=manifest.requirements.model_dump(mode="json"),
        lineage=manifest.lineage.model_dump(mode="json"),
        manifest=manifest.model_dump(mode="json"),
        drift_reference=None if reference is None else reference.model_dump(mode="json"),
    )
    s.add(mv)
    s.flush()
    return mv


def get_version(s: Session, model: str, version: str) -> ModelVersion:
    mv = s.scalar(select(ModelVersion).where(ModelVersion.model == model, ModelVersion.version == version))
    if mv is None:
        raise NotFoundError(f"no version {version} of model {model}: publish it with `edgefleet publish --server`")
    return mv


def manifest_of(mv: ModelVersion) -> Manifest | None:
    try:
        return Manifest.model_validate(mv.manifest)
    except ValueError:
        return None


def list_models(s: Session, name: str | None = None) -> list[dict[str, Any]]:
    q = select(ModelVersion).order_by(ModelVersion.model, ModelVersion.created_at)
    if name is not None:
        q = q.where(ModelVersion.model == name)
    out: dict[str, dict[str, Any]] = {}
    for mv in s.scalars(q):
        m = out.setdefault(mv.model, {"model": mv.model, "versions": [], "channels": {}})
        m["versions"].append(version_dict(mv))
        m["channels"][mv.channel] = mv.version  # the newest version in each channel
    if name is not None and not out:
        raise NotFoundError(f"no model named {name}")
    return list(out.values())


def promote(s: Session, mv: ModelVersion, to: str | None = None) -> tuple[str, str]:
    """One step along the channels, or to ``to``; never backwards (demote by promoting another version). The
    caller checks the release policy first (:func:`release_refusal_of`)."""
    if mv.channel not in CHANNELS:
        raise ConflictError(f"{mv.model} {mv.version} is in unknown channel {mv.channel}")
    cur = CHANNELS.index(mv.channel)
    if to is None:
        if cur == len(CHANNELS) - 1:
            raise ConflictError(f"{mv.model} {mv.version} is already in {mv.channel}")
        new = CHANNELS[cur + 1]
    else:
        if to not in CHANNELS:
            raise UsageError(f"unknown channel {to!r}; channels are {', '.join(CHANNELS)}")
        if CHANNELS.index(to) <= cur:
            raise ConflictError(f"{mv.model} {mv.version} is already in {mv.channel}; promotion only moves forward")
        new = to
    old, mv.channel = mv.channel, new
    return old, new


# ------------------------------------------------------------------------------------------------ evidence

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _short(sha: str) -> str:
    return f"{sha[:12]}…"


def _named_sha(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256.match(value.lower()):
        raise UsageError(f"{what} must be a SHA-256: 64 hex characters")
    return value.lower()


def attach_gate(
    s: Session, mv: ModelVersion, verdict: dict[str, Any], *, package_sha256: str | None, actor: str
) -> dict[str, Any]:
    """Keep a gate verdict with the package hash it judged: the verdict's own ``package_sha256``, else the one the
    request names. Evidence for another package is refused; a verdict that names none is kept and shown, and can
    block a release (when it failed) but never let one through."""
    passed = verdict.get("passed")
    if not isinstance(passed, bool):
        raise UsageError(
            "not a gate verdict: it has no true/false 'passed'; attach the JSON that `edgefleet gate --json` prints"
        )
    own = _named_sha(verdict.get("package_sha256"), "the verdict's package_sha256")
    given = _named_sha(package_sha256, "package_sha256")
    if own and given and own != given:
        raise ConflictError(
            f"the gate verdict judged package sha256 {_short(own)}, not the package sha256 {_short(given)} it was "
            "sent with"
        )
    judged = own or given
    if judged is not None and judged != mv.package_sha256:
        raise ConflictError(
            f"the gate verdict is for package sha256 {_short(judged)}, but {mv.model} {mv.version} is package "
            f"sha256 {_short(mv.package_sha256)}: attach the verdict of this version's package"
        )
    status, reason = verdict.get("status"), verdict.get("reason")
    record = {
        "package_sha256": judged,
        "passed": passed,
        "status": status if isinstance(status, str) else None,
        "reason": reason[:500] if isinstance(reason, str) else None,
        "at": utcnow().isoformat(),
        "by": actor,
    }
    ev = dict(mv.evidence or {})  # a new dict: the JSON column does not track changes made in place
    ev["gate"] = record
    if judged is not None:
        ev["gate_bound"] = record
    mv.evidence = ev
    mv.gate = verdict
    return record


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [x for x in value if isinstance(x, dict)] if isinstance(value, list) else []


def _bench_match(mv: ModelVersion, entry: dict[str, Any]) -> bool | None:
    """Whether a bench result (or compat entry) measured this version: True when every hash it names is this
    version's, False when one is another's, None when it names none."""
    named = [("model_sha256", entry.get("model_sha256")), ("package_sha256", entry.get("package_sha256"))]
    inner = entry.get("compat")
    if isinstance(inner, dict):
        named.append(("model_sha256", inner.get("model_sha256")))
    mine = {"model_sha256": mv.model_sha256, "package_sha256": mv.package_sha256}
    seen = [v == mine[k] for k, v in named if v is not None]
    return all(seen) if seen else None


def attach_bench(s: Session, mv: ModelVersion, bench: dict[str, Any], *, actor: str) -> int:
    """Keep a bench report; its results for this version's model (by hash) feed the compatibility matrix. A report
    whose every result names another model or package is refused; results of other models (a baseline benched
    alongside) are kept in the document but count for nothing. Returns how many compat entries were recorded."""
    results, entries = _dicts(bench.get("results")), _dicts(bench.get("compat"))
    if not results and not entries:
        raise UsageError("not a bench report: it has no results; attach the BENCH.json that `edgefleet bench` wrote")
    r_match = [_bench_match(mv, r) for r in results]
    c_match = [_bench_match(mv, c) for c in entries]
    named = [m for m in r_match + c_match if m is not None]
    if named and not any(named):
        raise ConflictError(
            f"the bench report measured other models: none of its results is for {mv.model} {mv.version} (model "
            f"sha256 {_short(mv.model_sha256)}); bench this version's package or its model"
        )
    kept = {
        "results": [r for r, m in zip(results, r_match, strict=True) if m is not False],
        "compat": [c for c in entries if _bench_match(mv, c) is not False],
    }
    n = compat.record_bench(s, mv.model, mv.version, kept)
    mine = [r for r, m in zip(results, r_match, strict=True) if m]
    ev = dict(mv.evidence or {})
    ev["bench"] = {
        "bound": any(named),
        "model_sha256": mv.model_sha256 if any(named) else None,
        "results": len(mine),
        "other_results": named.count(False),
        "tiers": sorted({str(r.get("tier")) for r in mine if r.get("tier")}),
        "at": utcnow().isoformat(),
        "by": actor,
    }
    mv.evidence = ev
    mv.bench = bench
    return n


# ------------------------------------------------------------------------------------------------ release policy

GLOBAL_SCOPE = "*"  # never a model name: names are lower-case letters, digits, '.', '_' and '-'


@dataclass(frozen=True)
class ReleasePolicy:
    """What a version needs before it is promoted or rolled out. A failing gate verdict blocks whatever this says."""

    require_gate: bool = True  # a passing gate verdict that names the version's package SHA-256
    require_bench: bool = False  # bench results for the version's model


DEFAULT_POLICY = ReleasePolicy()
_FIELDS = ("require_gate", "require_bench")


def release_refusal(
    model: str,
    version: str,
    package_sha256: str,
    evidence: dict[str, Any] | None,
    gate: dict[str, Any] | None,
    policy: ReleasePolicy,
) -> str | None:
    """Pure: why ``model version`` may not be promoted or rolled out, or None when it may. ``gate`` is the stored
    verdict (read when the evidence record predates it, as for versions registered before release policies)."""
    ev = evidence or {}
    what = f"{model} {version}"
    latest, bound = ev.get("gate"), ev.get("gate_bound")
    if latest is None and gate is not None and isinstance(gate.get("passed"), bool):
        latest = {"package_sha256": None, "passed": gate["passed"], "reason": gate.get("reason")}
    override = "or pass --force --reason WHY"
    attach = f"attach one with `edgefleet models attach {model} {version} --gate gate.json` {override}"
    # failing evidence counts whether or not it names the package: it can only make a release safer
    for v in (latest, bound):
        if v is not None and v.get("passed") is False:
            why = v.get("reason") or v.get("status") or "no reason given"
            return f"{what} failed its gate ({why}); attach a passing verdict for its package {override}"
    good = bound is not None and bound.get("package_sha256") == package_sha256 and bound.get("passed") is True
    if policy.require_gate and not good:
        why = "none is attached" if latest is None else "the attached verdict names no package"
        return f"{what} has no passing gate verdict for package sha256 {_short(package_sha256)} ({why}); {attach}"
    bench = ev.get("bench")
    if policy.require_bench and not (bench and bench.get("bound")):
        return (
            f"{what} has no bench results for its model (the release policy requires them); attach them with "
            f"`edgefleet models attach {model} {version} --bench bench.json` {override}"
        )
    return None


def effective_policy(s: Session, model: str | None) -> tuple[ReleasePolicy, dict[str, str]]:
    """The policy for ``model`` (None: the global one) and where each field comes from: default, global, model."""
    scopes = [GLOBAL_SCOPE] if model is None else [GLOBAL_SCOPE, model]
    rows = {r.scope: r for r in s.scalars(select(ReleasePolicyRow).where(ReleasePolicyRow.scope.in_(scopes)))}
    values: dict[str, bool] = {}
    source: dict[str, str] = {}
    for f in _FIELDS:
        values[f], source[f] = getattr(DEFAULT_POLICY, f), "default"
        for scope, name in ((GLOBAL_SCOPE, "global"), (model, "model")):
            row = rows.get(scope) if scope is not None else None
            value = getattr(row, f) if row is not None else None
            if value is not None:
                values[f], source[f] = value, name
    return ReleasePolicy(**values), source


def release_refusal_of(s: Session, mv: ModelVersion) -> str | None:
    """:func:`release_refusal` of a stored version under the policy that applies to its model."""
    policy, _ = effective_policy(s, mv.model)
    return release_refusal(mv.model, mv.version, mv.package_sha256, mv.evidence, mv.gate, policy)


def _row_dict(row: ReleasePolicyRow) -> dict[str, Any]:
    return {
        **{f: getattr(row, f) for f in _FIELDS},
        "updated_by": row.updated_by,
        "updated_at": row.updated_at.isoformat(),
    }


def policy_doc(s: Session, model: str | None = None) -> dict[str, Any]:
    """The effective policy (of ``model``, else the global one), the built-in default, and every override."""
    policy, source = effective_policy(s, model)
    rows = list(s.scalars(select(ReleasePolicyRow).order_by(ReleasePolicyRow.scope)))
    out: dict[str, Any] = {
        "model": model,
        "effective": asdict(policy),
        "source": source,
        "default": asdict(DEFAULT_POLICY),
        "global": next((_row_dict(r) for r in rows if r.scope == GLOBAL_SCOPE), None),
        "models": {r.scope: _row_dict(r) for r in rows if r.scope != GLOBAL_SCOPE},
    }
    return out


def set_policy(s: Session, scope: str, changes: dict[str, bool | None], *, actor: str) -> None:
    """Set fields of the global policy (``GLOBAL_SCOPE``) or of a model's override; None means inherit."""
    unknown = set(changes) - set(_FIELDS)
    if unknown:
        raise UsageError(f"unknown release policy field(s): {', '.join(sorted(unknown))}")
    row = s.get(ReleasePolicyRow, scope)
    if row is None:
        row = ReleasePolicyRow(scope=scope)
        s.add(row)
    for f, v in changes.items():
        setattr(row, f, v)
    row.updated_by, row.updated_at = actor, utcnow()
    s.flush()


def clear_policy(s: Session, model: str) -> bool:
    """Drop a model's override (it follows the global policy again); False when it had none."""
    row = s.get(ReleasePolicyRow, model)
    if row is None:
        return False
    s.delete(row)
    s.flush()
    return True


def release_status(s: Session, mv: ModelVersion) -> dict[str, Any]:
    """The version's evidence chain as the API and the dashboard show it: the policy that applies, whether the
    version may be released and why not, its gate and bench evidence, and every forced override."""
    policy, source = effective_policy(s, mv.model)
    refusal = release_refusal(mv.model, mv.version, mv.package_sha256, mv.evidence, mv.gate, policy)
    ev = mv.evidence or {}
    gate, bound = ev.get("gate"), ev.get("gate_bound")
    if gate is None and mv.gate is not None:
        gate = {"package_sha256": None, "passed": mv.gate.get("passed"), "status": mv.gate.get("status")}
    overrides = audit.list_entries(s, limit=50, action="release.override", target=f"{mv.model}:{mv.version}")
    return {
        "allowed": refusal is None,
        "refusal": refusal,
        "policy": asdict(policy),
        "policy_source": source,
        "package_sha256": mv.package_sha256,
        "gate": gate,
        "gate_bound": bound,
        "gate_matches_package": bool(bound and bound.get("package_sha256") == mv.package_sha256),
        "bench": ev.get("bench") or ({"bound": False, "results": None} if mv.bench is not None else None),
        "overrides": [
            {k: o[k] for k in ("at", "actor")} | {k: o["detail"].get(k) for k in ("overrode", "reason")}
            for o in overrides
        ],
    }
