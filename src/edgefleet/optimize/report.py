"""The optimize report: a pydantic model the gate reads as JSON, and a rich table for people.

Every latency ratio and metric drop in it is measured against ``baseline`` (``"input"``): the user's model as
given, loaded as the agent loads it. It is the first entry of ``candidates`` and the output when nothing beats it.

Field names the gate reads are a contract (docs/gate.md): ``baseline_metrics`` {overall, per_slice, metric},
``chosen`` {recipe, metrics, latency, size_bytes, op_coverage, nodes_excluded}, ``candidates``, ``reason``,
``time_spent_s``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from rich.table import Table
from rich.text import Text

from edgefleet.bench.env import Environment, emulation_of
from edgefleet.bench.stats import PairedComparison
from edgefleet.bench.tiers import TierProfile
from edgefleet.optimize.candidates import Recipe
from edgefleet.optimize.evaluate import MetricValues

__all__ = [
    "CandidateReport",
    "LatencyResult",
    "NodeSensitivity",
    "OpCoverage",
    "OptimizeReport",
    "Status",
    "calibration_summary",
    "table",
    "with_host",
]

Status = Literal[
    "chosen",  # the output (the input itself when nothing qualified)
    "qualified",  # within tolerance and faster than the input, but another qualified candidate is faster still
    "out_of_tolerance",
    "not_faster",  # within tolerance; the paired comparison with the input found no practical speed-up
    "slower",
    "pruned",  # a rule for the tier's instruction set refused it before any evaluation
    "failed",  # the quantizer or onnxruntime could not build / run it
    "no_op",  # the quantizer ran but quantized no compute op
    "skipped",  # the time budget ran out first
    "baseline",  # the input model, which every candidate is measured against, when it is not the output
]


class LatencyResult(BaseModel):
    """Paired, interleaved A/B against the input model as given: ratio = candidate time / input time."""

    median_ratio: float | None
    ci_low: float | None
    ci_high: float | None
    verdict: str
    n_pairs: int
    reason: str
    confirmed: bool | None = Field(None, description="a second, independent A/B agreed (chosen candidates only)")

    @classmethod
    def from_comparison(cls, c: PairedComparison) -> LatencyResult:
        return cls(
            median_ratio=c.median_ratio,
            ci_low=c.ci_low,
            ci_high=c.ci_high,
            verdict=c.verdict,
            n_pairs=c.n_pairs,
            reason=c.reason,
        )


class OpCoverage(BaseModel):
    quantized: list[str] = Field(default_factory=list)
    float: list[str] = Field(default_factory=list)


class NodeSensitivity(BaseModel):
    """How much one node costs when quantized: SQNR of its output vs float (qdq_loss_debug; lower is worse) and the
    metric gained by keeping it alone in float (leave-one-out; higher means more sensitive)."""

    node: str
    sqnr_db: float | None = None
    loo_gain: float | None = None


class CandidateReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    recipe: Recipe
    status: Status
    reason: str = ""
    metrics: MetricValues | None = None
    within_tolerance: bool | None = None
    latency: LatencyResult | None = None
    size_bytes: int | None = None
    op_coverage: OpCoverage | None = None
    nodes_excluded: list[str] = Field(default_factory=list)
    sensitivity: list[NodeSensitivity] | None = Field(None, description="fallback ranking, for fallback candidates")
    derived_from: str | None = Field(None, description="the out-of-tolerance candidate a fallback started from")
    eval_calls: int | None = Field(
        None, description="eval calls it was scored on: fewer than all when screening found it far out of tolerance"
    )
    time_s: float = 0.0


class OptimizeReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # 2: ratios and drops are measured against the input model (1: against the graph-optimized float model).
    schema_version: int = 2
    baseline: Literal["input"] = Field(
        "input", description="what every ratio and drop is measured against: the model as given, loaded as the agent"
    )
    model: str
    model_sha256: str
    output: str
    output_sha256: str
    tier: str
    metric: str = Field(description="top1, agreement, cosine, cosine-min, sqnr, ctc, or the user's module:function")
    ctc_blank: int | None = Field(None, description="the CTC blank index metric ctc decoded with (ctc only)")
    ctc_trim: list[int] | None = Field(
        None, description="classes metric ctc stripped from either end of each decoded line (ctc only; none: [])"
    )
    metric_sha256: str | None = Field(None, description="sha256 of the file defining a user metric (user only)")
    max_accuracy_drop: float = Field(description="the tolerance: largest allowed drop of metric from the input")
    max_slice_drop: float | None
    eval_calls: int
    calib_calls: int = Field(description="calibration calls used: all given, up to calib_limit evenly spaced ones")
    calib_calls_given: int | None = Field(None, description="calibration calls given (None: an older report)")
    calib_limit: int | None = Field(None, description="most calibration calls used (--calib-limit)")
    evaluation: Literal["per_call", "closed_loop"] = Field(
        "per_call",
        description="closed_loop: each stream run in order, every model fed its own previous state (state pairs)",
    )
    eval_streams: int | None = Field(None, description="streams the closed-loop evaluation ran (closed_loop only)")
    state_pairs: list[str] = Field(default_factory=list, description="recurrent state pairs INPUT=OUTPUT")
    baseline_metrics: MetricValues
    input_size_bytes: int
    float_size_bytes: int = Field(description="the prepared (graph-optimized) float model")
    kept_input: bool = Field(description="no candidate was measured faster: the output is the input, byte for byte")
    chosen: CandidateReport
    candidates: list[CandidateReport]
    reason: str
    preparation: list[str] = Field(default_factory=list)
    runtime_version: str
    time_budget_s: float
    time_spent_s: float
    host: Environment | None = Field(None, description="the machine that measured (None: an older report)")
    emulated: bool | None = Field(
        None, description="the host is not the tier's hardware (architecture or ISA): ratios are this host's"
    )
    emulated_because: str | None = None


def with_host(report: OptimizeReport, tier: TierProfile, env: Environment) -> OptimizeReport:
    """``report`` with the host it was measured on, and whether that host only emulates ``tier``."""
    because = emulation_of(env, tier)
    return report.model_copy(update={"host": env, "emulated": because is not None, "emulated_because": because})


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def calibration_summary(used: int, given: int | None, limit: int | None) -> str:
    """How many calibration calls the ranges came from, out of how many given (and the limit when it bit);
    ``given`` is None in reports written before it was recorded."""
    if given is None:
        return f"calibration: {used} calls"
    bit = f" (--calib-limit {limit})" if given > used and limit is not None else ""
    return f"calibration: {used} of {given} calls{bit}"


def table(report: OptimizeReport) -> Table:
    """One row per candidate: metric and drop, worst slice, latency ratio with CI, size, op coverage, status — each
    relative to the input model, whose row comes first."""
    # names, slices and reasons come from the user's model, data and tier files: cells are Text, never markup
    t = Table(
        title=Text(
            f"optimize · {report.metric} · tier {report.tier} · chosen: {report.chosen.name} · vs your input model"
            f" · {calibration_summary(report.calib_calls, report.calib_calls_given, report.calib_limit)}"
        )
    )
    cols = ("candidate", report.metric, "drop", "worst slice", "ratio vs input (95% CI)", "size", "quantized", "status")
    for col in cols:
        t.add_column(col, justify="right" if col not in ("candidate", "status") else "left")
    base = report.baseline_metrics.overall
    for c in report.candidates:
        m = c.metrics
        worst = m.worst_slice if m else None
        lat = c.latency
        if c.recipe.kind == "input":
            ratio = "1 (baseline)"
        elif lat is None or lat.median_ratio is None:
            ratio = "–"
        else:
            ratio = f"{lat.median_ratio:.2f} ({_fmt(lat.ci_low, '.2f')}–{_fmt(lat.ci_high, '.2f')})"
        cov = c.op_coverage
        quant = "–" if cov is None else f"{len(cov.quantized)}/{len(cov.quantized) + len(cov.float)}"
        style = "bold green" if c.status == "chosen" else ("dim" if c.status in ("pruned", "skipped") else "")
        t.add_row(
            *(
                Text(cell)
                for cell in (
                    c.name,
                    _fmt(m.overall if m else None, ".4f"),
                    _fmt(base - m.overall if m else None, "+.4f"),
                    "–" if worst is None else f"{worst[0]}: {worst[1]:.3f}",
                    ratio,
                    "–" if c.size_bytes is None else f"{c.size_bytes / report.input_size_bytes:.2f}x",
                    quant,
                    f"{c.status}" + (f": {c.reason}" if c.reason and c.status != "chosen" else ""),
                )
            ),
            style=style,
        )
    return t
