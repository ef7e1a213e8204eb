"""The gate's checks: pure functions over evidence (bench report, optimize report, package facts), no I/O.

Each returns :class:`CheckResult` values with a status — ``pass``, ``fail`` or ``inconclusive`` (not enough
evidence to decide, e.g. too few latency samples, or a confidence interval that straddles the limit) — and a
reason a person can act on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from edgefleet.bench.env import Environment, emulation_of
from edgefleet.bench.report import BenchReport, ModelResult
from edgefleet.bench.tiers import TierProfile
from edgefleet.gate.policy import GatePolicy

__all__ = [
    "CheckResult",
    "PackageFacts",
    "Status",
    "accuracy_checks",
    "cold_start_checks",
    "compat_checks",
    "label_emulated",
    "latency_checks",
    "max_opset",
    "memory_checks",
    "package_checks",
    "regression_checks",
    "run_checks",
    "size_checks",
]

# ``skipped``: not run, because optional evidence was not given (no production report); it neither passes nor
# blocks the gate, unlike ``inconclusive``, which blocks unless the policy allows it.
Status = Literal["pass", "fail", "inconclusive", "skipped"]

# Highest default-domain opset each onnxruntime release implements (onnxruntime's compatibility table); releases
# between two rows get the lower row's value, which errs towards refusing.
_ORT_MAX_OPSET = {
    (1, 14): 18,
    (1, 15): 19,
    (1, 16): 19,
    (1, 17): 20,
    (1, 18): 21,
    (1, 19): 21,
    (1, 20): 21,
    (1, 21): 22,
    (1, 22): 23,
    # the pinned release, read from its kernel registry (tests/test_gate_checks.py keeps this row honest)
    (1, 32): 28,
}


class CheckResult(BaseModel):
    name: str
    status: Status
    reason: str
    tier: str | None = None
    measured: float | None = None
    limit: float | None = None


@dataclass(frozen=True)
class PackageFacts:
    """What the gate learned by opening the package (collected by ``gate.verdict``, judged here)."""

    path: str
    size_bytes: int
    model_sha256: str | None = None
    manifest: Any = None  # edgefleet.package.Manifest when it parsed
    open_error: str | None = None
    golden_error: str | None = None
    golden_checked: bool = False
    bom: Mapping[str, Any] | None = None
    requirement_reasons: dict[str, list[str]] = field(default_factory=dict)  # tier → reasons (empty = fits)


def max_opset(runtime_version: str) -> int:
    """Highest ONNX opset a given onnxruntime version runs (newer releases than the table: its last entry)."""
    parts = [int(p) for p in runtime_version.split(".")[:2] if p.isdigit()]
    key = [*parts, 0, 0][:2]
    known = sorted(_ORT_MAX_OPSET)
    if tuple(key) < known[0]:
        return 17
    best = max(k for k in known if k <= tuple(key))
    return _ORT_MAX_OPSET[best]


def _label(r: ModelResult, multi: bool) -> str:
    return f"{Path(r.model).name}@{r.tier}" if multi else r.tier


def _for_tiers(results: Sequence[ModelResult], tiers: Sequence[str]) -> list[tuple[str, ModelResult | None, bool]]:
    """(tier, result) pairs for every target tier; ``None`` where the bench has no result for it."""
    multi = len({r.model_sha256 for r in results}) > 1
    out: list[tuple[str, ModelResult | None, bool]] = []
    for t in tiers:
        matching = [r for r in results if r.tier == t]
        if not matching:
            out.append((t, None, multi))
        out.extend((t, r, multi) for r in matching)
    return out


def _missing(name: str, tier: str) -> CheckResult:
    return CheckResult(
        name=f"{name}[{tier}]",
        status="fail",
        tier=tier,
        reason=f"the bench report has no result for tier {tier}; run `edgefleet bench --tier {tier}`",
    )


def _failed(name: str, label: str, r: ModelResult) -> CheckResult:
    return CheckResult(name=f"{name}[{label}]", status="fail", tier=r.tier, reason=f"bench failed: {r.error}")


def label_emulated(results: Sequence[ModelResult], env: Environment) -> list[ModelResult]:
    """The results with ``emulated`` set wherever the report's host is not the tier's hardware, whatever the
    report itself says: a report written before hosts were compared, or edited by hand, is judged the same."""
    out = []
    for r in results:
        because = emulation_of(env, r.tier_profile)
        if because is not None and not r.emulated:
            r = r.model_copy(update={"emulated": True, "emulated_because": because})
        out.append(r)
    return out


def _emulated(name: str, label: str, r: ModelResult, **extra: Any) -> CheckResult:
    return CheckResult(
        name=f"{name}[{label}]",
        status="inconclusive",
        tier=r.tier,
        reason=f"emulated ({r.emulated_because or 'the host is not the tier hardware'}): measure on a device of "
        f"tier {r.tier}, or set allow_emulated: true in the policy",
        **extra,
    )


# --- accuracy -------------------------------------------------------------------------------------------------


def _metrics(report: Mapping[str, Any], *path: str) -> Mapping[str, Any] | None:
    node: Any = report
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, Mapping) else None


def _overall(m: Mapping[str, Any]) -> float | None:
    # optimize's MetricValues: {"metric", "overall", "per_slice", "fidelity"}; a bare {"accuracy": x} works too.
    for key in ("overall", "accuracy", "top1"):
        v = m.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
    return None


def _slices(m: Mapping[str, Any]) -> dict[str, float]:
    raw = m.get("per_slice") or m.get("slices") or {}
    out: dict[str, float] = {}
    if isinstance(raw, Mapping):
        for k, v in raw.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[str(k)] = float(v)
            elif isinstance(v, Mapping) and _overall(v) is not None:
                out[str(k)] = float(_overall(v))  # type: ignore[arg-type]
    return out


def accuracy_checks(policy: GatePolicy, optimize_report: Mapping[str, Any] | None) -> list[CheckResult]:
    acc = policy.accuracy
    if acc is None:
        return []
    wanted = [("accuracy.drop", acc.max_drop), ("accuracy.worst_slice", acc.max_slice_drop)]
    wanted = [(n, lim) for n, lim in wanted if lim is not None]
    if optimize_report is None:
        return [
            CheckResult(name=n, status="inconclusive", reason="no optimize report given (--optimize-report)", limit=lim)
            for n, lim in wanted
        ]
    base = _metrics(optimize_report, "baseline_metrics")
    chosen = _metrics(optimize_report, "chosen", "metrics")
    out: list[CheckResult] = []
    for name, limit in wanted:
        assert limit is not None
        if base is None or chosen is None:
            out.append(
                CheckResult(
                    name=name,
                    status="inconclusive",
                    reason="the optimize report lacks baseline_metrics or chosen.metrics",
                    limit=limit,
                )
            )
            continue
        if name == "accuracy.drop":
            b, c = _overall(base), _overall(chosen)
            if b is None or c is None:
                out.append(
                    CheckResult(name=name, status="inconclusive", reason="no overall metric in the report", limit=limit)
                )
                continue
            drop = b - c
            ok = drop <= limit + 1e-12
            verb = "within" if ok else "exceeds"
            out.append(
                CheckResult(
                    name=name,
                    status="pass" if ok else "fail",
                    reason=f"metric {b:.4f} → {c:.4f}: drop {drop:.4f} {verb} the {limit} allowed",
                    measured=drop,
                    limit=limit,
                )
            )
        else:
            bs, cs = _slices(base), _slices(chosen)
            common = sorted(set(bs) & set(cs))
            if not common:
                out.append(
                    CheckResult(
                        name=name,
                        status="inconclusive",
                        reason="the optimize report has no per-slice metrics (give eval data with labels or slices)",
                        limit=limit,
                    )
                )
                continue
            worst = max(common, key=lambda k: bs[k] - cs[k])
            drop = bs[worst] - cs[worst]
            ok = drop <= limit + 1e-12
            verb = "within" if ok else "exceeds"
            out.append(
                CheckResult(
                    name=name,
                    status="pass" if ok else "fail",
                    reason=f"worst of {len(common)} slices is {worst!r}: {bs[worst]:.4f} → {cs[worst]:.4f}, "
                    f"drop {drop:.4f} {verb} the {limit} allowed",
                    measured=drop,
                    limit=limit,
                )
            )
    return out


# --- latency, regression, memory, cold start ------------------------------------------------------------------


def latency_checks(policy: GatePolicy, results: Sequence[ModelResult]) -> list[CheckResult]:
    lat = policy.latency
    if lat is None:
        return []
    out: list[CheckResult] = []
    for tier, r, multi in _for_tiers(results, list(lat.p95_ms)):
        limit = lat.p95_ms[tier]
        if r is None:
            out.append(_missing("latency.p95", tier))
            continue
        label = _label(r, multi)
        name = f"latency.p95[{label}]"
        if r.status != "ok" or r.latency is None:
            out.append(_failed("latency.p95", label, r))
            continue
        q = r.latency.quantile(0.95)
        if r.emulated and not policy.allow_emulated:
            # this host's latency says little about the tier's: another architecture or instruction set
            out.append(_emulated("latency.p95", label, r, limit=limit, measured=q.value_ms if q else None))
            continue
        common: dict[str, Any] = {"name": name, "tier": tier, "limit": limit}
        if q is None or q.value_ms is None or q.n < lat.min_samples:
            n = 0 if q is None else q.n
            out.append(
                CheckResult(status="inconclusive", reason=f"{n} samples < the {lat.min_samples} required", **common)
            )
            continue
        common["measured"] = q.value_ms
        if q.ci_low_ms is None or q.ci_high_ms is None:
            reason = f"p95 {q.value_ms:.3f} ms has no confidence interval at {q.n} samples"
            out.append(CheckResult(status="inconclusive", reason=reason, **common))
        elif q.ci_low_ms > limit:
            reason = f"p95 {q.value_ms:.3f} ms (CI {q.ci_low_ms:.3f}–{q.ci_high_ms:.3f}) over the {limit} ms budget"
            out.append(CheckResult(status="fail", reason=reason, **common))
        elif q.ci_high_ms <= limit:
            reason = f"p95 {q.value_ms:.3f} ms (CI {q.ci_low_ms:.3f}–{q.ci_high_ms:.3f}) within the {limit} ms budget"
            out.append(CheckResult(status="pass", reason=reason, **common))
        else:
            reason = (
                f"p95 {q.value_ms:.3f} ms: its CI {q.ci_low_ms:.3f}–{q.ci_high_ms:.3f} straddles the {limit} ms "
                "budget; bench longer (--time-budget)"
            )
            out.append(CheckResult(status="inconclusive", reason=reason, **common))
    return out


def regression_checks(policy: GatePolicy, results: Sequence[ModelResult], tiers: Sequence[str]) -> list[CheckResult]:
    reg = policy.regression
    if reg is None:
        return []
    out: list[CheckResult] = []
    limit = 1 + reg.max_slowdown
    for tier, r, multi in _for_tiers(results, tiers):
        if r is None:
            out.append(_missing("regression", tier))
            continue
        label = _label(r, multi)
        name = f"regression[{label}]"
        c = r.comparison
        if r.status != "ok":
            out.append(_failed("regression", label, r))
        elif c is None:
            out.append(
                CheckResult(
                    name=name, status="inconclusive", tier=tier, limit=limit, reason="bench ran without --baseline"
                )
            )
        elif c.median_ratio is None or c.ci_low is None or c.ci_high is None:
            out.append(CheckResult(name=name, status="inconclusive", tier=tier, limit=limit, reason=c.reason))
        else:
            ci = f"median ratio {c.median_ratio:.3f} (CI {c.ci_low:.3f}–{c.ci_high:.3f}, {c.n_pairs} pairs)"
            slower = c.ci_low > limit
            why = f"slower: lower bound above {limit:.2f}" if slower else f"no practical slowdown beyond {limit:.2f}"
            out.append(
                CheckResult(
                    name=name,
                    status="fail" if slower else "pass",
                    tier=tier,
                    measured=c.median_ratio,
                    limit=limit,
                    reason=f"{ci} vs {Path(c.baseline).name}: {why}",
                )
            )
    return out


def memory_checks(
    policy: GatePolicy, results: Sequence[ModelResult], tiers: Mapping[str, TierProfile]
) -> list[CheckResult]:
    mem = policy.memory
    if mem is None:
        return []
    out: list[CheckResult] = []
    for tier, r, multi in _for_tiers(results, list(tiers)):
        if r is None:
            out.append(_missing("memory.peak_rss", tier))
            continue
        label = _label(r, multi)
        limits = [float(tiers[tier].memory_mb)] + ([mem.max_peak_rss_mb] if mem.max_peak_rss_mb else [])
        limit = min(limits)
        name = f"memory.peak_rss[{label}]"
        if r.peak_rss_mb is None:
            out.append(_failed("memory.peak_rss", label, r))
            continue
        ok = r.status == "ok" and r.peak_rss_mb <= limit
        reason = f"peak RSS {r.peak_rss_mb:.0f} MB {'within' if ok else 'exceeds'} {limit:.0f} MB"
        if r.status != "ok":
            reason = f"bench failed: {r.error}"
        out.append(
            CheckResult(
                name=name,
                status="pass" if ok else "fail",
                tier=tier,
                measured=r.peak_rss_mb,
                limit=limit,
                reason=reason,
            )
        )
    return out


def cold_start_checks(policy: GatePolicy, results: Sequence[ModelResult], tiers: Sequence[str]) -> list[CheckResult]:
    cs = policy.cold_start
    if cs is None:
        return []
    out: list[CheckResult] = []
    for tier, r, multi in _for_tiers(results, tiers):
        if r is None:
            out.append(_missing("cold_start", tier))
            continue
        label = _label(r, multi)
        if r.cold_start_ms is None:
            out.append(_failed("cold_start", label, r))
            continue
        ok = r.cold_start_ms <= cs.max_ms
        out.append(
            CheckResult(
                name=f"cold_start[{label}]",
                status="pass" if ok else "fail",
                tier=tier,
                measured=r.cold_start_ms,
                limit=cs.max_ms,
                reason=f"cold start {r.cold_start_ms:.1f} ms {'within' if ok else 'exceeds'} {cs.max_ms} ms",
            )
        )
    return out


# --- size, compatibility, package -----------------------------------------------------------------------------


def size_checks(policy: GatePolicy, results: Sequence[ModelResult], package: PackageFacts | None) -> list[CheckResult]:
    sz = policy.size
    if sz is None:
        return []
    out: list[CheckResult] = []
    if sz.max_model_mb is not None:
        seen: dict[str, ModelResult] = {r.model_sha256: r for r in results}
        if not seen:
            out.append(CheckResult(name="size.model", status="fail", reason="the bench report holds no results"))
        for r in seen.values():
            mb = r.model_size_bytes / 1e6
            ok = mb <= sz.max_model_mb
            out.append(
                CheckResult(
                    name="size.model" if len(seen) == 1 else f"size.model[{Path(r.model).name}]",
                    status="pass" if ok else "fail",
                    measured=mb,
                    limit=sz.max_model_mb,
                    reason=f"model {mb:.2f} MB {'within' if ok else 'exceeds'} {sz.max_model_mb} MB",
                )
            )
    if sz.max_package_mb is not None:
        if package is None:
            out.append(
                CheckResult(
                    name="size.package", status="inconclusive", limit=sz.max_package_mb, reason="no --package given"
                )
            )
        else:
            mb = package.size_bytes / 1e6
            ok = mb <= sz.max_package_mb
            out.append(
                CheckResult(
                    name="size.package",
                    status="pass" if ok else "fail",
                    measured=mb,
                    limit=sz.max_package_mb,
                    reason=f"package {mb:.2f} MB {'within' if ok else 'exceeds'} {sz.max_package_mb} MB",
                )
            )
    return out


def compat_checks(
    policy: GatePolicy,
    results: Sequence[ModelResult],
    tiers: Mapping[str, TierProfile],
    package: PackageFacts | None,
) -> list[CheckResult]:
    if policy.compatibility is None or not policy.compatibility.enabled:
        return []
    out: list[CheckResult] = []
    for tier, r, multi in _for_tiers(results, list(tiers)):
        if r is None:
            out.append(_missing("compat", tier))
            continue
        label = _label(r, multi)
        profile = tiers[tier]
        problems: list[str] = []
        runtime = r.compat.runtime
        ran_on = f"{runtime} {r.compat.runtime_version}"
        if r.compat.result == "failed":
            problems.append(f"bench on {ran_on} failed: {r.compat.reason}")
        tier_version = profile.runtimes.get(runtime)
        if tier_version is None:
            problems.append(
                f"the model runs on {runtime}, which tier {tier}'s profile does not list (its runtimes: "
                f"{', '.join(f'{k} {v}' for k, v in sorted(profile.runtimes.items()))})"
            )
        opset = r.opset.get("", r.opset.get("ai.onnx"))
        # onnxruntime's opset table is known (max_opset); other runtimes read their own format (LiteRT) or map
        # ONNX through their own frontend (OpenVINO), so only the bench having run it there says it loads
        top = max_opset(tier_version) if runtime == "onnxruntime" and tier_version is not None else None
        if opset is not None and top is not None and opset > top:
            problems.append(f"opset {opset} exceeds the {top} that onnxruntime {tier_version} runs")
        if package is not None:
            problems.extend(package.requirement_reasons.get(tier, []))
        emulated = r.emulated or r.compat.result == "emulated"
        if problems:
            out.append(CheckResult(name=f"compat[{label}]", status="fail", tier=tier, reason="; ".join(problems)))
        elif emulated and not policy.allow_emulated:
            out.append(_emulated("compat", label, r))
        else:
            extra = " and the package requirements admit it" if package is not None else ""
            how = f"emulated ({r.emulated_because})" if emulated else "verified"
            if top is not None:
                fits = f"opset {opset} ≤ {top} (onnxruntime {tier_version})"
            elif opset is not None:
                fits = f"opset {opset} not checked: {runtime} maps ONNX itself; the tier has {runtime} {tier_version}"
            else:
                fits = f"the tier has {runtime} {tier_version}"
            out.append(
                CheckResult(
                    name=f"compat[{label}]",
                    status="pass",
                    tier=tier,
                    reason=f"{how} on {ran_on}; {fits}{extra}",
                )
            )
    return out


def package_checks(policy: GatePolicy, package: PackageFacts | None) -> list[CheckResult]:
    pk = policy.package
    if pk is None:
        return []
    if package is None:
        return [CheckResult(name="package.valid", status="fail", reason="the policy checks a package: give --package")]
    if package.open_error is not None:
        return [CheckResult(name="package.valid", status="fail", reason=package.open_error)]
    out = [CheckResult(name="package.valid", status="pass", reason="manifest matches its schema and member hashes")]
    if pk.golden:
        if package.golden_error is not None:
            status: Status = "fail" if package.golden_checked else "inconclusive"
            out.append(CheckResult(name="package.golden", status=status, reason=package.golden_error))
        else:
            out.append(CheckResult(name="package.golden", status="pass", reason="golden vectors reproduce"))
    if pk.bom:
        bom = package.bom or {}
        ok = bom.get("bomFormat") == "CycloneDX" and bool(bom.get("components"))
        out.append(
            CheckResult(
                name="package.bom",
                status="pass" if ok else "fail",
                reason=f"CycloneDX ML-BOM {bom.get('specVersion', '')} present".replace("  ", " ")
                if ok
                else "no CycloneDX ML-BOM with components in the package",
            )
        )
    return out


def run_checks(
    policy: GatePolicy,
    tiers: Mapping[str, TierProfile],
    bench: BenchReport,
    optimize_report: Mapping[str, Any] | None = None,
    package: PackageFacts | None = None,
) -> list[CheckResult]:
    """Every check the policy asks for, in a fixed order. ``tiers``: the target tiers (the policy's, else those
    the bench ran on)."""
    results = label_emulated(bench.results, bench.environment)
    head: list[CheckResult] = []
    if package is not None and package.model_sha256 is not None:
        # With a package, the gate judges the packaged model's results only.
        results = [r for r in results if r.model_sha256 == package.model_sha256]
        if not results:
            head.append(
                CheckResult(
                    name="bench.package_model",
                    status="fail",
                    reason=f"the bench report has no results for the packaged model "
                    f"(sha256 {package.model_sha256[:12]}); bench the package or its model",
                )
            )
    names = list(tiers)
    return [
        *head,
        *accuracy_checks(policy, optimize_report),
        *latency_checks(policy, results),
        *regression_checks(policy, results, names),
        *memory_checks(policy, results, tiers),
        *cold_start_checks(policy, results, names),
        *size_checks(policy, results, package),
        *compat_checks(policy, results, tiers, package),
        *package_checks(policy, package),
    ]
