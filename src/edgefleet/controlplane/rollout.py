"""Rollout decisions as pure functions over data. No I/O: the reconciler gathers the facts, calls
these, and writes what they decide.

A rollout moves eligible devices from the version they run (A) to a new one (B) in cumulative waves: a device
belongs to the first wave whose percentage exceeds the stable hash bucket of its id. Each wave is judged on the
telemetry of the devices moved so far (the *treatment*) against the eligible devices still on A (the *control*);
with no control (a first rollout) the policy's absolute budgets apply. A judgement is ``pass``, ``fail`` or
``inconclusive`` (below the minimum sample); :func:`decide` turns it plus the clock into an action.

A latency regression is a claim about the version, not about a moment: it must show in the earlier *and* the
later half of the treatment's telemetry (each half sampled on its own) before it fails a wave. A burst of host
contention during one stretch of the bake (a neighbour's update, a backup job) then moves one half, not both; a
slower model moves both. Until the later half has its sample the suspicion keeps the wave inconclusive, so a
suspected regression never advances a wave either (ADR 0093). Nor is a pooled tail enough: the treatment's per-window
p95s must rank above the control's, so bursts that hit a few windows are not a regression (ADR 0095).

Drift is judged on each cohort's merged per-bin counts scored against the package's reference (never a maximum of
per-window PSIs), and only once a feature has the minimum sample (ADR 0094). A rollout with no eligible device is
``blocked``, never ``completed``: an empty cohort proves nothing.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgefleet.bench.stats import mann_whitney_greater
from edgefleet.controlplane.shadow import ShadowPolicy
from edgefleet.telemetry.drift import MIN_DRIFT_SAMPLE, DriftReference, DriftSummary, fleet_psi, merge_counts
from edgefleet.telemetry.sketch import LatencySketch, SketchData

__all__ = [
    "OTHER_MODEL",
    "AccuracyVerdict",
    "Action",
    "CohortStats",
    "Decision",
    "DeviceFacts",
    "Judgement",
    "Outcome",
    "RolloutPlan",
    "RolloutPolicy",
    "RolloutState",
    "UpdateOutcome",
    "WindowFacts",
    "blocked_reason",
    "cohort_stats",
    "decide",
    "eligibility",
    "field_accuracy_vs_control",
    "is_cancellation",
    "judge",
    "naive_utc",
    "outcome_counts",
    "plan_rollout",
    "plan_wave",
    "rollback_targets",
    "silent_devices",
    "success_rate",
    "update_outcome",
    "wave_bucket",
    "wave_of",
]


# A window's p95 is a unit of the shift test only with this many calls (below it, the p95 is the window's maximum).
MIN_WINDOW_CALLS = 5


class RolloutState(StrEnum):
    draft = "draft"
    running = "running"
    paused = "paused"
    # no eligible device to move (none enrolled, all incompatible, pinned …): re-evaluated every step, so the
    # rollout goes on by itself once a device appears; never terminal and never "completed"
    blocked = "blocked"
    completed = "completed"
    aborted = "aborted"
    rolled_back = "rolled_back"


TERMINAL = frozenset({RolloutState.completed, RolloutState.aborted, RolloutState.rolled_back})


class RolloutPolicy(BaseModel):
    """Thresholds of one rollout. Relative limits compare treatment with control; absolute budgets apply when there
    is no control group."""

    model_config = ConfigDict(extra="forbid")

    waves: list[float] = Field(default_factory=lambda: [1.0, 10.0, 50.0, 100.0], min_length=1)
    bake_s: float = Field(300.0, ge=0)
    min_devices: int = Field(3, ge=1, description="committed devices needed before a wave can pass")
    min_requests: int = Field(100, ge=0, description="inference requests needed before a wave can pass")
    max_failure: float = Field(0.05, ge=0, le=1, description="update failures + on-device rollbacks / devices")
    auto_rollback: bool = False
    # relative SLOs (treatment vs control)
    max_crash_free_drop: float = Field(0.02, ge=0, le=1)
    max_p95_ratio: float = Field(1.25, gt=0)
    # A p95 regression must also be this large in absolute terms: the same model's latency moves ±25 % between
    # processes on a busy CPU, so sub-millisecond p95s differ by more than any ratio threshold without a cause.
    min_p95_increase_ms: float = Field(0.5, ge=0)
    # A tier's p95 is compared only once both cohorts served it this many requests: a p95 of a few dozen calls is
    # their maximum, often a fresh worker's first call.
    min_tier_requests: int = Field(100, ge=1)
    # A suspected p95 regression waits for the later half of the treatment's telemetry; the bake is extended by
    # up to this long for it (then the wave pauses like any inconclusive one).
    max_confirm_s: float = Field(300.0, ge=0)
    # A wave still short of its sample (``min_devices`` committed, ``min_requests`` served) at the bake deadline
    # waits up to this long more before it pauses as inconclusive: installs and traffic that arrive late (a slow
    # link, a busy host) are evidence worth waiting for, and the wave still passes only on the full sample.
    max_sample_wait_s: float = Field(0.0, ge=0)
    # A moved device that checked in after its move (so it holds the new desired state), then went silent for this
    # long without reporting a commit or a failure, counts as an update failure: a device bricked by an update goes
    # quiet, and silence must not read as "still in progress" for ever. 0 turns it off. The default is many
    # check-in intervals (30 s by default), so a device that misses a few is not failed.
    device_timeout_s: float = Field(900.0, ge=0)
    # A p95 regression must also be a shift of the typical telemetry window, not a few windows hit by a burst: the
    # treatment's per-window p95s must rank above the control's (one-sided Mann-Whitney p below this), over at least
    # ``min_latency_windows`` windows of the tier in each cohort (ADR 0095).
    latency_shift_p: float = Field(0.01, gt=0, le=1)
    min_latency_windows: int = Field(5, ge=2)
    max_error_rate_increase: float = Field(0.01, ge=0, le=1)
    max_psi_increase: float = Field(0.1, ge=0)
    # absolute budgets (first rollout) — also a floor that applies with a control group
    min_crash_free: float = Field(0.95, ge=0, le=1)
    p95_budget_ms: float | None = Field(None, gt=0)
    max_error_rate: float = Field(0.05, ge=0, le=1)
    max_psi: float = Field(0.25, ge=0)
    # Field accuracy (ground truth the applications reported, docs/operations.md "Field accuracy"): the treatment's
    # must be at least this fraction of the control's, tier by tier, in the earlier and the later half of its
    # telemetry alike (the ADR 0093 rule). None: not judged. Judged only against a control group, on tiers where
    # both cohorts (and, to confirm, each half) have ``field_accuracy_min_samples`` matched feedback; until one
    # has, the wave waits for its sample.
    min_field_accuracy_vs_control: float | None = Field(None, gt=0, le=1)
    field_accuracy_min_samples: int = Field(100, ge=1)
    # A compatibility cell blocks a version only on failures from this many distinct devices: one device's bad
    # hardware or flaky storage must not shut a whole tier out. Fewer make the cell "suspect" (shown, not blocking).
    compat_fail_devices: int = Field(2, ge=1)
    # A shadow phase before the canary (controlplane/shadow.py): the candidate runs on a few devices of each tier on
    # copies of live requests, never serving; the canary starts only once its agreement passes. None: no phase.
    shadow: ShadowPolicy | None = None

    @field_validator("waves")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(not 0 < w <= 100 for w in v):
            raise ValueError("wave percentages must be in (0, 100]")
        if any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError("wave percentages must increase")
        if v[-1] != 100:
            raise ValueError("the last wave must be 100 (%)")
        return v


# --------------------------------------------------------------------------- membership and targeting


def wave_bucket(device_id: str) -> float:
    """A stable number in [0, 100) from the device id alone, so a device keeps its wave across restarts and
    replicas (Python's ``hash`` is salted per process; SHA-256 is not)."""
    h = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "big")
    return (h / 2**64) * 100.0


