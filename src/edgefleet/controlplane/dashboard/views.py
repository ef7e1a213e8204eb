"""What each dashboard page shows, gathered from the control plane's own query functions.

The figures come from the same code as the API (``kpi.fleet_kpis``, ``registry``, ``compat.matrix``,
``api.rollouts.rollout_dict``, ``devices.device_dict``), so the page and ``/api/v1/...`` cannot disagree. What the
API has no endpoint for — p95 over time, per-wave canary-vs-control figures — is computed here with the same pure
functions the reconciler uses (``rollout.cohort_stats``, ``rollout.judge``, merged DDSketches).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgefleet.controlplane import audit, compat, crashes, devices, kpi, registry, rollups, samples
from edgefleet.controlplane.agent_rollout import KIND_AGENT
from edgefleet.controlplane.dashboard.charts import Series
from edgefleet.controlplane.db import (
    Device,
    ModelVersion,
    Rollout,
    RolloutDevice,
    RolloutTransition,
    TelemetryRow,
    UpdateEventRow,
    utcnow,
)
from edgefleet.controlplane.devices import CLOCK_SKEW_S
from edgefleet.controlplane.reconciler import wave_cohorts
from edgefleet.controlplane.rollout import CohortStats, RolloutPolicy, judge
from edgefleet.errors import NotFoundError
from edgefleet.telemetry.drift import MIN_DRIFT_SAMPLE
from edgefleet.telemetry.sketch import LatencySketch, SketchData

__all__ = [
    "LatencyPoint",
    "device_page",
    "latency_series",
    "model_page",
    "overview_page",
    "rollout_page",
    "state_label",
    "wave_metrics",
]

NO_REPORT = "no report yet"


def state_label(state: str | None) -> str:
    return state or NO_REPORT


@dataclass(frozen=True)
class LatencyPoint:
    """One telemetry window, reduced to what the latency chart needs."""

    end: datetime
    label: str
    sketch: SketchData


def latency_series(points: Iterable[LatencyPoint], *, buckets: int = 30) -> list[Series]:
    """p95 (ms) per label over time: windows fall into equal time buckets between the first and the last window
    end, and each bucket's p95 comes from the merged sketches of its windows (never an average of p95s)."""
    pts = [p for p in points if p.sketch.count]
    if not pts:
        return []
    t0 = min(p.end for p in pts)
    t1 = max(p.end for p in pts)
    span = (t1 - t0).total_seconds()
    n = max(1, buckets if span > 0 else 1)
    width = span / n if span > 0 else 1.0
    merged: dict[str, dict[int, LatencySketch]] = defaultdict(dict)
    for p in pts:
        i = min(n - 1, int((p.end - t0).total_seconds() / width)) if span > 0 else 0
        sk = merged[p.label].setdefault(i, LatencySketch())
        sk.merge(LatencySketch.from_data(p.sketch))
    out = []
    for label in sorted(merged):
        row: list[tuple[datetime, float | None]] = []
        for i in range(n):
            got = merged[label].get(i)
            q = got.quantile(0.95) if got is not None else None
            # each bucket is drawn at its right edge: the time by which its windows had ended
            row.append((t0 + timedelta(seconds=width * (i + 1) if span > 0 else 0), None if q is None else q * 1000))
        out.append(Series(label, row))
    return out


def _version_label(model: str | None, version: str | None) -> str:
    return f"{model}:{version}" if model and version else "none"


# ------------------------------------------------------------------------------------------------ overview


