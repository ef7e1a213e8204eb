"""A rollout's shadow phase, as pure functions over data (docs/adr/0107-shadow-evaluation.md).

Before its canary, a rollout may run its candidate *in shadow* on a few devices of each tier: the device installs
it in its idle slot and runs it on copies of live requests, never answering one, and reports per telemetry window
how often it agreed with the served model (:class:`~edgefleet.protocol.ShadowStats`). The phase is judged like a
wave — tier by tier, on a minimum sample, and a disagreement must replicate in the earlier and the later half of
the phase (ADR 0093's rule) before it halts the rollout — and only a passed phase starts wave 0. A halted phase
has moved no device: none ever served the candidate.

:func:`choose_devices` picks the devices, :func:`tier_stats` sums their windows, :func:`judge_shadow` judges and
:func:`shadow_action` turns the judgement plus the clock into the reconciler's next step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from edgefleet.telemetry.sketch import LatencySketch, SketchData

__all__ = [
    "ShadowAction",
    "ShadowJudgement",
    "ShadowOutcome",
    "ShadowPolicy",
    "ShadowWindow",
    "TierShadow",
    "choose_devices",
    "judge_shadow",
    "shadow_action",
    "tier_stats",
]


class ShadowPolicy(BaseModel):
    """The shadow phase of a rollout policy (``policy.shadow``); absent: the rollout starts with its canary."""

    model_config = ConfigDict(extra="forbid")

    percent: float = Field(5.0, gt=0, le=100, description="of each tier's eligible devices (at least one) in shadow")
    min_samples: int = Field(200, ge=2, description="mirrored requests compared per tier before it is judged")
    min_agreement: float = Field(0.98, gt=0, le=1, description="agreement with the served model a tier needs")
    duration_s: float = Field(600.0, ge=0, description="the phase lasts at least this long before it passes")
    max_wait_s: float = Field(
        1800.0, ge=0, description="past duration_s, how long a phase short of its sample waits before it pauses"
    )
    rate_per_s: float = Field(20.0, gt=0, le=10_000, description="mirrored requests a second per device, at most")
    cpu_share: float = Field(0.25, gt=0, le=1, description="the candidate's compute, at most this share of one core")


@dataclass(frozen=True)
class ShadowWindow:
    """One telemetry window's shadow counts, with the device's tier and the server's receive time."""

    tier: str
    at: float  # server time, seconds since the epoch
    compared: int
    agreed: int
    errors: int = 0
    dropped: int = 0
    latency: SketchData = field(default_factory=SketchData)
    device_id: str = ""


@dataclass(frozen=True)
class TierShadow:
    """One tier's shadow figures: the whole phase, and its earlier and later half (by server time)."""

    tier: str
    devices: int
    compared: int = 0
    agreed: int = 0
    errors: int = 0
    dropped: int = 0
    p95_ms: float | None = None
    halves: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))  # (compared, agreed) of each half

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None


def choose_devices(eligible: Iterable[tuple[str, str]], percent: float, bucket: Callable[[str], float]) -> list[str]:
    """The devices of a shadow phase: in each tier, the first ``ceil(percent % × eligible)`` (at least one) by
    their stable ``bucket`` (the waves' hash), so the phase holds every tier and a device keeps its place."""
    by_tier: dict[str, list[str]] = {}
    for device_id, tier in eligible:
        by_tier.setdefault(tier, []).append(device_id)
    out: list[str] = []
    for tier in sorted(by_tier):
        ids = sorted(by_tier[tier], key=lambda i: (bucket(i), i))
        out += ids[: max(1, math.ceil(len(ids) * percent / 100.0))]
    return out


def tier_stats(
    windows: Iterable[ShadowWindow], devices_by_tier: Mapping[str, int], started: float, now: float
) -> list[TierShadow]:
    """Each tier's sums; a window belongs to the earlier half when it arrived before the middle of
    ``[started, now]``. A tier's devices: ``devices_by_tier``'s, or as many as sent windows if more."""
    middle = started + (now - started) / 2.0
    acc: dict[str, list[ShadowWindow]] = {t: [] for t in devices_by_tier}
    for w in windows:
        acc.setdefault(w.tier, []).append(w)
    out = []
    for tier in sorted(acc):
        ws = acc[tier]
        early = [w for w in ws if w.at < middle]
        late = [w for w in ws if w.at >= middle]
        sketch = LatencySketch.merged(w.latency for w in ws)
        p95 = sketch.quantile(0.95) if sketch.count else None
        out.append(
            TierShadow(
                tier=tier,
                devices=max(devices_by_tier.get(tier, 0), len({w.device_id for w in ws if w.device_id})),
                compared=sum(w.compared for w in ws),
                agreed=sum(w.agreed for w in ws),
                errors=sum(w.errors for w in ws),
                dropped=sum(w.dropped for w in ws),
                p95_ms=None if p95 is None else p95 * 1000.0,
                halves=(
                    (sum(w.compared for w in early), sum(w.agreed for w in early)),
                    (sum(w.compared for w in late), sum(w.agreed for w in late)),
                ),
            )
        )
    return out


