"""Fleet KPIs: p95 per version and tier from merged sketches, crash-free rate, update outcomes and success rate,
time to halt and to roll back each rollout, fragmentation index, fleet drift per feature, overdue devices.

Every period is on the server's clock (``received_at``): a device whose clock is off cannot move its reports in or
out of the last 24 hours. Drift is scored on the fleet's merged per-bin counts against the package's reference;
a feature short of the minimum sample has no figure ("not enough data"), never 0.

Latency, errors and drift are read from the rollups (``rollups.read``: whole 5-minute buckets, so a 24-hour period
reads up to 24 h 5 min), the crash-free rate from each device's latest window and crash times, the rest with SQL
counts: a request costs the same dozen queries whatever the number of devices (docs/adr/0042).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from edgefleet.controlplane import field_accuracy, rollups
from edgefleet.controlplane.db import Device, ModelVersion, Rollout, RolloutDevice, UpdateEventRow, utcnow
from edgefleet.controlplane.rollout import outcome_counts, success_rate, update_outcome
from edgefleet.telemetry.drift import MIN_DRIFT_SAMPLE, PSI_ALERT, DriftReference, fleet_psi

__all__ = ["drift_rows", "fleet_kpis", "update_counts"]

NOT_ENOUGH_DATA = "not enough data"
# overdue devices listed by id in the KPIs (all of them are counted)
OVERDUE_IDS_MAX = 100


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    return None if a is None or b is None else round((b - a).total_seconds(), 3)


def update_counts(s: Session, since: datetime) -> dict[str, int]:
    """Updates whose events arrived since ``since``, each device × version × rollout counted once by its outcome
    (``rollout.update_outcome``); ``reverted`` where a rollout rollback moved that device's desired state."""
    reverted = {
        (x.rollout_id, x.device_id) for x in s.scalars(select(RolloutDevice).where(RolloutDevice.reverted.is_(True)))
    }
    updates: dict[tuple[str, str | None, str | None, str | None], list[tuple[str, str | None]]] = defaultdict(list)
    rows = s.execute(
        select(
            UpdateEventRow.device_id,
            UpdateEventRow.model,
            UpdateEventRow.version,
            UpdateEventRow.rollout_id,
            UpdateEventRow.kind,
            UpdateEventRow.reason,
        ).where(UpdateEventRow.received_at >= since)
    )
    for dev, model, version, rollout_id, kind, reason in rows:
        updates[(dev, model, version, rollout_id)].append((kind, reason))
    return outcome_counts(update_outcome(ev, reverted=(key[3], key[0]) in reverted) for key, ev in updates.items())


def _reference(raw: Any) -> DriftReference | None:
    try:
        return DriftReference.model_validate(raw) if raw else None
    except ValueError:
        return None


