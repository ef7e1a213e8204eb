"""The rollout reconciler: a thin loop that gathers facts, calls the pure decisions of :mod:`rollout`, and writes
what they decide — every transition with its reason into ``rollout_transitions`` and the audit log.

Several replicas on PostgreSQL: each rollout row is taken with ``SELECT … FOR UPDATE SKIP LOCKED`` for the
length of one step (the row lock is the lease), so a rollout is stepped by one replica at a time and the others
move on; ``(rollout_id, seq)`` is unique as a second line of defence. On SQLite there is one writer process.

Each rollout steps in its own transaction: one that raises is logged with its id and keeps the error in
``rollouts.step_error`` (shown on the rollout) while the others go on. Waves are judged on the server's clock —
when events and windows were *received* — never on the devices' own timestamps (ADR 0094).
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from edgefleet.controlplane import agent_rollout, audit, compat, registry
from edgefleet.controlplane.agent_rollout import AGENT_MODEL, KIND_AGENT
from edgefleet.controlplane.assignments import (
    Held,
    Slot,
    additional_of,
    assigned,
    beside,
    held_by,
    memory_problem,
    move_for,
    served_version,
)
from edgefleet.controlplane.db import (
    Database,
    Device,
    DeviceGroup,
    ModelVersion,
    Rollout,
    RolloutDevice,
    RolloutTransition,
    TelemetryRow,
    UpdateEventRow,
    utcnow,
)
from edgefleet.controlplane.rollout import (
    OTHER_MODEL,
    Action,
    CohortStats,
    DeviceFacts,
    RolloutPlan,
    RolloutPolicy,
    RolloutState,
    UpdateOutcome,
    WindowFacts,
    blocked_reason,
    cohort_stats,
    decide,
    eligibility,
    judge,
    naive_utc,
    plan_rollout,
    plan_wave,
    rollback_targets,
    silent_devices,
    update_outcome,
    wave_bucket,
)
from edgefleet.controlplane.shadow import (
    ShadowAction,
    ShadowPolicy,
    ShadowWindow,
    TierShadow,
    choose_devices,
    judge_shadow,
    shadow_action,
    tier_stats,
)
from edgefleet.errors import ConflictError, NotFoundError
from edgefleet.protocol import ModelStatus, ServedModel, ShadowOrder
from edgefleet.telemetry.drift import DriftReference, DriftSummary
from edgefleet.telemetry.sketch import SketchData

if TYPE_CHECKING:
    from edgefleet.controlplane.store import Store

__all__ = [
    "StepResult",
    "drift_reference",
    "lock_rollout",
    "operator_action",
    "plan",
    "reconcile_once",
    "shadow_figures",
    "step",
    "transition",
]

log = logging.getLogger(__name__)

STEPPED = (RolloutState.running.value, RolloutState.blocked.value)
MAX_STEP_ERROR = 4000


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class StepResult:
    touched: set[str] = field(default_factory=set)
    transitions: list[str] = field(default_factory=list)


def transition(s: Session, r: Rollout, to: RolloutState, reason: str, actor: str, *, wave: int | None = None) -> str:
    frm = r.state
    r.seq += 1
    s.add(
        RolloutTransition(
            rollout_id=r.id,
            seq=r.seq,
            from_state=frm,
            to_state=to.value,
            wave=r.wave if wave is None else wave,
            reason=reason,
            actor=actor,
        )
    )
    r.state = to.value
    r.reason = reason
    r.updated_at = utcnow()
    audit.record(s, actor, "rollout.transition", r.id, from_state=frm, to_state=to.value, wave=r.wave, reason=reason)
    return f"{r.id}: {frm} -> {to.value} ({reason})"


def lock_rollout(s: Session, db: Database, rollout_id: str, *, skip_locked: bool) -> Rollout | None:
    q = select(Rollout).where(Rollout.id == rollout_id)
    if not db.is_sqlite:
        q = q.with_for_update(skip_locked=skip_locked)
    return s.scalar(q)


def _facts(s: Session, model: str, version: str, policy: RolloutPolicy) -> tuple[list[DeviceFacts], dict[str, Device]]:
    mv = registry.get_version(s, model, version)
    manifest = registry.manifest_of(mv)
    failed = compat.failed_cells(s, model, version, min_devices=policy.compat_fail_devices)
    groups = {g.name: g for g in s.scalars(select(DeviceGroup))}
    devs = {d.id: d for d in s.scalars(select(Device))}
    needs_mb = manifest.requirements.min_memory_mb if manifest is not None else None
    memory = _MemoryOf(s)
    out = []
    for d in devs.values():
        g = groups.get(d.group) if d.group else None
        problems = compat.device_problems(
            manifest,
            failed,
            tier=d.tier,
            runtime_version=d.runtime_version,
            memory_mb=d.memory_mb,
            runtimes=compat.device_runtimes(d),
        )
        extra = additional_of(d.desired_models)
        if d.desired_model not in (None, model) and not d.several_models:
            # its agent serves one model (it never declared more): a second one would replace, not join, it
            problems.append(f"{OTHER_MODEL} ({d.desired_model})")
        elif extra or d.desired_model not in (None, model):
            # several models share the device's memory: the new package's need and every other one's
            held = [(d.desired_model, d.desired_version)] if d.desired_model and d.desired_version else []
            others = beside((Held(m, v, memory(m, v)) for m, v in [*held, *extra.items()]), model)
            why = memory_problem(needs_mb, others, d.memory_mb)
            if why is not None:
                problems.append(why)
        # what the device is assigned of this model: its first model's version, or its additional assignment's
        mine = (model, extra[model]) if model in extra and d.desired_model != model else None
        out.append(
            DeviceFacts(
                device_id=d.id,
                tier=d.tier,
                runtime_version=d.runtime_version,
                memory_mb=d.memory_mb,
                channel=g.channel if g else "stable",
                pinned=bool(d.pinned_version or (g is not None and g.pinned_version)),
                revoked=d.revoked_at is not None,
                model=mine[0] if mine else d.desired_model,
                version=mine[1] if mine else d.desired_version,
                compat_problems=tuple(problems),
            )
        )
    return out, devs


class _MemoryOf:
    """The memory each (model, version) package declares it needs, read once per step."""

    def __init__(self, s: Session) -> None:
        self.s = s
        self.seen: dict[tuple[str, str], int | None] = {}

    def __call__(self, model: str, version: str) -> int | None:
        key = (model, version)
        if key not in self.seen:
            mv = self.s.scalar(select(ModelVersion).where(ModelVersion.model == model, ModelVersion.version == version))
            manifest = registry.manifest_of(mv) if mv is not None else None
            self.seen[key] = manifest.requirements.min_memory_mb if manifest is not None else None
        return self.seen[key]


def _serves(d: Device, model: str) -> str | None:
    """The version of ``model`` the device last reported serving, first or additional."""
    statuses = [ModelStatus.model_construct(**x) for x in d.reported_models or () if isinstance(x, dict)]
    return served_version(ServedModel(model=d.served_model, version=d.served_version), statuses, model)


def plan(
    s: Session,
    model: str,
    version: str,
    *,
    tier: str | None,
    channel: str | None,
    policy: RolloutPolicy,
    agent_platforms: frozenset[str] | None = None,
) -> RolloutPlan:
    """What a rollout of ``model`` ``version`` would move in each wave on today's fleet; moves nothing. ``model``
    :data:`~edgefleet.controlplane.agent_rollout.AGENT_MODEL` plans an agent rollout (``agent_platforms``: the
    platforms its bundle is published for)."""
    if model == AGENT_MODEL:
        facts, _ = agent_rollout.agent_facts(s, version, agent_platforms)
    else:
        facts, _ = _facts(s, model, version, policy)
    return plan_rollout(facts, model=model, version=version, waves=policy.waves, tier=tier, channel=channel)


def drift_reference(s: Session, model: str, version: str) -> DriftReference | None:
    """The package's drift reference as stored at upload, or None (a package without one, or unreadable)."""
    raw = s.scalar(
        select(ModelVersion.drift_reference).where(ModelVersion.model == model, ModelVersion.version == version)
    )
    if not raw:
        return None
    try:
        return DriftReference.model_validate(raw)
    except ValueError:
        return None