def wave_of(device_id: str, waves: Sequence[float]) -> int:
    b = wave_bucket(device_id)
    for i, pct in enumerate(waves):
        if b < pct:
            return i
    return len(waves) - 1


@dataclass(frozen=True)
class DeviceFacts:
    """What targeting needs to know about one device."""

    device_id: str
    tier: str
    runtime_version: str
    memory_mb: int | None = None
    channel: str = "stable"
    pinned: bool = False
    revoked: bool = False
    model: str | None = None  # desired model/version now (A)
    version: str | None = None
    compat_problems: tuple[str, ...] = ()  # from the compatibility matrix and the package requirements


OTHER_MODEL = "runs another model"


def eligibility(device: DeviceFacts, *, tier: str | None, channel: str | None) -> str | None:
    """None when the rollout may target the device, else the reason it may not."""
    if device.revoked:
        return "revoked"
    if device.pinned:
        return "pinned"
    if tier is not None and device.tier != tier:
        return f"tier {device.tier} is not {tier}"
    if channel is not None and device.channel != channel:
        return f"follows channel {device.channel}, not {channel}"
    if device.compat_problems:
        return "incompatible: " + "; ".join(device.compat_problems)
    return None


def plan_wave(
    devices: Iterable[DeviceFacts],
    *,
    model: str,
    version: str,
    wave: int,
    waves: Sequence[float],
    tier: str | None,
    channel: str | None,
    moved: Iterable[str],
) -> list[str]:
    """Ids of the devices to move now: eligible, in waves ``0..wave``, not already moved or on the new version.

    Eligible devices are ordered by their stable hash bucket and wave ``i`` covers the first
    ``ceil(waves[i]% × eligible)`` of them: the same order as :func:`wave_of`, but a small fleet's 1 % canary holds
    one device instead of, by the luck of the hash, none — an empty canary would pass vacuously and send the
    version straight to the next wave. Never returns a pinned, revoked or incompatible device, whatever the wave."""
    already = set(moved)
    eligible = [d for d in devices if eligibility(d, tier=tier, channel=channel) is None]
    eligible.sort(key=lambda d: (wave_bucket(d.device_id), d.device_id))
    quota = math.ceil(waves[min(wave, len(waves) - 1)] / 100.0 * len(eligible) - 1e-9)
    out = [
        d.device_id
        for d in eligible[:quota]
        if d.device_id not in already and not (d.model == model and d.version == version)
    ]
    return sorted(out)


