"""Fleet KPIs: p95 per version and tier from merged sketches, crash-free rate, update outcomes and success rate,
time to halt and to roll back each rollout, fragmentation index, fleet drift per feature, overdue devices.

Every period is on the server's clock (``received_at``): a device whose clock is off cannot move its reports in or
out of the last 24 hours. Drift is scored on the fleet's merged per-bin counts against the package's reference;
a feature short of the minimum sample has no figure ("not enough data"), never 0.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.controlplane.db import (
    Device,
    ModelVersion,
    Rollout,
    RolloutDevice,
    TelemetryRow,
    UpdateEventRow,
    utcnow,
)
from edgefleet.controlplane.rollout import outcome_counts, success_rate, update_outcome
from edgefleet.telemetry.drift import MIN_DRIFT_SAMPLE, PSI_ALERT, DriftReference, DriftSummary, fleet_psi, merge_counts
from edgefleet.telemetry.sketch import LatencySketch, SketchData

__all__ = ["drift_rows", "fleet_kpis", "update_counts"]

NOT_ENOUGH_DATA = "not enough data"


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


def drift_rows(s: Session, since: datetime, *, min_sample: int = MIN_DRIFT_SAMPLE) -> list[dict[str, Any]]:
    """One row per (model, version, feature) of every version with a drift reference and telemetry since ``since``:
    the PSI of the fleet's merged counts, or None with ``status`` "not enough data" below ``min_sample`` calls."""
    refs = {
        (mv.model, mv.version): ref
        for mv in s.scalars(select(ModelVersion).where(ModelVersion.drift_reference.is_not(None)))
        if (ref := _reference(mv.drift_reference)) is not None
    }
    if not refs:
        return []
    summaries: dict[tuple[str, str], list[DriftSummary]] = defaultdict(list)
    rows = s.execute(
        select(TelemetryRow.model, TelemetryRow.version, TelemetryRow.drift).where(TelemetryRow.received_at >= since)
    )
    for model, version, drift in rows:
        if (model, version) not in refs or not isinstance(drift, list):
            continue
        summaries[(model, version)].extend(
            DriftSummary.model_construct(
                feature=str(x.get("feature")), psi=x.get("psi", 0.0), n=x.get("n", 0), counts=x.get("counts") or []
            )
            for x in drift
            if isinstance(x, dict)
        )
    out = []
    for (model, version), got in sorted(summaries.items()):
        ref = refs[(model, version)]
        merged = merge_counts(got, ref)
        for feature, value in fleet_psi(ref, merged, min_sample=min_sample).items():
            n = round(sum(merged.get(feature, ())))
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


def fleet_kpis(s: Session, *, overdue_after_s: float, window_s: float = 86_400.0) -> dict[str, Any]:
    now = utcnow()
    since = now - timedelta(seconds=window_s)
    devices = list(s.scalars(select(Device)))
    active = [d for d in devices if d.revoked_at is None]
    overdue = [d.id for d in active if d.last_seen is None or (now - d.last_seen).total_seconds() > overdue_after_s]

    sketches: dict[tuple[str, str, str], LatencySketch] = defaultdict(LatencySketch)
    reqs: dict[tuple[str, str, str], int] = defaultdict(int)
    errs: dict[tuple[str, str, str], int] = defaultdict(int)
    reporting: set[str] = set()
    crashed: set[str] = set()
    for w in s.scalars(select(TelemetryRow).where(TelemetryRow.received_at >= since)):
        key = (w.model or "-", w.version or "-", w.tier)
        if w.latency and w.latency.get("count"):
            sketches[key].merge(LatencySketch.from_data(SketchData.model_validate(w.latency)))
        reqs[key] += w.requests
        errs[key] += w.errors
        reporting.add(w.device_id)
        if w.worker_crashes:
            crashed.add(w.device_id)
    latency = [
        {
            "model": m,
            "version": v,
            "tier": t,
            "p95_ms": None if (q := sketches[(m, v, t)].quantile(0.95)) is None else round(q * 1000, 3),
            "requests": reqs[(m, v, t)],
            "error_rate": round(errs[(m, v, t)] / reqs[(m, v, t)], 5) if reqs[(m, v, t)] else None,
        }
        for (m, v, t) in sorted(reqs)
    ]
    updates = update_counts(s, since)
    rate = success_rate(updates)
    drift = drift_rows(s, since)

    per_tier: dict[str, set[str]] = defaultdict(set)
    for d in active:
        if d.served_version:
            per_tier[d.tier].add(f"{d.served_model}:{d.served_version}")
    rollouts = []
    for r in s.scalars(select(Rollout).order_by(Rollout.created_at)):
        moved = list(s.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == r.id)))
        restored = 0
        for x in moved:
            if x.reverted:
                dev = s.get(Device, x.device_id)
                restored += int(dev is not None and dev.served_version == x.previous_version)
        rollouts.append(
            {
                "rollout_id": r.id,
                "model": r.model,
                "version": r.version,
                "state": r.state,
                "wave": r.wave,
                "devices_moved": len(moved),
                # halt: from the start of the wave that failed to the pause; rollback: to the desired-state revert
                "time_to_halt_s": _seconds(r.failed_wave_started_at, r.halted_at),
                "time_to_rollback_s": _seconds(r.failed_wave_started_at, r.rolled_back_at),
                "devices_restored": restored,
                "step_error": r.step_error,
            }
        )
    return {
        "at": now.isoformat(),
        "devices": {
            "total": len(devices),
            "active": len(active),
            "revoked": len(devices) - len(active),
            "overdue": len(overdue),
            "overdue_ids": overdue,
        },
        "latency": latency,
        "crash_free_rate": round(1 - len(crashed) / len(reporting), 5) if reporting else None,
        # committed over the updates devices finished themselves: reverted and cancelled updates were the
        # control plane's decisions, not failures of the version
        "update_success_rate": None if rate is None else round(rate, 5),
        "updates": updates,
        "fragmentation": {t: len(v) for t, v in sorted(per_tier.items())},
        "fragmentation_index": max((len(v) for v in per_tier.values()), default=0),
        "drift": drift,
        "drift_alerts": [
            {"model": x["model"], "version": x["version"], "feature": x["feature"], "psi": x["psi"]}
            for x in drift
            if x["status"] == "alert"
        ],
        "rollouts": rollouts,
    }