def overview_page(s: Session, *, overdue_after_s: float, window_s: float = 86_400.0) -> dict[str, Any]:
    k = kpi.fleet_kpis(s, overdue_after_s=overdue_after_s, window_s=window_s)
    by_tier_state: dict[str, Counter[str]] = defaultdict(Counter)
    by_tier_version: dict[str, Counter[str]] = defaultdict(Counter)
    # counted by the database: the page costs the same queries whatever the number of devices
    for tier, state, model, version, n in s.execute(
        select(Device.tier, Device.state, Device.served_model, Device.served_version, func.count())
        .where(Device.revoked_at.is_(None))
        .group_by(Device.tier, Device.state, Device.served_model, Device.served_version)
    ):
        by_tier_state[tier][state_label(state)] += n
        by_tier_version[tier][_version_label(model, version)] += n
    states = sorted({st for c in by_tier_state.values() for st in c})
    versions = sorted({v for c in by_tier_version.values() for v in c})
    # one point per 5-minute rollup row (placed at its bucket's end, on the server's clock), never per window
    points = [
        LatencyPoint(at, f"{_version_label(m or None, v or None)} · {t}", SketchData.model_validate(lat))
        for at, m, v, t, lat in rollups.latency_points(s, utcnow() - timedelta(seconds=window_s))
    ]
    overdue = [
        {"device_id": d.id, "tier": d.tier, "last_seen": d.last_seen.isoformat() if d.last_seen else None}
        for d in s.scalars(select(Device).where(Device.id.in_(k["devices"]["overdue_ids"])).order_by(Device.id))
    ]
    rollouts = [r for r in rollouts_index(s) if r["state"] in ("running", "paused", "blocked", "draft")]
    recent = list(reversed(k["rollouts"]))[:10]
    return {
        "kpi": k,
        "tiers": sorted(by_tier_state),
        "states": states,
        "by_tier_state": {t: dict(c) for t, c in by_tier_state.items()},
        "versions": versions,
        "by_tier_version": {t: dict(c) for t, c in by_tier_version.items()},
        "tier_state_bars": [(t, dict(by_tier_state[t])) for t in sorted(by_tier_state)],
        "tier_version_bars": [(t, dict(by_tier_version[t])) for t in sorted(by_tier_version)],
        "latency_series": latency_series(points),
        "overdue": overdue,
        "active_rollouts": rollouts,
        "recent_rollouts": recent,
        "min_drift_sample": MIN_DRIFT_SAMPLE,
    }


# ------------------------------------------------------------------------------------------------ rollouts


def _cohort_dict(c: CohortStats) -> dict[str, Any]:
    return {
        "devices": c.devices,
        "committed": c.committed,
        "failed": c.failed,
        "reporting": c.reporting,
        "requests": c.requests,
        "crash_free_rate": c.crash_free_rate,
        "error_rate": c.error_rate,
        "p95_ms": c.p95_ms,
        "max_psi": c.max_psi,
        "drift_features": len(c.psi_by_feature),
    }


def wave_metrics(s: Session, r: Rollout, *, now: datetime | None = None) -> list[dict[str, Any]]:
    """Per wave: the canary (devices moved in this wave and before — the cohort the reconciler judges) against the
    control (devices of the rollout's model and tier filter it has not moved), over telemetry from the rollout's
    start to the end of the wave, and the judgement :func:`rollout.judge` gives on those figures."""
    now = now or utcnow()
    policy = RolloutPolicy.model_validate(r.policy)
    starts: dict[int, datetime] = {}
    for t in s.scalars(
        select(RolloutTransition).where(RolloutTransition.rollout_id == r.id).order_by(RolloutTransition.seq)
    ):
        if t.to_state == "running":
            starts.setdefault(t.wave, t.at)
    moved = list(s.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == r.id)))
    moved_ids = {x.device_id for x in moved}
    q = select(Device.id).where(Device.revoked_at.is_(None))
    if r.kind != KIND_AGENT:  # an agent rollout's control: every device still on its old agent, whatever it serves
        q = q.where(Device.served_model == r.model)
    if r.tier:
        q = q.where(Device.tier == r.tier)
    control_ids = sorted(set(s.scalars(q)) - moved_ids)
    end_of_rollout = r.completed_at or r.rolled_back_at or (r.halted_at if r.state != "running" else None) or now
    out: list[dict[str, Any]] = []
    for i, pct in enumerate(policy.waves):
        start = starts.get(i)
        if start is None:
            out.append({"wave": i, "percent": pct, "started_at": None, "canary": None, "control": None})
            continue
        until = starts.get(i + 1) or end_of_rollout
        ids = sorted(x.device_id for x in moved if x.wave <= i)
        already = {x.device_id for x in moved if x.wave <= i and x.previous_version == r.version}
        canary, control = wave_cohorts(
            s, r, ids, control_ids, already_serving=already, until=until, device_timeout_s=policy.device_timeout_s
        )
        verdict = judge(canary, control, policy)
        out.append(
            {
                "wave": i,
                "percent": pct,
                "started_at": start.isoformat(),
                "moved_in_wave": sum(1 for x in moved if x.wave == i),
                "canary": _cohort_dict(canary),
                "control": _cohort_dict(control) if control is not None else None,
                "judgement": verdict.outcome.value,
                "judgement_reason": verdict.reason,
                "current": i == r.wave and r.state in ("running", "paused"),
            }
        )
    return out