def _exclusion(device: DeviceFacts, *, channel: str | None) -> str:
    """What keeps an in-scope device out, in words fit for a count ("3 incompatible")."""
    if device.revoked:
        return "revoked"
    if device.pinned:
        return "pinned"
    if channel is not None and device.channel != channel:
        return "on another channel"
    if device.compat_problems and all(p.startswith(OTHER_MODEL) for p in device.compat_problems):
        return "run another model"
    return "incompatible"


def blocked_reason(devices: Iterable[DeviceFacts], *, tier: str | None, channel: str | None) -> str | None:
    """None when at least one device is eligible, else why none is — counted over the devices in the rollout's
    scope (its tier), e.g. ``no eligible device on tier arm-a72: 3 enrolled, 3 incompatible``."""
    ds = list(devices)
    if any(eligibility(d, tier=tier, channel=channel) is None for d in ds):
        return None
    scope = [d for d in ds if tier is None or d.tier == tier]
    where = (f" on tier {tier}" if tier is not None else "") + (f" in channel {channel}" if channel else "")
    why = Counter(_exclusion(d, channel=channel) for d in scope)
    parts = [f"{len(scope)} enrolled", *(f"{n} {what}" for what, n in sorted(why.items()))]
    return f"no eligible device{where}: " + ", ".join(parts)


@dataclass(frozen=True)
class RolloutPlan:
    """What a rollout would do now, wave by wave (``rollout start --dry-run``)."""

    waves: tuple[tuple[str, ...], ...]  # devices each wave would move (each device once, in its first wave)
    already: tuple[str, ...]  # eligible devices whose desired state already names the version
    excluded: dict[str, str]  # device → why it is never targeted
    blocked: str | None  # set when no device is eligible

    @property
    def devices(self) -> int:
        return sum(len(w) for w in self.waves)


def plan_rollout(
    devices: Iterable[DeviceFacts],
    *,
    model: str,
    version: str,
    waves: Sequence[float],
    tier: str | None,
    channel: str | None,
) -> RolloutPlan:
    """Every wave of a rollout as :func:`plan_wave` would plan it on today's fleet, without moving anything."""
    ds = list(devices)
    moved: list[str] = []
    out: list[tuple[str, ...]] = []
    for i in range(len(waves)):
        now = plan_wave(ds, model=model, version=version, wave=i, waves=waves, tier=tier, channel=channel, moved=moved)
        out.append(tuple(now))
        moved += now
    excluded = {d.device_id: why for d in ds if (why := eligibility(d, tier=tier, channel=channel)) is not None}
    already = tuple(
        sorted(d.device_id for d in ds if d.device_id not in excluded and d.model == model and d.version == version)
    )
    return RolloutPlan(tuple(out), already, excluded, blocked_reason(ds, tier=tier, channel=channel))


def silent_devices(
    moved_at: Mapping[str, datetime],
    last_seen: Mapping[str, datetime | None],
    outcome_known: Iterable[str],
    *,
    now: datetime,
    timeout_s: float,
) -> set[str]:
    """The moved devices that count as failed for silence: they checked in after their move (so they hold the new
    desired state), have reported no outcome, and have not been heard from for more than ``timeout_s`` — a device
    an update bricked goes quiet. A device still checking in is alive (it may be downloading on a slow link or
    waiting for its maintenance window) and reports its own failures; one not seen since its move never got the
    update and is not judged by it. ``timeout_s`` 0 turns the rule off."""
    if timeout_s <= 0:
        return set()
    known = set(outcome_known)
    out = set()
    for dev, at in moved_at.items():
        seen = last_seen.get(dev)
        if dev in known or seen is None or naive_utc(seen) <= naive_utc(at):
            continue
        if (naive_utc(now) - naive_utc(seen)).total_seconds() > timeout_s:
            out.add(dev)
    return out


def naive_utc(t: datetime) -> datetime:
    """SQLite hands datetimes back without a zone, PostgreSQL with one; all are stored in UTC."""
    return t.replace(tzinfo=None) if t.tzinfo is not None else t