def _summaries(raw: object, keep: Iterable[str] | None = None) -> tuple[DriftSummary, ...]:
    """Stored drift summaries without re-validating them (the report route validated them on arrival); those of
    features outside ``keep`` are left out."""
    if not isinstance(raw, list):
        return ()
    wanted = None if keep is None else set(keep)
    return tuple(
        DriftSummary.model_construct(
            feature=str(x.get("feature")), psi=x.get("psi", 0.0), n=x.get("n", 0), counts=list(x.get("counts") or [])
        )
        for x in raw
        if isinstance(x, dict) and (wanted is None or x.get("feature") in wanted)
    )


def _same_bins(a: DriftReference, b: DriftReference) -> set[str]:
    """Features binned identically in both references: only their counts can be merged."""
    theirs = {f.name: (f.kind, f.edges, f.categories) for f in b.features}
    return {f.name for f in a.features if theirs.get(f.name) == (f.kind, f.edges, f.categories)}


def window_facts(
    s: Session,
    ids: Iterable[str],
    since: datetime,
    version: str | None,
    *,
    same: bool,
    until: datetime | None = None,
    model: str | None = None,
    since_by_device: Mapping[str, datetime] | None = None,
    drift_features: Mapping[str | None, Iterable[str]] | None = None,
    by_served: bool = False,
    drift_of: tuple[str, str] | None = None,
) -> list[WindowFacts]:
    """Telemetry windows of ``ids`` received since ``since`` on ``version`` (``same``) or on any other version;
    the reconciler judges waves on them and the dashboard shows the same figures. With ``since_by_device``, a
    device counts only with windows received at or after its own start time, and a device missing from it not at
    all. ``drift_features`` names, per window version, the features whose counts can be merged (None: all).

    With ``by_served`` (an agent rollout) windows of every version count, each labelled with its tier and served
    model version (:func:`~edgefleet.controlplane.agent_rollout.stratum`), and only those of ``drift_of`` (model,
    version) keep their drift counts.

    Times are the server's (``received_at``): a device whose clock is off cannot move its windows out of (or
    into) a wave."""
    ids = list(ids)
    if not ids:
        return []
    q = select(TelemetryRow).where(TelemetryRow.device_id.in_(ids), TelemetryRow.received_at >= since)
    if until is not None:
        q = q.where(TelemetryRow.received_at <= until)
    if model is not None:
        q = q.where(TelemetryRow.model == model)
    if not by_served:
        q = q.where(TelemetryRow.version == version) if same else q.where(TelemetryRow.version != version)

    def drift(w: TelemetryRow) -> tuple[DriftSummary, ...]:
        if by_served:
            return _summaries(w.drift) if drift_of is not None and (w.model, w.version) == drift_of else ()
        return _summaries(w.drift, None if drift_features is None else drift_features.get(w.version, ()))

    return [
        WindowFacts(
            device_id=w.device_id,
            requests=w.requests,
            errors=w.errors,
            crashes=w.worker_crashes,
            latency=SketchData.model_validate(w.latency) if w.latency else SketchData(),
            tier=agent_rollout.stratum(w.tier, w.model, w.version) if by_served else w.tier,
            end=naive_utc(w.received_at).replace(tzinfo=UTC).timestamp(),
            drift=drift(w),
            feedback_matched=int((w.feedback or {}).get("matched", 0)),
            feedback_correct=int((w.feedback or {}).get("correct", 0)),
        )
        for w in s.scalars(q)
        if since_by_device is None
        or (w.device_id in since_by_device and naive_utc(w.received_at) >= naive_utc(since_by_device[w.device_id]))
    ]