def rollout_page(s: Session, rollout_id: str) -> dict[str, Any]:
    from edgefleet.controlplane.api.rollouts import rollout_dict  # the API's own serialisation of a rollout

    r = s.get(Rollout, rollout_id)
    if r is None:
        raise NotFoundError(f"no rollout {rollout_id}")
    d = rollout_dict(s, r, full=True)
    try:
        d["wave_metrics"], d["wave_metrics_error"] = wave_metrics(s, r), None
    except ValueError as exc:  # stored data the judgement cannot read: the page still shows the rollout and why
        d["wave_metrics"], d["wave_metrics_error"] = [], f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    d["entries"] = audit.list_entries(s, limit=100, target=r.id)
    d["downloads"] = rollout_downloads(s, r)
    d["halted_at"] = r.halted_at.isoformat() if r.halted_at else None
    d["completed_at"] = r.completed_at.isoformat() if r.completed_at else None
    d["rolled_back_at"] = r.rolled_back_at.isoformat() if r.rolled_back_at else None
    return d


def rollout_downloads(s: Session, r: Rollout) -> dict[str, Any]:
    """What the rollout's updates downloaded, one row per ``verified`` event (each attempt that got as far), with
    the full package's size beside it: a delta's saving is in plain figures."""
    full = s.scalar(select(ModelVersion.length).where(ModelVersion.model == r.model, ModelVersion.version == r.version))
    rows = [
        {
            "device_id": e.device_id,
            "received_at": e.received_at.isoformat(),
            "bytes": e.bytes_downloaded,
            "delta_from": e.delta_from,
            "reason": e.reason,
        }
        for e in s.scalars(
            select(UpdateEventRow)
            .where(UpdateEventRow.rollout_id == r.id, UpdateEventRow.kind == "verified")
            .order_by(UpdateEventRow.received_at, UpdateEventRow.id)
        )
    ]
    counted = [x["bytes"] for x in rows if x["bytes"] is not None]
    return {
        "full_bytes": full or None,
        "rows": rows,
        "via_delta": sum(1 for x in rows if x["delta_from"]),
        "total_bytes": sum(counted) if counted else None,
    }


def rollouts_index(s: Session) -> list[dict[str, Any]]:
    from edgefleet.controlplane.api.rollouts import rollout_dict

    return [rollout_dict(s, r) for r in s.scalars(select(Rollout).order_by(Rollout.created_at.desc()))]


# ------------------------------------------------------------------------------------------------ devices