def rollback_targets(moved: Iterable[tuple[str, bool]]) -> list[str]:
    """Devices whose desired state must go back to A: every moved device not reverted yet."""
    return sorted(device_id for device_id, reverted in moved if not reverted)


# --------------------------------------------------------------------------- judging a wave


@dataclass(frozen=True)
class CohortStats:
    devices: int = 0  # devices in the cohort (targeted, for the treatment)
    committed: int = 0  # devices that committed the new version
    failed: int = 0  # update failures + on-device rollbacks + devices silent past the device timeout
    silent: int = 0  # of ``failed``, devices that went silent with the update (``RolloutPolicy.device_timeout_s``)
    reporting: int = 0  # devices with telemetry in the judged period
    crash_free: int = 0  # of those, devices with no worker crash
    requests: int = 0
    errors: int = 0
    p95_ms: float | None = None
    # the largest PSI over features with enough data, scored on the cohort's merged counts; None: none has
    max_psi: float | None = None
    psi_by_feature: dict[str, float | None] = field(default_factory=dict)
    # p95 per device tier: tiers differ in hardware, so treatment and control are compared tier by tier
    p95_ms_by_tier: dict[str, float] = field(default_factory=dict)
    requests_by_tier: dict[str, int] = field(default_factory=dict)
    # each telemetry window's own p95 (ms), per tier and overall, for windows with at least MIN_WINDOW_CALLS calls:
    # the units of the shift test (a window's requests share its moment's host load, so they are not independent)
    # (None: not computed — a cohort built by hand is taken at its word)
    window_p95_ms_by_tier: dict[str, tuple[float, ...]] = field(default_factory=dict)
    window_p95_ms: tuple[float, ...] | None = None
    # the same windows split in time at half of each device's requests (earlier, later); None without times
    halves: tuple[CohortStats, CohortStats] | None = None
    # ground-truth feedback matched to predictions, and how much of it was right: overall and per tier
    feedback_matched: int = 0
    feedback_correct: int = 0
    feedback_by_tier: dict[str, tuple[int, int]] = field(default_factory=dict)  # tier → (matched, correct)

    @property
    def crash_free_rate(self) -> float | None:
        return self.crash_free / self.reporting if self.reporting else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


@dataclass(frozen=True)
class WindowFacts:
    device_id: str
    requests: int
    errors: int
    crashes: int
    latency: SketchData
    tier: str | None = None
    # when the server received the window (epoch seconds): orders windows in time; device clocks may be off
    end: float | None = None
    drift: tuple[DriftSummary, ...] = ()  # per-feature counts in the reference's bins
    feedback_matched: int = 0  # ground-truth feedback matched to this window's predictions
    feedback_correct: int = 0


def cohort_stats(
    windows: Iterable[WindowFacts],
    *,
    devices: int,
    committed: int = 0,
    failed: int = 0,
    reference: DriftReference | None = None,
    min_drift_sample: int = MIN_DRIFT_SAMPLE,
) -> CohortStats:
    """Aggregate telemetry windows: p95 from merged sketches (never an average of per-device p95s), drift PSI from
    merged per-bin counts against ``reference`` (none without one). When every window carries its time,
    ``halves`` holds the same statistics for the earlier and the later half of each device's requests."""
    ws = list(windows)
    agg = _Aggregate(devices, committed, failed, reference, min_drift_sample)
    halves = None
    if ws and all(w.end is not None for w in ws):
        by_device: dict[str, list[WindowFacts]] = {}
        for w in sorted(ws, key=lambda w: w.end or 0.0):
            by_device.setdefault(w.device_id, []).append(w)
        early: list[WindowFacts] = []
        late: list[WindowFacts] = []
        for own in by_device.values():
            # each device's own windows split at half its requests: devices that committed at different times
            # each contribute their own earlier and later stretch
            total, acc, cut = sum(w.requests for w in own), 0, len(own)
            for i, w in enumerate(own):
                if acc >= total / 2:
                    cut = i
                    break
                acc += w.requests
            early += own[:cut]
            late += own[cut:]
        halves = (agg(early), agg(late))
    return replace(agg(ws), halves=halves)


@dataclass(frozen=True)
class _Aggregate:
    devices: int
    committed: int
    failed: int
    reference: DriftReference | None
    min_drift_sample: int

    def __call__(self, windows: Sequence[WindowFacts]) -> CohortStats:
        psi: dict[str, float | None] = {}
        if self.reference is not None:
            merged = merge_counts((x for w in windows for x in w.drift), self.reference)
            psi = fleet_psi(self.reference, merged, min_sample=self.min_drift_sample)
        return replace(
            _aggregate(windows, self.devices, self.committed, self.failed),
            max_psi=max((v for v in psi.values() if v is not None), default=None),
            psi_by_feature=psi,
        )