def _revert(s: Session, r: Rollout, now: datetime) -> set[str]:
    """Give every device the rollout moved, and still holds, back its previous desired state; returns their ids.

    A few UPDATE statements per 5,000 devices (one per distinct previous version), not an ORM object each: loading
    and flushing one per device cost 2.7 s of a 4.3 s rollback of 10,000 devices on PostgreSQL
    (benchmarks/nudge_latency.py), and every device of the rollout waits for it to learn it."""
    rows = s.execute(
        select(
            RolloutDevice.device_id,
            RolloutDevice.reverted,
            RolloutDevice.previous_model,
            RolloutDevice.previous_version,
        ).where(RolloutDevice.rollout_id == r.id)
    ).all()
    previous = {x.device_id: (x.previous_model, x.previous_version) for x in rows}
    targets = rollback_targets((x.device_id, x.reverted) for x in rows)
    agent = r.kind == KIND_AGENT
    held = Device.desired_agent_rollout_id if agent else Device.desired_rollout_id
    touched: set[str] = set()
    sync = {"synchronize_session": "evaluate"}  # objects this session already holds see the change
    for k in range(0, len(targets), 5000):  # under SQLite's limit on bound parameters
        chunk = targets[k : k + 5000]
        mine = list(s.scalars(select(Device.id).where(Device.id.in_(chunk), held == r.id)))
        by_previous: dict[tuple[str | None, str | None], list[str]] = {}
        for device_id in mine:
            by_previous.setdefault(previous[device_id], []).append(device_id)
        for (model, version), ids in by_previous.items():
            # an agent rollout: the agent version the device reported when moved, held over its group's document
            values: dict[str, object] = (
                {"desired_agent_version": version}
                if agent
                else {"desired_model": model, "desired_version": version, "desired_rollout_id": None}
            )
            s.execute(
                update(Device).where(Device.id.in_(ids)).values(**values, changed_at=now).execution_options(**sync)
            )
        touched.update(mine)
        if not agent:
            touched.update(_revert_additional(s, r, chunk, previous, now))
        s.execute(
            update(RolloutDevice)
            .where(RolloutDevice.rollout_id == r.id, RolloutDevice.device_id.in_(chunk))
            .values(reverted=True)
            .execution_options(**sync)
        )
    r.rolled_back_at = now
    return touched