def device_page(s: Session, device_id: str, *, overdue_after_s: float) -> dict[str, Any]:
    d = devices.get_device(s, device_id)
    out = devices.device_dict(d, overdue_after_s=overdue_after_s)
    expected = None
    if d.served_model and d.served_version:
        expected = s.scalar(
            select(ModelVersion.model_sha256).where(
                ModelVersion.model == d.served_model, ModelVersion.version == d.served_version
            )
        )
    out["clock_skew_s"] = CLOCK_SKEW_S  # device_dict flags the skew; the page names the threshold
    out["expected_model_sha256"] = expected
    out["sha_matches"] = None if expected is None or not d.served_model_sha256 else expected == d.served_model_sha256
    out["events"] = [
        {
            "at": e.at.isoformat(),
            "received_at": e.received_at.isoformat(),
            "kind": e.kind,
            "model": e.model,
            "version": e.version,
            "rollout_id": e.rollout_id,
            "reason": e.reason,
        }
        for e in s.scalars(
            select(UpdateEventRow)
            .where(UpdateEventRow.device_id == device_id)
            .order_by(UpdateEventRow.received_at.desc(), UpdateEventRow.id.desc())
            .limit(200)
        )
    ]
    windows = list(
        s.scalars(
            select(TelemetryRow)
            .where(TelemetryRow.device_id == device_id)
            .order_by(TelemetryRow.received_at.desc())
            .limit(200)
        )
    )
    out["telemetry"] = []
    points = []
    for w in windows:
        sk = SketchData.model_validate(w.latency) if w.latency else SketchData()
        q = LatencySketch.from_data(sk).quantile(0.95) if sk.count else None
        out["telemetry"].append(
            {
                "start": w.start.isoformat(),
                "end": w.end.isoformat(),
                "version": _version_label(w.model, w.version),
                "requests": w.requests,
                "errors": w.errors,
                "crashes": w.worker_crashes,
                "p95_ms": None if q is None else q * 1000,
                "max_psi": w.max_psi,
            }
        )
        points.append(LatencyPoint(w.received_at, _version_label(w.model, w.version), sk))
    out["latency_series"] = latency_series(points)
    out["rollouts"] = [
        {
            "rollout_id": x.rollout_id,
            "wave": x.wave,
            "previous_version": x.previous_version,
            "moved_at": x.moved_at.isoformat(),
            "reverted": x.reverted,
        }
        for x in s.scalars(
            select(RolloutDevice).where(RolloutDevice.device_id == device_id).order_by(RolloutDevice.moved_at.desc())
        )
    ]
    out["history"] = audit.list_entries(s, limit=100, target=device_id)
    out["crash_consent"] = crashes.consents(s, d)
    out["crashes"] = [crashes.crash_dict(c) for c in crashes.list_crashes(s, device_id, 20)[1]]
    out["sampling"] = samples.sampling_status(s, d)
    return out


def devices_index(s: Session, *, overdue_after_s: float) -> list[dict[str, Any]]:
    now = utcnow()
    return [devices.device_dict(d, overdue_after_s=overdue_after_s, now=now) for d in devices.list_devices(s)]


# ------------------------------------------------------------------------------------------------ models


def _bench_rows(bench: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per (model, tier) result of a BENCH.json; tolerant of older or partial reports."""
    rows = []
    for r in (bench or {}).get("results") or []:
        if not isinstance(r, dict):
            continue
        qs = {f"p{round(q['q'] * 100):g}": q.get("value_ms") for q in ((r.get("latency") or {}).get("quantiles") or [])}
        rows.append(
            {
                "tier": r.get("tier"),
                "status": r.get("status"),
                "p50_ms": qs.get("p50"),
                "p95_ms": qs.get("p95"),
                "p99_ms": qs.get("p99"),
                "cold_start_ms": r.get("cold_start_ms"),
                "peak_rss_mb": r.get("peak_rss_mb"),
                "compat": (r.get("compat") or {}).get("result"),
                "error": r.get("error"),
            }
        )
    return rows


def model_page(s: Session, name: str) -> dict[str, Any]:
    summary = registry.list_models(s, name)[0]
    mvs = list(s.scalars(select(ModelVersion).where(ModelVersion.model == name).order_by(ModelVersion.created_at)))
    by_sha = {mv.model_sha256: mv.version for mv in s.scalars(select(ModelVersion))}
    versions = []
    for mv in mvs:
        v = registry.version_dict(mv, full=True)
        parent = (mv.lineage or {}).get("parent_sha256")
        v["parent"] = {"sha256": parent, "version": by_sha.get(parent) if parent else None}
        v["children"] = [c.version for c in mvs if (c.lineage or {}).get("parent_sha256") == mv.model_sha256]
        v["bench_rows"] = _bench_rows(mv.bench)
        v["release"] = registry.release_status(s, mv)
        v["device_count"] = s.scalar(
            select(func.count())
            .select_from(Device)
            .where(Device.served_model == name, Device.served_version == mv.version, Device.revoked_at.is_(None))
        )
        versions.append(v)
    cells = compat.matrix(s, mvs)
    combos = sorted({(c["tier"], c["runtime_version"]) for c in cells})
    grid = {(c["tier"], c["runtime_version"], c["version"]): c for c in cells}
    return {
        "model": name,
        "channels": summary["channels"],
        "versions": versions,
        "compat_combos": combos,
        "compat_grid": {f"{t}|{rt}|{v}": c for (t, rt, v), c in grid.items()},
    }


def models_index(s: Session) -> list[dict[str, Any]]:
    return registry.list_models(s)
