"""Release vs production: is the candidate at least as accurate as the version a tier runs today?

``accuracy.drop`` compares a candidate with its own float parent only, so a new release that is three points worse
than what devices run passes as long as quantization cost little. These checks compare the candidate's evaluation
(the optimize report's ``chosen.metrics``) with the production version's (``chosen.metrics`` of the optimize report
that built it), overall and per slice. Pure: mappings in, :class:`CheckResult` values out; ``gate.verdict`` reads
the files.

Two scores compare only when they measure the same thing: the same metric, and for a label-free metric
(``agreement``, ``cosine``, ``sqnr``, each scored against the model's *own* input) the same input model. Whether
both ran on the same evaluation data the reports do not record; docs/gate.md says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

# One reading of "a report's metrics" for both comparisons, so the parent and production numbers cannot diverge.
from edgefleet.gate.checks import CheckResult, Status, _metrics, _overall, _slices
from edgefleet.gate.policy import GatePolicy, ProductionPolicy

__all__ = [
    "AccuracyComparison",
    "Evaluation",
    "accuracy_summary",
    "evaluation_of",
    "production_checks",
]

# Only top1 is scored against labels alone. Every other metric — agreement, cosine, cosine-min, sqnr, ctc, and a
# user's own (it is handed the input model's outputs, so it may score against them) — is scored against the
# model's own input: two such scores compare only for models optimized from the same input.
_ABSOLUTE_METRICS = frozenset({"top1"})
_SLACK = 1e-12  # float noise in a drop exactly at the limit must not fail it
_LIST = 5  # slices named in one reason


@dataclass(frozen=True)
class Evaluation:
    """One model's scores as the gate reads them from an optimize report (higher is better)."""

    metric: str | None
    overall: float | None
    per_slice: dict[str, float]
    model_sha256: str | None  # the evaluated model (the report's output)
    input_sha256: str | None  # the model it was optimized from, which label-free metrics are scored against


class AccuracyComparison(BaseModel):
    """The candidate against one reference, as numbers: the verdict carries one per reference it had."""

    against: Literal["parent", "production"]
    metric: str | None
    reference: float
    candidate: float
    drop: float  # reference - candidate: positive means the candidate is worse
    worst_slice: str | None = None
    worst_slice_reference: float | None = None
    worst_slice_candidate: float | None = None
    worst_slice_drop: float | None = None
    reference_sha256: str | None = None

    def describe(self) -> str:
        who = "its float parent" if self.against == "parent" else "production"
        sha = f" ({self.reference_sha256[:12]})" if self.reference_sha256 else ""
        text = f"{self.metric or 'metric'} {self.candidate:.4f} vs {who}{sha} {self.reference:.4f}: {_delta(self.drop)}"
        if self.worst_slice is not None and self.worst_slice_drop is not None:
            text += f"; worst slice {self.worst_slice!r} {_delta(self.worst_slice_drop)}"
        return text


def _delta(drop: float) -> str:
    return f"{drop:.4f} worse" if drop > 0 else f"{-drop:.4f} better" if drop < 0 else "equal"


def _str(report: Mapping[str, Any], key: str) -> str | None:
    v = report.get(key)
    return v if isinstance(v, str) and v else None


def evaluation_of(report: Mapping[str, Any] | None, *path: str) -> Evaluation | None:
    """The scores at ``path`` (``("chosen", "metrics")`` or ``("baseline_metrics",)``); ``None`` without an overall
    score. Non-finite slice scores (a slice with no calls) are dropped: they measure nothing."""
    if report is None:
        return None
    m = _metrics(report, *path)
    overall = None if m is None else _overall(m)
    if m is None or overall is None or not math.isfinite(overall):
        return None
    metric = m.get("metric") if isinstance(m.get("metric"), str) else _str(report, "metric")
    slices = {k: v for k, v in _slices(m).items() if math.isfinite(v)}
    model = _str(report, "output_sha256") if path[0] == "chosen" else _str(report, "model_sha256")
    return Evaluation(metric, overall, slices, model, _str(report, "model_sha256"))


def _comparable(cand: Evaluation, prod: Evaluation) -> str | None:
    """Why the two scores do not measure the same thing, or ``None`` when they do."""
    if cand.metric and prod.metric and cand.metric != prod.metric:
        return (
            f"the candidate is scored by {cand.metric} but production by {prod.metric}; optimize both with one --metric"
        )
    metric = cand.metric or prod.metric
    if (
        metric is not None
        and metric not in _ABSOLUTE_METRICS
        and (cand.input_sha256 is None or cand.input_sha256 != prod.input_sha256)
    ):
        return (
            f"{metric} scores each model against its own input model, and the two were optimized from different "
            "models; evaluate both with labels (--metric top1 --labels KEY) so their scores compare"
        )
    return None


def _worst(cand: Evaluation, ref: Evaluation) -> tuple[str, float] | None:
    common = sorted(set(ref.per_slice) & set(cand.per_slice))
    if not common:
        return None
    worst = max(common, key=lambda k: ref.per_slice[k] - cand.per_slice[k])
    return worst, ref.per_slice[worst] - cand.per_slice[worst]


def _compare(against: Literal["parent", "production"], cand: Evaluation, ref: Evaluation) -> AccuracyComparison:
    assert cand.overall is not None and ref.overall is not None
    out = AccuracyComparison(
        against=against,
        metric=cand.metric or ref.metric,
        reference=ref.overall,
        candidate=cand.overall,
        drop=ref.overall - cand.overall,
        reference_sha256=ref.model_sha256,
    )
    worst = _worst(cand, ref)
    if worst is not None:
        name, drop = worst
        out.worst_slice, out.worst_slice_drop = name, drop
        out.worst_slice_reference, out.worst_slice_candidate = ref.per_slice[name], cand.per_slice[name]
    return out