def _revert_additional(
    s: Session, r: Rollout, ids: list[str], previous: Mapping[str, tuple[str | None, str | None]], now: datetime
) -> set[str]:
    """The additional assignments of ``r.model`` that ``r`` set on ``ids`` and still holds, returned to the version
    each device had before (removed where it had none); returns their ids. One object per device: only devices
    with additional models are loaded."""
    out: set[str] = set()
    q = select(Device).where(Device.id.in_(ids), Device.desired_models.is_not(None))
    for d in s.scalars(q):
        if held_by(d.desired_models, r.model) != r.id or d.desired_model == r.model:
            continue
        d.desired_models = assigned(d.desired_models, r.model, previous[d.id][1], None) or None
        d.changed_at = now
        out.add(d.id)
    return out


def baked_seconds(
    s: Session, r: Rollout, moved: Mapping[str, RolloutDevice], already_serving: Iterable[str], now: datetime
) -> float:
    """How long the current wave has baked: from its first device's switch (commit) on, not from the move — a device
    may hold the update for its maintenance window (docs/agent.md), and a wave whose devices all wait has not
    begun to show anything. A device that already served the version switched when the wave started; 0 while no
    device of the wave has switched (failures are judged at once all the same, and a silent device fails at the
    device timeout)."""
    wave = [d for d, row in moved.items() if row.wave == r.wave]
    if not wave or set(wave) & set(already_serving):
        return (now - r.wave_started_at).total_seconds()
    first = s.scalar(
        select(func.min(UpdateEventRow.received_at)).where(
            UpdateEventRow.model == r.model,
            UpdateEventRow.version == r.version,
            UpdateEventRow.kind == "committed",
            UpdateEventRow.device_id.in_(wave),
            UpdateEventRow.received_at >= r.wave_started_at,
            (UpdateEventRow.rollout_id == r.id) | UpdateEventRow.rollout_id.is_(None),
        )
    )
    if first is None:
        return 0.0
    return max(0.0, (naive_utc(now) - max(naive_utc(first), naive_utc(r.wave_started_at))).total_seconds())


def wave_cohorts(
    s: Session,
    r: Rollout,
    moved: Iterable[str],
    control_ids: Iterable[str],
    *,
    already_serving: Iterable[str] = (),
    until: datetime | None = None,
    device_timeout_s: float = 0.0,
) -> tuple[CohortStats, CohortStats | None]:
    """The treatment (``moved``) and the control (``control_ids``; None when empty) of a rollout as the reconciler
    judges them — the dashboard shows the same, with ``until`` for a past wave.

    The treatment counts in steady state, from each device's commit on: probation (a fresh worker, the update's own
    CPU load) is judged on the device, and what fails there arrives as an update failure. The control covers the
    same stretch of time (from the first commit on), so a host's or a network's load weighs on both cohorts alike
    instead of on whichever was measured later. ``already_serving`` devices had nothing to install and count as
    committed from the start. A moved device silent past ``device_timeout_s`` (judged at ``until``, or now) counts
    as failed (:func:`~edgefleet.controlplane.rollout.silent_devices`)."""
    moved, control_ids = set(moved), set(control_ids)
    # the server's receive time decides what belongs to the rollout; an event of another rollout of the same
    # version is not this one's evidence (events without a rollout id come from clients that send none)
    q = select(UpdateEventRow.device_id, UpdateEventRow.kind, UpdateEventRow.reason, UpdateEventRow.received_at).where(
        UpdateEventRow.model == r.model,
        UpdateEventRow.version == r.version,
        UpdateEventRow.received_at >= r.created_at,
        (UpdateEventRow.rollout_id == r.id) | UpdateEventRow.rollout_id.is_(None),
    )
    if until is not None:
        q = q.where(UpdateEventRow.received_at <= until)
    by_device: dict[str, list[tuple[str, str | None]]] = {}
    committed_at: dict[str, datetime] = {}
    for dev, kind, reason, at in s.execute(q.order_by(UpdateEventRow.received_at, UpdateEventRow.id)).all():
        if dev in moved:
            by_device.setdefault(dev, []).append((kind, reason))
            if kind == "committed":
                committed_at.setdefault(dev, at)
    outcomes = {dev: update_outcome(ev, reverted=False) for dev, ev in by_device.items()}
    for i in already_serving:
        committed_at.setdefault(i, r.created_at)
    failed = {dev for dev, o in outcomes.items() if o in (UpdateOutcome.failed, UpdateOutcome.rolled_back)}
    silent: set[str] = set()
    if device_timeout_s > 0 and moved:
        rows = s.execute(
            select(RolloutDevice.device_id, RolloutDevice.moved_at, Device.last_seen)
            .join(Device, Device.id == RolloutDevice.device_id)
            .where(RolloutDevice.rollout_id == r.id, RolloutDevice.device_id.in_(moved))
        ).all()
        known = {dev for dev, o in outcomes.items() if o is not None} | set(committed_at)
        silent = silent_devices(
            {dev: at for dev, at, _ in rows},
            {dev: seen for dev, _, seen in rows},
            known,
            now=until or utcnow(),
            timeout_s=device_timeout_s,
        )
        failed |= silent
    committed = set(committed_at) - failed
    if r.kind == KIND_AGENT:
        return _agent_cohorts(s, r, moved, control_ids, committed_at, committed, failed, silent, until)
    reference = drift_reference(s, r.model, r.version)
    treatment = cohort_stats(
        window_facts(
            s,
            moved,
            r.created_at,
            r.version,
            same=True,
            until=until,
            model=r.model,
            since_by_device={i: committed_at[i] for i in committed},
        ),
        devices=len(moved),
        committed=len(committed),
        failed=len(failed),
        reference=reference,
    )
    treatment = replace(treatment, silent=len(silent))
    control_since = min(committed_at.values(), key=naive_utc, default=r.created_at)
    comparable: dict[str | None, Iterable[str]] = {}
    if reference is not None and control_ids:
        # The control runs other versions, whose counts fall in their own references' bins: only features binned
        # exactly like the new version's are merged with the new version's reference.
        versions = s.scalars(
            select(TelemetryRow.version)
            .where(
                TelemetryRow.device_id.in_(control_ids),
                TelemetryRow.model == r.model,
                TelemetryRow.version != r.version,
                TelemetryRow.received_at >= control_since,
            )
            .distinct()
        )
        for v in versions:
            other = drift_reference(s, r.model, v) if v is not None else None
            comparable[v] = _same_bins(reference, other) if other is not None else set()
    control_windows = window_facts(
        s, control_ids, control_since, r.version, same=False, until=until, model=r.model, drift_features=comparable
    )
    control = cohort_stats(control_windows, devices=len(control_ids), reference=reference)
    return treatment, control if control_ids else None


