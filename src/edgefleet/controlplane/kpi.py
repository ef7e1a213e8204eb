"""Fleet KPIs: p95 per version and tier from merged sketches, crash-free rate, update success rate,
time to halt and to roll back each rollout, fragmentation index, drift alerts, overdue devices."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgefleet.controlplane.db import Device, Rollout, RolloutDevice, TelemetryRow, UpdateEventRow, utcnow
from edgefleet.telemetry.drift import PSI_ALERT
from edgefleet.telemetry.sketch import LatencySketch, SketchData

__all__ = ["fleet_kpis"]


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    return None if a is None or b is None else round((b - a).total_seconds(), 3)


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
    drift: dict[tuple[str, str, str], float] = {}
    for w in s.scalars(select(TelemetryRow).where(TelemetryRow.end >= since)):
        key = (w.model or "-", w.version or "-", w.tier)
        if w.latency and w.latency.get("count"):
            sketches[key].merge(LatencySketch.from_data(SketchData.model_validate(w.latency)))
        reqs[key] += w.requests
        errs[key] += w.errors
        reporting.add(w.device_id)
        if w.worker_crashes:
            crashed.add(w.device_id)
        for x in w.drift:
            if isinstance(x, dict) and float(x.get("psi", 0.0)) > PSI_ALERT:
                k = (w.model or "-", w.version or "-", str(x.get("feature")))
                drift[k] = max(drift.get(k, 0.0), float(x["psi"]))
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

    kinds = dict(
        s.execute(
            select(UpdateEventRow.kind, func.count()).where(UpdateEventRow.at >= since).group_by(UpdateEventRow.kind)
        ).all()
    )
    ok = int(kinds.get("committed", 0))
    bad = sum(int(kinds.get(k, 0)) for k in ("rolled_back", "health_check_failed", "refused"))

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
        "update_success_rate": round(ok / (ok + bad), 5) if ok + bad else None,
        "updates": {"committed": ok, "failed": bad},
        "fragmentation": {t: len(v) for t, v in sorted(per_tier.items())},
        "fragmentation_index": max((len(v) for v in per_tier.values()), default=0),
        "drift_alerts": [
            {"model": m, "version": v, "feature": f, "psi": round(p, 4)} for (m, v, f), p in sorted(drift.items())
        ],
        "rollouts": rollouts,
    }