def _aggregate(windows: Sequence[WindowFacts], devices: int, committed: int, failed: int) -> CohortStats:
    sketch = LatencySketch()
    by_tier: dict[str, LatencySketch] = {}
    tier_requests: dict[str, int] = {}
    crashed: set[str] = set()
    seen: set[str] = set()
    req = err = 0
    window_p95: list[float] = []
    window_p95_by_tier: dict[str, list[float]] = {}
    fb_matched = fb_correct = 0
    fb_by_tier: dict[str, tuple[int, int]] = {}
    for w in windows:
        seen.add(w.device_id)
        if w.feedback_matched:
            fb_matched += w.feedback_matched
            fb_correct += w.feedback_correct
            if w.tier is not None:
                m, c = fb_by_tier.get(w.tier, (0, 0))
                fb_by_tier[w.tier] = (m + w.feedback_matched, c + w.feedback_correct)
        if w.crashes:
            crashed.add(w.device_id)
        req += w.requests
        err += w.errors
        if w.latency.count:
            one = LatencySketch.from_data(w.latency)
            if w.latency.count >= MIN_WINDOW_CALLS and (wq := one.quantile(0.95)) is not None:
                window_p95.append(wq * 1000.0)
                if w.tier is not None:
                    window_p95_by_tier.setdefault(w.tier, []).append(wq * 1000.0)
            sketch.merge(one)
            if w.tier is not None:
                by_tier.setdefault(w.tier, LatencySketch()).merge(one)
        if w.tier is not None:
            tier_requests[w.tier] = tier_requests.get(w.tier, 0) + w.requests
    q = sketch.quantile(0.95)
    return CohortStats(
        devices=devices,
        committed=committed,
        failed=failed,
        reporting=len(seen),
        crash_free=len(seen - crashed),
        requests=req,
        errors=err,
        p95_ms=None if q is None else q * 1000.0,
        p95_ms_by_tier={t: v * 1000.0 for t, sk in by_tier.items() if (v := sk.quantile(0.95)) is not None},
        requests_by_tier=tier_requests,
        window_p95_ms_by_tier={t: tuple(v) for t, v in window_p95_by_tier.items()},
        window_p95_ms=tuple(window_p95),
        feedback_matched=fb_matched,
        feedback_correct=fb_correct,
        feedback_by_tier=fb_by_tier,
    )


class Outcome(StrEnum):
    passed = "pass"
    failed = "fail"
    inconclusive = "inconclusive"


@dataclass(frozen=True)
class Judgement:
    outcome: Outcome
    reasons: tuple[str, ...] = ()
    confirming: bool = False  # inconclusive only because a suspected regression awaits its later half
    sampling: bool = False  # inconclusive only because the minimum sample is not in yet

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def judge(treatment: CohortStats, control: CohortStats | None, policy: RolloutPolicy) -> Judgement:
    """Pass, fail or inconclusive for the devices moved so far.

    Update failures are judged as soon as they are seen (a rollback on a device is direct evidence), against a
    denominator of at least ``min_devices`` so one failure in a one-device canary is not an automatic 100 %.
    Telemetry SLOs need the minimum sample; the control group counts only when it has one too."""
    if treatment.devices == 0:
        # Nothing was moved although devices are eligible: every one of them already has the version, so nothing
        # is at risk (the reconciler blocks a rollout that has no eligible device at all before judging).
        return Judgement(Outcome.passed, ("no device in the waves so far needed the update",))
    fails: list[str] = []
    denom = max(treatment.devices, policy.min_devices)
    if treatment.failed and treatment.failed / denom > policy.max_failure:
        silent = f", {treatment.silent} of them silent past the {policy.device_timeout_s:g} s device timeout"
        fails.append(
            f"update failures {treatment.failed}/{treatment.devices} devices exceed {policy.max_failure:.0%}"
            + (silent if treatment.silent else "")
        )
    enough = treatment.committed >= policy.min_devices and treatment.requests >= policy.min_requests
    if fails:
        return Judgement(Outcome.failed, tuple(fails))
    if not enough:
        return Judgement(
            Outcome.inconclusive,
            (
                f"need {policy.min_devices} committed devices and {policy.min_requests} requests, "
                f"have {treatment.committed} and {treatment.requests}",
            ),
            sampling=True,
        )
    ctl = (
        control if control is not None and control.reporting >= 1 and control.requests >= policy.min_requests else None
    )
    slo_fails, pending = _slo_failures(treatment, ctl, policy)
    accuracy = field_accuracy_vs_control(treatment, ctl, policy)
    fails.extend(slo_fails)
    fails.extend(accuracy.dropped)
    pending.extend(accuracy.confirming)
    if fails:
        return Judgement(Outcome.failed, tuple(fails))
    if pending:
        return Judgement(Outcome.inconclusive, tuple(pending), confirming=True)
    if accuracy.short:
        return Judgement(Outcome.inconclusive, tuple(accuracy.short), sampling=True)
    basis = "vs control group" if ctl is not None else "against absolute budgets (no control group)"
    return Judgement(Outcome.passed, (f"SLOs hold {basis}",))