def _agent_cohorts(
    s: Session,
    r: Rollout,
    moved: set[str],
    control_ids: set[str],
    committed_at: Mapping[str, datetime],
    committed: set[str],
    failed: set[str],
    silent: set[str],
    until: datetime | None,
) -> tuple[CohortStats, CohortStats | None]:
    """The telemetry side of :func:`wave_cohorts` for an agent rollout: every window of the served model, labelled
    by tier and served version, from each moved device's agent commit on; drift only when the treatment served one
    model version (docs of :mod:`~edgefleet.controlplane.agent_rollout`)."""
    served = s.execute(
        select(TelemetryRow.model, TelemetryRow.version)
        .where(
            TelemetryRow.device_id.in_(committed or {""}),
            TelemetryRow.received_at >= r.created_at,
            TelemetryRow.received_at <= (until or utcnow()),
        )
        .distinct()
    ).all()
    one = agent_rollout.single_served((m, v) for m, v in served)
    reference = drift_reference(s, *one) if one is not None else None
    drift_of = one if reference is not None else None
    treatment = cohort_stats(
        window_facts(
            s,
            moved,
            r.created_at,
            None,
            same=True,
            until=until,
            since_by_device={i: committed_at[i] for i in committed},
            by_served=True,
            drift_of=drift_of,
        ),
        devices=len(moved),
        committed=len(committed),
        failed=len(failed),
        reference=reference,
    )
    treatment = replace(treatment, silent=len(silent))
    control_since = min(committed_at.values(), key=naive_utc, default=r.created_at)
    control_windows = window_facts(
        s, control_ids, control_since, None, same=False, until=until, by_served=True, drift_of=drift_of
    )
    control = cohort_stats(control_windows, devices=len(control_ids), reference=reference)
    return treatment, control if control_ids else None


