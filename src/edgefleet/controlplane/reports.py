"""Storing what a device reports: its state, update events (evidence for the compatibility matrix) and
telemetry windows, each once however often the device retries.

The HTTP side (authentication, the size cap, validation) is ``api/checkin.py``; what arrives here is a valid
:class:`~edgefleet.protocol.Report` of an authenticated device."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.controlplane import compat, field_accuracy, rollups
from edgefleet.controlplane.db import Device, ReportBatch, TelemetryRow, UpdateEventRow, utcnow
from edgefleet.protocol import Report

__all__ = ["store_report"]


def store_report(s: Session, d: Device, r: Report, now: datetime | None = None, *, several: bool = False) -> bool:
    """Store a batch once. Returns False when ``batch_id`` was stored before (the answer is the same).
    ``several``: the agent declared that it serves additional models (``protocol.SEVERAL_MODELS_HEADER``); its
    per-model status replaces the one stored (an agent that does not declare it has none).

    Everything stored is stamped with ``now``, the server's clock (one reading per report): verdicts never
    depend on a device's clock, whose offset from the server's is kept on the device."""
    now = now or utcnow()
    if r.sent_at is not None:
        # also for a batch stored before: a retry is as good a clock reading as any
        d.clock_offset_s = (r.sent_at - now).total_seconds()
    if s.get(ReportBatch, (d.id, r.batch_id)) is not None:
        return False
    s.add(ReportBatch(device_id=d.id, batch_id=r.batch_id, received_at=now))
    d.last_seen = now
    d.state = r.state.value
    d.state_reason = r.state_reason
    d.served_model, d.served_version = r.served.model, r.served.version
    d.served_model_sha256 = r.served.model_sha256
    if several and not d.several_models:
        d.several_models = True
    if several or r.models:
        d.reported_models = [m.model_dump(mode="json") for m in r.models] or None
    if r.agent_version:
        d.agent_version = r.agent_version
    if r.runtime_version:
        d.runtime_version = r.runtime_version
    if r.runtimes is not None and (d.hardware or {}).get("runtimes") != r.runtimes:
        d.hardware = {**(d.hardware or {}), "runtimes": dict(r.runtimes)}  # the compat matrix's runtime axis
    d.dropped_records = max(d.dropped_records, r.dropped_records)
    if r.events:
        have = _stored(s, UpdateEventRow.event_id, UpdateEventRow.device_id, d.id, [e.event_id for e in r.events])
        for e in r.events:
            if e.event_id in have:
                continue
            have.add(e.event_id)
            s.add(
                UpdateEventRow(
                    device_id=d.id,
                    event_id=e.event_id,
                    at=e.at,
                    kind=e.kind.value,
                    model=e.model,
                    version=e.version,
                    rollout_id=e.rollout_id,
                    reason=e.reason,
                    bytes_downloaded=e.bytes_downloaded,
                    delta_from=e.delta_from,
                    received_at=now,
                )
            )
            # Evidence for the compatibility matrix: committed means health check and probation passed on
            # this hardware; a rollback or failed health check means it did not.
            if e.model and e.version and e.kind.value in ("committed", "rolled_back", "health_check_failed"):
                compat.record(
                    s,
                    tier=d.tier,
                    runtime_version=d.runtime_version,
                    model=e.model,
                    version=e.version,
                    ok=e.kind.value == "committed",
                    evidence={
                        "source": "device",
                        "device_id": d.id,
                        "agent_version": d.agent_version or None,  # the compat matrix's agent axis
                        "rollout_id": e.rollout_id,
                        "event": e.kind.value,
                        "reason": e.reason,
                        "at": e.at.isoformat(),
                    },
                )
    if r.telemetry:
        have = _stored(s, TelemetryRow.window_id, TelemetryRow.device_id, d.id, [w.window_id for w in r.telemetry])
        new = []
        for w in r.telemetry:
            if w.window_id in have:
                continue
            have.add(w.window_id)
            new.append(w)
            s.add(
                TelemetryRow(
                    device_id=d.id,
                    window_id=w.window_id,
                    start=w.start,
                    end=w.end,
                    model=w.model,
                    version=w.version,
                    tier=d.tier,
                    requests=w.requests,
                    errors=sum(w.errors.values()),
                    worker_crashes=w.worker_crashes,
                    worker_restarts=w.worker_restarts,
                    latency=w.latency.model_dump(mode="json"),
                    drift=[x.model_dump(mode="json") for x in w.drift],
                    max_psi=max((x.psi for x in w.drift), default=None),
                    cpu_percent=w.cpu_percent,
                    rss_bytes=w.rss_bytes,
                    feedback=None if w.feedback is None else w.feedback.model_dump(mode="json"),
                    shadow=None if w.shadow is None else w.shadow.model_dump(mode="json"),
                    received_at=now,
                )
            )
        # in this transaction: the rollup counts a window exactly when its raw row is stored
        rollups.add_windows(s, d, new, now)
        field_accuracy.add_windows(s, d, new, now)
    return True


def _stored(s: Session, id_col: Any, device_col: Any, device_id: str, ids: list[str]) -> set[str]:
    """Which of a device's record ids are already stored: a report the device retries is applied once."""
    return set(s.scalars(select(id_col).where(device_col == device_id, id_col.in_(ids))))