class ShadowOutcome(StrEnum):
    passed = "passed"
    failed = "failed"
    inconclusive = "inconclusive"


@dataclass(frozen=True)
class ShadowJudgement:
    outcome: ShadowOutcome
    reason: str
    tiers: tuple[TierShadow, ...] = ()


def _figures(t: TierShadow) -> str:
    (c1, a1), (c2, a2) = t.halves
    halves = ", ".join(f"{a / c:.1%} of {c}" if c else "none" for c, a in ((c1, a1), (c2, a2)))
    return f"agreement {t.agreed / t.compared:.1%} ({t.agreed}/{t.compared}, {t.errors} errors; halves {halves})"


def judge_shadow(tiers: Sequence[TierShadow], policy: ShadowPolicy) -> ShadowJudgement:
    """Tier by tier. A tier *fails* when its agreement is below ``min_agreement`` over the phase and in each half,
    each half holding at least half the minimum sample (a stretch of unusual inputs moves one half, a candidate
    that answers differently moves both). A tier *passes* with ``min_samples`` compared and its agreement at
    least ``min_agreement``. The phase fails when a tier fails, passes when every tier passes, else it is
    inconclusive (a short sample, or a low agreement awaiting its other half)."""
    need, half = policy.min_samples, math.ceil(policy.min_samples / 2)
    if not tiers:
        return ShadowJudgement(ShadowOutcome.inconclusive, "no device in shadow yet")
    failed: list[str] = []
    waiting: list[str] = []
    passed: list[str] = []
    for t in tiers:
        where = f"tier {t.tier}"
        if t.compared == 0:
            waiting.append(f"{where}: 0 of {need} mirrored requests compared")
            continue
        low = t.agreed / t.compared < policy.min_agreement
        if low:
            below = [c >= half and a / c < policy.min_agreement for c, a in t.halves]
            if all(below):
                failed.append(f"{where}: {_figures(t)} < {policy.min_agreement:.1%} in both halves")
            elif any(c >= half and a / c >= policy.min_agreement for c, a in t.halves):
                # one half agrees well: not replicated; the tier still needs its overall agreement to pass
                waiting.append(f"{where}: {_figures(t)}, below {policy.min_agreement:.1%} in one half only")
            else:
                waiting.append(f"{where}: {_figures(t)}, confirming in both halves ({half} each)")
        elif t.compared < need:
            waiting.append(f"{where}: {t.compared} of {need} mirrored requests compared")
        else:
            passed.append(f"{where}: {_figures(t)}")
    if failed:
        return ShadowJudgement(ShadowOutcome.failed, "; ".join(failed), tuple(tiers))
    if waiting:
        return ShadowJudgement(ShadowOutcome.inconclusive, "; ".join(waiting), tuple(tiers))
    return ShadowJudgement(ShadowOutcome.passed, "; ".join(passed), tuple(tiers))


class ShadowAction(StrEnum):
    wait = "wait"
    start_canary = "start_canary"
    halt = "halt"


def shadow_action(judgement: ShadowJudgement, elapsed_s: float, policy: ShadowPolicy) -> tuple[ShadowAction, str]:
    """The reconciler's step: halt at once on a failed phase; start the canary once a passed phase has run
    ``duration_s``; halt an inconclusive one at ``duration_s + max_wait_s``; else wait."""
    j = judgement
    if j.outcome is ShadowOutcome.failed:
        return ShadowAction.halt, f"shadow phase failed: {j.reason}"
    if j.outcome is ShadowOutcome.passed:
        if elapsed_s >= policy.duration_s:
            return ShadowAction.start_canary, f"shadow phase passed: {j.reason}"
        return ShadowAction.wait, f"shadow phase running ({elapsed_s:.0f}/{policy.duration_s:.0f} s): {j.reason}"
    if elapsed_s >= policy.duration_s + policy.max_wait_s:
        return ShadowAction.halt, f"shadow phase inconclusive at its deadline: {j.reason}"
    return ShadowAction.wait, f"shadow phase running ({elapsed_s:.0f} s): {j.reason}"