def step(
    s: Session,
    r: Rollout,
    actor: str,
    now: datetime | None = None,
    *,
    agent_bundles: Mapping[str, frozenset[str]] | None = None,
) -> StepResult:
    """One reconcile step of one running or blocked rollout (the caller holds the row lock). ``agent_bundles``
    (agent version → platforms published) restricts an agent rollout to devices its bundle is built for; None:
    not known, not checked."""
    now = now or utcnow()
    res = StepResult()
    if r.state not in STEPPED:
        return res
    policy = RolloutPolicy.model_validate(r.policy)
    agent = r.kind == KIND_AGENT
    if agent:
        platforms = agent_bundles.get(r.version, frozenset()) if agent_bundles is not None else None
        facts, devs = agent_rollout.agent_facts(s, r.version, platforms)
    else:
        facts, devs = _facts(s, r.model, r.version, policy)
    moved_rows = {x.device_id: x for x in s.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == r.id))}
    if not moved_rows:
        # Nothing moved yet and nobody to move: blocked, with the reason, until a device appears. Judging the
        # empty cohort would pass it vacuously and "complete" a rollout that reached no device.
        why = blocked_reason(facts, tier=r.tier, channel=r.channel)
        if why is not None:
            if r.state != RolloutState.blocked.value:
                res.transitions.append(transition(s, r, RolloutState.blocked, why, actor))
            elif r.reason != why:
                r.reason = why
            return res
    if r.state == RolloutState.blocked.value:
        r.wave_started_at = now  # the wave bakes from when it could first move a device
        res.transitions.append(transition(s, r, RolloutState.running, "unblocked: an eligible device appeared", actor))
    if policy.shadow is not None and not agent and not moved_rows and r.shadow_state in (None, "running"):
        _shadow_step(s, r, policy.shadow, facts, devs, actor, now, res)
        return res
    to_move = plan_wave(
        facts,
        model=r.model,
        version=r.version,
        wave=r.wave,
        waves=policy.waves,
        tier=r.tier,
        channel=r.channel,
        moved=moved_rows,
    )
    for device_id in to_move:
        d = devs[device_id]
        if agent:
            # a rollback returns the device to the agent it ran, not to whatever its group's document says then
            s.add(
                RolloutDevice(
                    rollout_id=r.id,
                    device_id=device_id,
                    wave=r.wave,
                    previous_model=AGENT_MODEL,
                    previous_version=d.agent_version or None,
                    moved_at=now,
                )
            )
            d.desired_agent_version, d.desired_agent_rollout_id = r.version, r.id
            d.changed_at = now
            res.touched.add(device_id)
            continue
        move = move_for(d.desired_model, d.desired_version, additional_of(d.desired_models), r.model)
        if move.slot is Slot.additional:
            # a model beside the device's first one: only its own assignment moves (a rollback returns it, or
            # removes it when the device had none)
            s.add(
                RolloutDevice(
                    rollout_id=r.id,
                    device_id=device_id,
                    wave=r.wave,
                    previous_model=r.model,
                    previous_version=move.previous_version,
                    moved_at=now,
                )
            )
            d.desired_models = assigned(d.desired_models, r.model, r.version, r.id) or None
            d.changed_at = now
            res.touched.add(device_id)
            continue
        s.add(
            RolloutDevice(
                rollout_id=r.id,
                device_id=device_id,
                wave=r.wave,
                previous_model=d.desired_model,
                previous_version=d.desired_version,
                moved_at=now,
            )
        )
        d.desired_model, d.desired_version, d.desired_rollout_id = r.model, r.version, r.id
        d.changed_at = now
        res.touched.add(device_id)
    if to_move:
        audit.record(s, actor, "rollout.move", r.id, wave=r.wave, devices=to_move)
        # Devices just moved have had no chance to act: judge from the next step on.
        r.reason = f"wave {r.wave}: moved {len(to_move)} device(s)"
        return res
    moved = set(moved_rows) | set(to_move)
    eligible = {f.device_id for f in facts if eligibility(f, tier=r.tier, channel=r.channel) is None}
    control_ids = eligible - moved

    # a device that already served the version when it was moved has nothing to install: it counts as committed
    if agent:
        already = {i for i in moved if i in moved_rows and moved_rows[i].previous_version == r.version}
    else:
        already = {i for i in moved if _serves(devs[i], r.model) == r.version}
    treatment, control = wave_cohorts(
        s, r, moved, control_ids, already_serving=already, device_timeout_s=policy.device_timeout_s
    )
    verdict = judge(treatment, control, policy)
    decision = decide(
        state=RolloutState(r.state),
        wave=r.wave,
        waves=policy.waves,
        judgement=verdict,
        baked_s=baked_seconds(s, r, moved_rows, already, now),
        policy=policy,
    )
    if decision.action is Action.wait:
        r.reason = decision.reason
    elif decision.action is Action.advance:
        r.wave += 1
        r.wave_started_at = now
        res.transitions.append(transition(s, r, RolloutState.running, decision.reason, actor, wave=r.wave))
    elif decision.action is Action.complete:
        r.completed_at = now
        res.transitions.append(transition(s, r, RolloutState.completed, decision.reason, actor))
    elif decision.action is Action.pause:
        r.halted_at, r.failed_wave_started_at = now, r.wave_started_at
        res.transitions.append(transition(s, r, RolloutState.paused, decision.reason, actor))
    elif decision.action is Action.rollback:
        r.halted_at, r.failed_wave_started_at = now, r.wave_started_at
        res.touched |= _revert(s, r, now)
        res.transitions.append(
            transition(s, r, RolloutState.rolled_back, f"automatic rollback: {decision.reason}", actor)
        )
    return res


