"""Retention: raw telemetry windows, report batches and update events are deleted once older than their retention
(``ServerSettings.telemetry_retention_s`` / ``events_retention_s``), rollups once older than
``rollup_retention_s``. The audit log is never pruned (its triggers refuse DELETE anyway).

Every table is deleted from by its indexed arrival time, a bounded batch per transaction, so pruning costs what it
deletes and never holds a long lock over the rows devices are writing. One replica prunes per interval: the job
takes a lease row (``job_leases``) that names it and until when, and records when it last ran.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgefleet.controlplane.db import (
    Database,
    FieldAccuracyRollup,
    JobLease,
    ReportBatch,
    TelemetryRollup,
    TelemetryRow,
    UpdateEventRow,
    utcnow,
)

__all__ = ["PRUNE_JOB", "Retention", "acquire_lease", "prune", "prune_once"]

log = logging.getLogger(__name__)

PRUNE_JOB = "retention-prune"
BATCH = 5000
# a replica that dies mid-prune holds the job this long at most
LEASE_S = 600.0


@dataclass(frozen=True)
class Retention:
    telemetry_s: float
    events_s: float
    rollups_s: float


def acquire_lease(s: Session, name: str, owner: str, *, now: datetime, every_s: float, hold_s: float = LEASE_S) -> bool:
    """Take job ``name`` for ``owner`` when nobody holds it and it last ran ``every_s`` or more ago: one atomic
    UPDATE, so of N replicas asking at once exactly one gets True."""
    if s.get(JobLease, name) is None:
        try:
            with s.begin_nested():
                s.execute(insert(JobLease).values(name=name, owner="", until=now, last_result={}))
        except IntegrityError:
            pass  # another replica created it first
    due = now - timedelta(seconds=every_s)
    got = s.execute(
        update(JobLease)
        .where(
            JobLease.name == name,
            (JobLease.until <= now) | (JobLease.owner == owner),
            JobLease.last_run_at.is_(None) | (JobLease.last_run_at <= due),
        )
        .values(owner=owner, until=now + timedelta(seconds=hold_s))
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(got, "rowcount", 0) == 1)


def _batched(db: Database, stmt_of: Any) -> int:
    """Run ``stmt_of()`` (a DELETE of at most ``BATCH`` rows) in its own transaction until it deletes none."""
    total = 0
    while True:
        with db.session() as s:
            n = int(getattr(s.execute(stmt_of()), "rowcount", 0) or 0)
        total += n
        if n < BATCH:
            return total


def prune(db: Database, keep: Retention, *, now: datetime | None = None) -> dict[str, int]:
    """Delete what is past its retention; returns the rows deleted per table."""
    now = now or utcnow()
    raw = now - timedelta(seconds=keep.telemetry_s)
    events = now - timedelta(seconds=keep.events_s)
    rolled = now - timedelta(seconds=keep.rollups_s)

    def by_id(model: Any, cutoff: datetime) -> Any:
        # oldest first along the received_at index: a range scan of exactly the rows deleted
        ids = select(model.id).where(model.received_at < cutoff).order_by(model.received_at).limit(BATCH)
        return delete(model).where(model.id.in_(ids.scalar_subquery()))

    def batches() -> Any:
        keys = (
            select(ReportBatch.device_id, ReportBatch.batch_id)
            .where(ReportBatch.received_at < raw)
            .order_by(ReportBatch.received_at)
            .limit(BATCH)
        )
        return delete(ReportBatch).where(tuple_(ReportBatch.device_id, ReportBatch.batch_id).in_(keys))

    return {
        "telemetry": _batched(db, lambda: by_id(TelemetryRow, raw)),
        "report_batches": _batched(db, batches),
        "update_events": _batched(db, lambda: by_id(UpdateEventRow, events)),
        # few rows (versions × tiers × stripes per 5 minutes): one statement, by the primary key's first column
        # the field-accuracy rollups are telemetry rollups too (same buckets, same retention)
        "telemetry_rollups": _batched(db, lambda: delete(TelemetryRollup).where(TelemetryRollup.bucket < rolled))
        + _batched(db, lambda: delete(FieldAccuracyRollup).where(FieldAccuracyRollup.bucket < rolled)),
    }


def prune_once(db: Database, keep: Retention, owner: str, *, every_s: float, now: datetime | None = None) -> Any:
    """Prune if this replica wins the lease and the job is due; returns the rows deleted, or None when not run."""
    now = now or utcnow()
    with db.session() as s:
        if not acquire_lease(s, PRUNE_JOB, owner, now=now, every_s=every_s):
            return None
    deleted = prune(db, keep, now=now)
    with db.session() as s:
        s.execute(
            update(JobLease)
            .where(JobLease.name == PRUNE_JOB, JobLease.owner == owner)
            .values(last_run_at=now, last_result=deleted, until=now)
            .execution_options(synchronize_session=False)
        )
    return deleted