def _slo_failures(t: CohortStats, c: CohortStats | None, p: RolloutPolicy) -> tuple[list[str], list[str]]:
    """SLO failures, and regressions seen but not yet confirmed (which hold the wave inconclusive)."""
    out: list[str] = []
    pending: list[str] = []
    cf = t.crash_free_rate
    if cf is not None:
        if cf < p.min_crash_free:
            out.append(f"crash-free rate {cf:.1%} below {p.min_crash_free:.1%}")
        elif c is not None and c.crash_free_rate is not None and cf < c.crash_free_rate - p.max_crash_free_drop:
            out.append(f"crash-free rate {cf:.1%} vs control {c.crash_free_rate:.1%}")
    er = t.error_rate
    if er is not None:
        if er > p.max_error_rate:
            out.append(f"error rate {er:.2%} above {p.max_error_rate:.2%}")
        elif c is not None and c.error_rate is not None and er > c.error_rate + p.max_error_rate_increase:
            out.append(f"error rate {er:.2%} vs control {c.error_rate:.2%}")
    if t.p95_ms is not None:
        if p.p95_budget_ms is not None and t.p95_ms > p.p95_budget_ms:
            out.append(f"p95 {t.p95_ms:.2f} ms above budget {p.p95_budget_ms:.2f} ms")
        elif c is not None:
            worse, unconfirmed = _p95_vs_control(t, c, p)
            out.extend(worse)
            pending.extend(unconfirmed)
    if t.max_psi is not None:
        worst = max(((v, k) for k, v in t.psi_by_feature.items() if v is not None), default=None)
        on = f" on {worst[1]}" if worst is not None and worst[0] == t.max_psi else ""
        if c is not None and c.max_psi is not None:
            if t.max_psi > p.max_psi and t.max_psi > c.max_psi + p.max_psi_increase:
                out.append(f"drift PSI {t.max_psi:.3f}{on} vs control {c.max_psi:.3f}")
        elif t.max_psi > p.max_psi:
            out.append(f"drift PSI {t.max_psi:.3f}{on} above {p.max_psi}")
    return out, pending


def _p95_vs_control(t: CohortStats, c: CohortStats, p: RolloutPolicy) -> tuple[list[str], list[str]]:
    """Latency against the control group, like for like: tier by tier where both cohorts have the tier (a canary
    that happens to hold more slow-tier devices than the control is not a regression — Simpson's paradox) and
    both served it ``min_tier_requests``; the cohorts as a whole only when neither carries tiers. A regression
    exceeds both the ratio and the absolute floor, over the whole treatment window and in each of its halves, and
    the treatment's per-window p95s rank above the control's (ADR 0095). Returns (confirmed regressions,
    regressions still waiting for their evidence)."""
    max_ratio = p.max_p95_ratio

    def worse(tv: float, cv: float) -> bool:
        return tv > cv * max_ratio and tv - cv > p.min_p95_increase_ms

    def sampled(x: CohortStats, tier: str) -> bool:
        # cohorts built without per-tier request counts (older callers) are taken at their word
        return not x.requests_by_tier or x.requests_by_tier.get(tier, 0) >= p.min_tier_requests

    def replicated(tier: str | None, cv: float) -> bool | None:
        """Worse in both halves (True), not worse in a sampled half (False), or not yet known (None)."""
        if t.halves is None:
            return True  # windows without times: the whole window is all the evidence there is
        known = True
        for h in t.halves:
            hv = h.p95_ms if tier is None else h.p95_ms_by_tier.get(tier)
            enough = h.requests >= p.min_tier_requests if tier is None else sampled(h, tier)
            if hv is None or not enough:
                known = False
            elif not worse(hv, cv):
                return False
        return True if known else None

    def shifted(tier: str | None) -> bool | None:
        """The treatment's typical window is slower than the control's (True), is not (False), or too few windows
        to tell (None)."""
        if t.window_p95_ms is None or c.window_p95_ms is None:
            return True
        tw = t.window_p95_ms if tier is None else t.window_p95_ms_by_tier.get(tier, ())
        cw = c.window_p95_ms if tier is None else c.window_p95_ms_by_tier.get(tier, ())
        if len(tw) < p.min_latency_windows or len(cw) < p.min_latency_windows:
            return None
        return mann_whitney_greater(tw, cw) < p.latency_shift_p

    suspects: list[tuple[str | None, float, float, str]] = []
    if t.p95_ms_by_tier or c.p95_ms_by_tier:
        for name in sorted(set(t.p95_ms_by_tier) & set(c.p95_ms_by_tier)):
            tv, cv = t.p95_ms_by_tier[name], c.p95_ms_by_tier[name]
            if sampled(t, name) and sampled(c, name) and worse(tv, cv):
                suspects.append((name, tv, cv, f" on tier {name}"))
        # no tier in common (or none sampled enough): nothing comparable; the absolute budget still applies
    elif t.p95_ms is not None and c.p95_ms is not None and worse(t.p95_ms, c.p95_ms):
        suspects.append((None, t.p95_ms, c.p95_ms, ""))
    confirmed: list[str] = []
    pending: list[str] = []
    for tier, tv, cv, where in suspects:
        claim = f"p95 {tv:.2f} ms vs control {cv:.2f} ms{where} (> x{max_ratio})"
        r = replicated(tier, cv)
        if r is False:
            continue
        moved = shifted(tier)
        if moved is False:
            continue  # a few slow windows (a burst), while the typical window is as fast as the control's
        if r is True and moved is True:
            confirmed.append(claim)
        elif r is None:
            pending.append(f"{claim}, confirming in the later half of the wave's telemetry")
        else:
            pending.append(f"{claim}, confirming over at least {p.min_latency_windows} telemetry windows per cohort")
    return confirmed, pending