def _shadow_step(
    s: Session,
    r: Rollout,
    sp: ShadowPolicy,
    facts: list[DeviceFacts],
    devs: Mapping[str, Device],
    actor: str,
    now: datetime,
    res: StepResult,
) -> None:
    """The shadow phase of a rollout that has moved no device yet (controlplane/shadow.py): order it on a few
    devices of each tier, then judge their shadow windows each step until it passes (wave 0 starts) or halts the
    rollout (paused, with the agreement figures) — before any device serves the candidate."""
    if r.shadow_state is None:
        eligible = [
            (f.device_id, f.tier)
            for f in facts
            if eligibility(f, tier=r.tier, channel=r.channel) is None
            and (f.model, f.version) != (r.model, r.version)
            # the candidate is compared with the served model: only where it would replace the first one
            and devs[f.device_id].desired_model in (None, r.model)
        ]
        chosen = choose_devices(eligible, sp.percent, wave_bucket)
        mv = registry.get_version(s, r.model, r.version)
        order = ShadowOrder(
            rollout_id=r.id,
            model=r.model,
            version=r.version,
            target=mv.target,
            package_sha256=mv.package_sha256,
            rate_per_s=sp.rate_per_s,
            cpu_share=sp.cpu_share,
        ).model_dump(mode="json")
        for device_id in chosen:
            devs[device_id].desired_shadow = order
            devs[device_id].changed_at = now
            res.touched.add(device_id)
        r.shadow_state, r.shadow_started_at = "running", now
        audit.record(s, actor, "rollout.shadow", r.id, devices=chosen)
        r.reason = f"shadow phase: {len(chosen)} device(s) evaluate {r.version} on mirrored requests"
        return
    started = r.shadow_started_at or now
    holders = [i for i, d in devs.items() if (d.desired_shadow or {}).get("rollout_id") == r.id]
    by_tier = Counter(devs[i].tier for i in holders)
    tiers = tier_stats(shadow_windows(s, r, until=now), by_tier, _epoch(started), _epoch(now))
    action, why = shadow_action(judge_shadow(tiers, sp), (naive_utc(now) - naive_utc(started)).total_seconds(), sp)
    if action is ShadowAction.wait:
        r.reason = why
        return
    res.touched |= end_shadow(devs.values(), r.id, now)
    if action is ShadowAction.start_canary:
        r.shadow_state = "passed"
        r.wave_started_at = now
        res.transitions.append(transition(s, r, RolloutState.running, why, actor))
    else:
        r.shadow_state = "failed"
        r.halted_at = now
        res.transitions.append(transition(s, r, RolloutState.paused, why, actor))


def _epoch(t: datetime) -> float:
    return naive_utc(t).replace(tzinfo=UTC).timestamp()


def end_shadow(devices: Iterable[Device], rollout_id: str, now: datetime) -> set[str]:
    """Withdraw a rollout's shadow order from every device that holds it; returns their ids."""
    out = set()
    for d in devices:
        if (d.desired_shadow or {}).get("rollout_id") == rollout_id:
            d.desired_shadow = None
            d.changed_at = now
            out.add(d.id)
    return out


def shadow_windows(s: Session, r: Rollout, *, until: datetime | None = None) -> list[ShadowWindow]:
    """The shadow counts of a rollout's phase, one per telemetry window received since it started (server time)."""
    if r.shadow_started_at is None:
        return []
    q = select(TelemetryRow).where(
        TelemetryRow.received_at >= r.shadow_started_at,
        TelemetryRow.model == r.model,
        TelemetryRow.shadow.is_not(None),
    )
    if until is not None:
        q = q.where(TelemetryRow.received_at <= until)
    out = []
    for w in s.scalars(q):
        x = w.shadow or {}
        if x.get("rollout_id") != r.id:
            continue
        out.append(
            ShadowWindow(
                tier=w.tier,
                at=_epoch(w.received_at),
                compared=int(x.get("compared", 0)),
                agreed=int(x.get("agreed", 0)),
                errors=int(x.get("errors", 0)),
                dropped=int(x.get("dropped", 0)),
                latency=SketchData.model_validate(x["latency"]) if x.get("latency") else SketchData(),
                device_id=w.device_id,
            )
        )
    return out


def shadow_figures(s: Session, r: Rollout, now: datetime | None = None) -> list[TierShadow]:
    """Each tier's shadow figures of a rollout (the API and the dashboard): over the phase until it ended (or
    now), devices counted by the windows they sent."""
    if r.shadow_started_at is None:
        return []
    end = now or utcnow()
    if r.shadow_state in ("passed", "failed"):
        end = r.wave_started_at if r.shadow_state == "passed" else (r.halted_at or end)
    windows = shadow_windows(s, r, until=end)
    holders = [
        d.tier
        for d in s.scalars(select(Device).where(Device.desired_shadow.is_not(None)))
        if (d.desired_shadow or {}).get("rollout_id") == r.id
    ]
    by_tier = Counter(holders)
    return tier_stats(windows, by_tier, _epoch(r.shadow_started_at), _epoch(end))