def drift_rows(
    s: Session,
    since: datetime,
    *,
    min_sample: int = MIN_DRIFT_SAMPLE,
    merged: dict[tuple[str, str], Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per (model, version, feature) of every version with a drift reference and telemetry since ``since``:
    the PSI of the fleet's merged counts, or None with ``status`` "not enough data" below ``min_sample`` calls.
    ``merged``: the rollups' drift counts of the period, when the caller has read them already."""
    refs = {
        (mv.model, mv.version): ref
        for mv in s.scalars(select(ModelVersion).where(ModelVersion.drift_reference.is_not(None)))
        if (ref := _reference(mv.drift_reference)) is not None
    }
    if not refs:
        return []
    if merged is None:
        merged = rollups.read(s, since)[1]
    out = []
    for (model, version), by_feature in sorted(merged.items()):
        ref = refs.get((model, version))
        if ref is None:
            continue
        # counts of the reference's bin count only: another package's bins are never guessed into place
        counts = {
            f.name: got
            for f in ref.features
            if (got := (by_feature.get(f.name) or {}).get(str(len(f.counts)))) is not None
        }
        if not counts:
            continue
        for feature, value in fleet_psi(ref, counts, min_sample=min_sample).items():
            n = round(sum(counts.get(feature, ())))
            status = NOT_ENOUGH_DATA if value is None else ("alert" if value > PSI_ALERT else "ok")
            out.append(
                {
                    "model": model,
                    "version": version,
                    "feature": feature,
                    "psi": None if value is None else round(value, 4),
                    "n": n,
                    "status": status,
                }
            )
    return out


def _rollout_rows(s: Session) -> list[dict[str, Any]]:
    """Every rollout with its moved and restored devices counted by SQL (one query for all rollouts)."""
    restored = and_(RolloutDevice.reverted.is_(True), Device.served_version == RolloutDevice.previous_version)
    moved = {
        rid: (int(n), int(back or 0))
        for rid, n, back in s.execute(
            select(RolloutDevice.rollout_id, func.count(), func.sum(case((restored, 1), else_=0)))
            .join(Device, Device.id == RolloutDevice.device_id, isouter=True)
            .group_by(RolloutDevice.rollout_id)
        )
    }
    return [
        {
            "rollout_id": r.id,
            "model": r.model,
            "version": r.version,
            "state": r.state,
            "wave": r.wave,
            "devices_moved": moved.get(r.id, (0, 0))[0],
            # halt: from the start of the wave that failed to the pause; rollback: to the desired-state revert
            "time_to_halt_s": _seconds(r.failed_wave_started_at, r.halted_at),
            "time_to_rollback_s": _seconds(r.failed_wave_started_at, r.rolled_back_at),
            "devices_restored": moved.get(r.id, (0, 0))[1],
            "step_error": r.step_error,
        }
        for r in s.scalars(select(Rollout).order_by(Rollout.created_at))
    ]


def fleet_kpis(s: Session, *, overdue_after_s: float, window_s: float = 86_400.0) -> dict[str, Any]:
    now = utcnow()
    since = now - timedelta(seconds=window_s)
    stale = now - timedelta(seconds=overdue_after_s)
    active = Device.revoked_at.is_(None)
    overdue = and_(active, (Device.last_seen.is_(None)) | (Device.last_seen < stale))
    total, n_active, n_overdue, reporting, crashed = s.execute(
        select(
            func.count(),
            func.sum(case((active, 1), else_=0)),
            func.sum(case((overdue, 1), else_=0)),
            func.sum(case((Device.last_window_at >= since, 1), else_=0)),
            func.sum(case((Device.last_crash_at >= since, 1), else_=0)),
        ).select_from(Device)
    ).one()
    total, n_active, n_overdue = int(total or 0), int(n_active or 0), int(n_overdue or 0)
    reporting, crashed = int(reporting or 0), int(crashed or 0)
    # the first ids only: the count is exact, the list a pointer for the operator (`devices list` has them all)
    overdue_ids = list(s.scalars(select(Device.id).where(overdue).order_by(Device.id).limit(OVERDUE_IDS_MAX)))

    totals, merged_drift = rollups.read(s, since)
    latency = []
    for (m, v, t), x in sorted(totals.items()):
        q = x.sketch.quantile(0.95)
        latency.append(
            {
                "model": m or "-",
                "version": v or "-",
                "tier": t,
                "p95_ms": None if q is None else round(q * 1000, 3),
                "requests": x.requests,
                "error_rate": round(x.errors / x.requests, 5) if x.requests else None,
            }
        )
    updates = update_counts(s, since)
    rate = success_rate(updates)
    drift = drift_rows(s, since, merged=merged_drift)

    per_tier: dict[str, int] = defaultdict(int)
    for tier, _n in s.execute(
        select(Device.tier, func.count())
        .where(active, Device.served_version.is_not(None))
        .group_by(Device.tier, Device.served_model, Device.served_version)
    ):
        per_tier[tier] += 1
    return {
        "at": now.isoformat(),
        "devices": {
            "total": total,
            "active": n_active,
            "revoked": total - n_active,
            "overdue": n_overdue,
            "overdue_ids": overdue_ids,
        },
        "latency": latency,
        "crash_free_rate": round(1 - crashed / reporting, 5) if reporting else None,
        # committed over the updates devices finished themselves: reverted and cancelled updates were the
        # control plane's decisions, not failures of the version
        "update_success_rate": None if rate is None else round(rate, 5),
        "updates": updates,
        "fragmentation": dict(sorted(per_tier.items())),
        "fragmentation_index": max(per_tier.values(), default=0),
        "drift": drift,
        "drift_alerts": [
            {"model": x["model"], "version": x["version"], "feature": x["feature"], "psi": x["psi"]}
            for x in drift
            if x["status"] == "alert"
        ],
        "rollouts": _rollout_rows(s),
        "field_accuracy": field_accuracy.rows(s, since),
    }