@dataclass(frozen=True)
class AccuracyVerdict:
    """Field accuracy against the control: confirmed drops (fail the wave), drops awaiting the later half of the
    treatment's telemetry (hold it, like a latency suspicion), and samples still short (it waits for them)."""

    dropped: tuple[str, ...] = ()
    confirming: tuple[str, ...] = ()
    short: tuple[str, ...] = ()


def field_accuracy_vs_control(t: CohortStats, c: CohortStats | None, p: RolloutPolicy) -> AccuracyVerdict:
    """The treatment's field accuracy against the control's, like for like: tier by tier where both cohorts carry
    tiers (the cohorts as a whole when neither does), on the tiers where both have ``field_accuracy_min_samples``
    matched feedback. A drop is an accuracy below ``min_field_accuracy_vs_control`` × the control's, over the whole
    treatment window and in each of its halves with that sample (ADR 0093's replication rule, as for latency): a
    drop in one half only is not a regression. Not judged without the knob or a control group."""
    ratio = p.min_field_accuracy_vs_control
    n = p.field_accuracy_min_samples
    if ratio is None or c is None:
        return AccuracyVerdict()

    def counts(x: CohortStats, tier: str | None) -> tuple[int, int]:
        return (x.feedback_matched, x.feedback_correct) if tier is None else x.feedback_by_tier.get(tier, (0, 0))

    tiers: list[str | None] = [None]
    if t.feedback_by_tier or c.feedback_by_tier:
        tiers = [*sorted(set(t.feedback_by_tier) & set(c.feedback_by_tier))]
    judged = False
    dropped: list[str] = []
    confirming: list[str] = []
    for tier in tiers:
        (tm, tc), (cm, cc) = counts(t, tier), counts(c, tier)
        if tm < n or cm < n:
            continue
        judged = True
        ta, ca = tc / tm, cc / cm
        if ta >= ca * ratio:
            continue
        where = "" if tier is None else f" on tier {tier}"
        claim = f"field accuracy {ta:.1%} vs control {ca:.1%}{where} (< x{ratio:g}, {tm} and {cm} labels)"
        known, replicated = True, True
        for h in t.halves or ():
            hm, hc = counts(h, tier)
            if hm < n:
                known = False
            elif hc / hm >= ca * ratio:
                replicated = False
        if not replicated:
            continue  # worse in one half only: a stretch of unusual inputs, not the version
        if known:
            dropped.append(claim)
        else:
            confirming.append(f"{claim}, confirming in the later half of the wave's telemetry")
    if judged:
        return AccuracyVerdict(tuple(dropped), tuple(confirming))
    have = ", ".join(f"{tier or 'all'}: {counts(t, tier)[0]} and {counts(c, tier)[0]}" for tier in tiers)
    have = have or "no tier with feedback in both cohorts"
    return AccuracyVerdict(
        short=(f"need {n} matched labels in both treatment and control to judge field accuracy, have {have}",)
    )


# --------------------------------------------------------------------------- the state machine step


class Action(StrEnum):
    wait = "wait"  # keep baking / collecting
    advance = "advance"  # move to the next wave
    complete = "complete"  # last wave passed
    pause = "pause"  # halt; an operator decides
    rollback = "rollback"  # halt and return every moved device to A


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    judgement: Judgement | None = field(default=None, compare=False)