def reconcile_once(store: Store, actor: str | None = None) -> list[str]:
    """Step every running or blocked rollout this process can lock, each in its own transaction: one whose step
    raises is rolled back, logged and marked with the error, and the others go on. Returns the transitions
    recorded."""
    actor = actor or f"reconciler:{owner_id()}"
    db = store.db
    with db.session() as s:
        rows = s.execute(
            select(Rollout.id, Rollout.kind).where(Rollout.state.in_(STEPPED)).order_by(Rollout.created_at)
        ).all()
    ids = [rid for rid, _ in rows]
    bundles = _agent_bundles(store) if any(kind == KIND_AGENT for _, kind in rows) else None
    out: list[str] = []
    for rid in ids:
        try:
            with db.session() as s:
                r = lock_rollout(s, db, rid, skip_locked=True)
                if r is None or r.state not in STEPPED:
                    continue  # another replica holds it, or it changed since we listed it
                r.lease_owner, r.lease_until = actor, utcnow()
                res = step(s, r, actor, agent_bundles=bundles)
                if r.step_error is not None:
                    r.step_error = None  # this step went through: the last one's error is history
        except Exception as exc:  # one rollout's bad data must not stall every other rollout
            first = (str(exc).splitlines() or [""])[0]
            log.error("rollout %s: step failed: %s: %s", rid, type(exc).__name__, first)
            _keep_step_error(store, rid, exc)
            continue
        store.refresh(res.touched)
        out.extend(res.transitions)
    return out


def _agent_bundles(store: Store) -> dict[str, frozenset[str]] | None:
    """The agent bundles the repository signs, version → platforms; None (not checked) when it cannot be read."""
    try:
        return agent_rollout.bundle_versions((t.name, t.custom) for t in store.repo.targets())
    except Exception as exc:  # a repository that cannot be read now must not stall the rollouts
        log.warning("agent rollouts: the repository's targets cannot be read: %s", exc)
        return None


def _keep_step_error(store: Store, rollout_id: str, exc: Exception) -> None:
    """Store the error on the rollout in a transaction of its own (the step's was rolled back)."""
    last = "".join(traceback.format_exception_only(exc)).strip()
    text = f"{utcnow().isoformat(timespec='seconds')}: {last}"[:MAX_STEP_ERROR]
    try:
        with store.db.session() as s:
            r = lock_rollout(s, store.db, rollout_id, skip_locked=True)
            if r is not None:
                r.step_error = text
    except Exception as again:  # the database itself is failing: the log line above is all there is
        log.error("rollout %s: could not record its step error: %s", rollout_id, again)


_ALLOWED: dict[str, tuple[set[str], RolloutState]] = {
    "pause": ({"running", "blocked"}, RolloutState.paused),
    "resume": ({"paused"}, RolloutState.running),
    "abort": ({"running", "paused", "blocked"}, RolloutState.aborted),
    "rollback": ({"running", "paused", "blocked", "completed"}, RolloutState.rolled_back),
}


def operator_action(
    store: Store, rollout_id: str, action: str, actor: str, reason: str | None = None
) -> dict[str, Any]:
    db = store.db
    touched: set[str] = set()
    with db.session() as s:
        r = lock_rollout(s, db, rollout_id, skip_locked=False)
        if r is None:
            raise NotFoundError(f"no rollout {rollout_id}: `edgefleet rollout list` shows them")
        allowed, to = _ALLOWED[action]
        if r.state not in allowed:
            raise ConflictError(f"cannot {action} rollout {rollout_id}: it is {r.state}")
        now = utcnow()
        why = reason or f"{action} by {actor}"
        if action == "pause":
            r.halted_at = now
        elif action == "resume":
            r.wave_started_at = now  # a resumed wave bakes afresh
        elif action == "rollback":
            r.halted_at = r.halted_at or now
            touched = _revert(s, r, now)
        if action in ("abort", "rollback") and r.shadow_state == "running":
            # a shadow phase ends with its rollout: the candidate leaves the devices' idle slots' workers
            holding = s.scalars(select(Device).where(Device.desired_shadow.is_not(None)))
            touched |= end_shadow(holding, r.id, now)
            r.shadow_state = "failed"
        transition(s, r, to, why, actor)
        result = {"rollout_id": r.id, "state": r.state, "reason": r.reason}
    store.refresh(touched)
    return result