def accuracy_summary(
    optimize_report: Mapping[str, Any] | None, production_report: Mapping[str, Any] | None
) -> dict[str, AccuracyComparison]:
    """The candidate against its float parent (``vs_parent``) and against production (``vs_production``), whatever
    the policy checks, so a verdict always shows both numbers it had the evidence for."""
    cand = evaluation_of(optimize_report, "chosen", "metrics")
    if cand is None:
        return {}
    out: dict[str, AccuracyComparison] = {}
    parent = evaluation_of(optimize_report, "baseline_metrics")
    if parent is not None:
        out["vs_parent"] = _compare("parent", cand, parent)
    prod = evaluation_of(production_report, "chosen", "metrics")
    if prod is not None and _comparable(cand, prod) is None:
        out["vs_production"] = _compare("production", cand, prod)
    return out


def production_checks(
    policy: GatePolicy,
    optimize_report: Mapping[str, Any] | None,
    production_report: Mapping[str, Any] | None,
) -> list[CheckResult]:
    """``accuracy.vs_production.drop`` (overall) and, with ``max_slice_drop``, ``accuracy.vs_production.worst_slice``.

    Without a production report both are skipped (the first release has nothing to compare with) unless the policy
    says ``required: true``; then they fail, as does anything else that keeps the comparison from being made."""
    prod_policy: ProductionPolicy | None = policy.production
    if prod_policy is None:
        return []
    wanted: list[tuple[str, float]] = [("accuracy.vs_production.drop", prod_policy.max_drop)]
    if prod_policy.max_slice_drop is not None:
        wanted.append(("accuracy.vs_production.worst_slice", prod_policy.max_slice_drop))

    def undecided(reason: str) -> list[CheckResult]:
        status: Status = "fail" if prod_policy.required else "inconclusive"
        return [CheckResult(name=n, status=status, reason=reason, limit=lim) for n, lim in wanted]

    if production_report is None:
        if prod_policy.required:
            return undecided(
                "the policy requires a comparison with production (production.required): give --production-report, "
                "the optimize report of the version devices run"
            )
        reason = "no production report given (--production-report); nothing to compare with"
        return [CheckResult(name=n, status="skipped", reason=reason, limit=lim) for n, lim in wanted]
    cand = evaluation_of(optimize_report, "chosen", "metrics")
    if cand is None:
        if optimize_report is None:
            return undecided("no optimize report given (--optimize-report): the candidate has no scores to compare")
        return undecided("the optimize report lacks an overall score in chosen.metrics")
    prod = evaluation_of(production_report, "chosen", "metrics")
    if prod is None:
        return undecided("the production report lacks an overall score in chosen.metrics")
    why_not = _comparable(cand, prod)
    if why_not is not None:
        return undecided(why_not)
    cmp = _compare("production", cand, prod)
    return [
        _overall_check(name, limit, cmp)
        if name.endswith(".drop")
        else _slice_check(name, limit, cand, prod, prod_policy.required)
        for name, limit in wanted
    ]


def _overall_check(name: str, limit: float, cmp: AccuracyComparison) -> CheckResult:
    ok = cmp.drop <= limit + _SLACK
    sha = f" ({cmp.reference_sha256[:12]})" if cmp.reference_sha256 else ""
    verdict = "within" if ok else "exceeds"
    how = f"{_delta(cmp.drop)}, {verdict} the {limit} allowed" if cmp.drop > 0 else _delta(cmp.drop)
    return CheckResult(
        name=name,
        status="pass" if ok else "fail",
        reason=f"{cmp.metric or 'metric'}: production{sha} {cmp.reference:.4f} → candidate {cmp.candidate:.4f}: {how}",
        measured=cmp.drop,
        limit=limit,
    )


def _slice_check(name: str, limit: float, cand: Evaluation, prod: Evaluation, required: bool) -> CheckResult:
    status: Status = "fail" if required else "inconclusive"
    if not prod.per_slice or not cand.per_slice:
        which = "production report" if not prod.per_slice else "optimize report"
        reason = f"the {which} has no per-slice metrics (optimize with --labels or --slices)"
        return CheckResult(name=name, status=status, reason=reason, limit=limit)
    missing = sorted(set(prod.per_slice) - set(cand.per_slice))
    if missing:
        # A slice production was scored on but the candidate was not: most likely different evaluation data.
        shown = ", ".join(repr(k) for k in missing[:_LIST]) + (" …" if len(missing) > _LIST else "")
        reason = f"the candidate has no score for production's slice(s) {shown}; evaluate both on the same data"
        return CheckResult(name=name, status=status, reason=reason, limit=limit)
    drops = {k: v - cand.per_slice[k] for k, v in prod.per_slice.items()}
    worst = max(sorted(drops), key=lambda k: drops[k])
    drop = drops[worst]
    over = sorted((k for k, d in drops.items() if d > limit + _SLACK), key=lambda k: -drops[k])
    ok = not over
    head = (
        f"worst of {len(drops)} slices is {worst!r}: production {prod.per_slice[worst]:.4f} → candidate "
        f"{cand.per_slice[worst]:.4f}, {_delta(drop)}"
    )
    if ok:
        tail = f", within the {limit} allowed" if drop > 0 else ""
    else:
        others = [f"{k!r} {drops[k]:.4f}" for k in over[1:_LIST]]
        tail = f", exceeds the {limit} allowed" + (f" (also over: {', '.join(others)})" if others else "")
        if len(over) > _LIST:
            tail += f" and {len(over) - _LIST} more"
    return CheckResult(name=name, status="pass" if ok else "fail", reason=head + tail, measured=drop, limit=limit)