def decide(
    *,
    state: RolloutState,
    wave: int,
    waves: Sequence[float],
    judgement: Judgement,
    baked_s: float,
    policy: RolloutPolicy,
) -> Decision:
    """The one step of a running rollout. ``baked_s`` is how long the current wave has run.

    * fail → rollback (auto_rollback) or pause, at once, whatever the bake time;
    * pass → advance (or complete on the last wave) once the bake time is over, else wait;
    * inconclusive → wait until the bake deadline (extended by ``max_confirm_s`` while a suspected regression
      is being confirmed, by ``max_sample_wait_s`` while the minimum sample is short), then pause.
    A wave never advances on anything but ``pass``."""
    if state is not RolloutState.running:
        return Decision(Action.wait, f"rollout is {state.value}", judgement)
    baked = baked_s >= policy.bake_s
    if judgement.outcome is Outcome.failed:
        act = Action.rollback if policy.auto_rollback else Action.pause
        return Decision(act, f"wave {wave} failed: {judgement.reason}", judgement)
    if judgement.outcome is Outcome.inconclusive:
        if judgement.confirming and baked and baked_s < policy.bake_s + policy.max_confirm_s:
            return Decision(Action.wait, f"wave {wave} bake extended: {judgement.reason}", judgement)
        if judgement.sampling and baked and baked_s < policy.bake_s + policy.max_sample_wait_s:
            return Decision(Action.wait, f"wave {wave} bake extended for its sample: {judgement.reason}", judgement)
        if baked:
            return Decision(Action.pause, f"wave {wave} inconclusive at bake deadline: {judgement.reason}", judgement)
        return Decision(Action.wait, f"wave {wave} inconclusive: {judgement.reason}", judgement)
    if not baked:
        return Decision(Action.wait, f"wave {wave} baking ({baked_s:.0f}/{policy.bake_s:.0f} s)", judgement)
    if wave >= len(waves) - 1:
        return Decision(Action.complete, f"last wave passed: {judgement.reason}", judgement)
    return Decision(Action.advance, f"wave {wave} passed: {judgement.reason}", judgement)


# --------------------------------------------------------------------------- what became of one update


class UpdateOutcome(StrEnum):
    committed = "committed"
    failed = "failed"  # refused or failed its health check: the version did not apply on the device
    rolled_back = "rolled_back"  # the device undid it on its own (probation, crash loop)
    reverted = "reverted"  # a rollout rollback changed the device's desired state: the control plane decided
    cancelled = "cancelled"  # abandoned because the desired state moved on for another reason


# Agents that predate the ``cancelled`` event report an abandoned update as a refusal or rollback with this reason.
_MOVED_ON = "desired state changed"


def is_cancellation(kind: str, reason: str | None) -> bool:
    """An event that records an update abandoned because the desired state moved on: no evidence against the
    version (and none for the compatibility matrix)."""
    return kind == "cancelled" or (
        kind in ("refused", "health_check_failed", "rolled_back") and reason is not None and _MOVED_ON in reason
    )


def update_outcome(events: Iterable[tuple[str, str | None]], *, reverted: bool) -> UpdateOutcome | None:
    """The one outcome of one update (a device × version × rollout) from its events ``(kind, reason)``, or None
    while it is in flight. A device's own failure outranks its commit; an update given up because the desired
    state moved on is the control plane's decision, never the device's failure (``reverted`` when a rollout
    rollback moved that device's desired state)."""
    kinds: set[str] = set()
    moved_on = False
    for kind, reason in events:
        if is_cancellation(kind, reason):
            moved_on = True
        else:
            kinds.add(kind)
    if kinds & {"refused", "health_check_failed"}:
        return UpdateOutcome.failed
    if "rolled_back" in kinds:
        return UpdateOutcome.rolled_back
    if "committed" in kinds:
        return UpdateOutcome.committed
    if reverted:
        return UpdateOutcome.reverted
    return UpdateOutcome.cancelled if moved_on else None


def outcome_counts(outcomes: Iterable[UpdateOutcome | None]) -> dict[str, int]:
    """``{committed, failed, rolled_back, reverted, cancelled}``: every kind present, in flight left out."""
    n = Counter(o for o in outcomes if o is not None)
    return {o.value: n.get(o, 0) for o in UpdateOutcome}


def success_rate(counts: Mapping[str, int]) -> float | None:
    """Committed over the updates the devices themselves finished: decisions of the control plane (reverted,
    cancelled) are neither successes nor failures of the version."""
    done = counts.get("committed", 0) + counts.get("failed", 0) + counts.get("rolled_back", 0)
    return counts.get("committed", 0) / done if done else None


def parse_percent(text: str) -> float:
    """``5%`` or ``0.05`` → 0.05."""
    t = text.strip()
    v = float(t[:-1]) / 100.0 if t.endswith("%") else float(t)
    if not 0 <= v <= 1 or math.isnan(v):
        raise ValueError(f"{text!r} is not a fraction in [0, 1] or a percentage")
    return v
