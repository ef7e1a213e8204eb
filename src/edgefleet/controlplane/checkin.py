"""The check-in API (docs/api.md): enrollment, desired state with ETag, idempotent reports.

A report is the one body a device writes, so its route trusts nothing of it: it authenticates first, reads at
most ``MAX_REPORT_BYTES`` (413 above, whether or not a length was declared), validates it against the wire
models (422 naming the fields) and only then stores it, stamped with the server's own receive time. A refused
report stores nothing but the refusal, on the device.

``GET …/desired`` is the hot path: tens of thousands of devices poll it. It is an ``async`` handler answered from
:class:`CheckinCache` — credential hashes and rendered desired states with their ETags — so neither a 304 nor an
unchanged 200 issues SQL; last-seen times collect in memory and are flushed in batches by a background task.
Every write that changes a device's desired state bumps ``devices.changed_at``; the writing process refreshes its
cache at once and every replica syncs the rows changed since its last sync (``CheckinCache.sync``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from edgefleet.controlplane import compat, devices
from edgefleet.controlplane.auth import bearer, hash_secret
from edgefleet.controlplane.db import (
    Device,
    DeviceGroup,
    ModelVersion,
    ReportBatch,
    TelemetryRow,
    UpdateEventRow,
    utcnow,
)
from edgefleet.errors import AuthError, ForbiddenError, InvalidReportError, NotFoundError, TooLargeError
from edgefleet.protocol import (
    API_PREFIX,
    MAX_REPORT_BYTES,
    DesiredState,
    EnrollRequest,
    EnrollResponse,
    Report,
    ReportResponse,
    validation_message,
)

if TYPE_CHECKING:
    from edgefleet.controlplane.store import Store

__all__ = ["REPORT_OPENAPI", "CheckinCache", "Entry", "read_report", "router", "store_report"]


@dataclass(frozen=True, slots=True)
class Entry:
    cred_hash: str
    revoked: bool
    etag: str
    body: bytes


class CheckinCache:
    """Per-process memory of what the hot path needs. Dict reads and writes only: safe from the event loop."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.by_hash: dict[str, str] = {}
        self.seen: dict[str, datetime] = {}
        self.synced_at: datetime | None = None

    def _put(self, d: Device, group: DeviceGroup | None, versions: dict[tuple[str, str], ModelVersion]) -> None:
        body = devices.render(devices.desired_state(d, group, versions))
        old = self.entries.get(d.id)
        if old is not None and old.cred_hash != d.credential_hash:
            self.by_hash.pop(old.cred_hash, None)
        self.entries[d.id] = Entry(d.credential_hash, d.revoked_at is not None, devices.etag_of(body), body)
        self.by_hash[d.credential_hash] = d.id

    def load(self, s: Session, ids: Iterable[str] | None = None) -> int:
        """(Re)compute entries for ``ids``, or for every device."""
        q = select(Device)
        if ids is not None:
            wanted = list(set(ids))
            if not wanted:
                return 0
            q = q.where(Device.id.in_(wanted))
        return self._load(s, list(s.scalars(q)))

    def _load(self, s: Session, rows: list[Device]) -> int:
        if not rows:
            return 0
        groups = {g.name: g for g in s.scalars(select(DeviceGroup))}
        versions = {(v.model, v.version): v for v in s.scalars(select(ModelVersion))}
        for d in rows:
            self._put(d, groups.get(d.group) if d.group else None, versions)
        return len(rows)

    def sync(self, s: Session) -> int:
        """Pick up changes made by other replicas (rows whose ``changed_at`` moved since the last sync)."""
        now = utcnow()
        if self.synced_at is None:
            n = self.load(s)
        else:
            # a margin covers clock skew between replicas and transactions that committed late
            since = self.synced_at - timedelta(seconds=5)
            n = self._load(s, list(s.scalars(select(Device).where(Device.changed_at >= since))))
        self.synced_at = now
        return n

    def take_seen(self) -> dict[str, datetime]:
        seen, self.seen = self.seen, {}
        return seen


_DEVICES: Table = Device.__table__  # type: ignore[assignment]
# A Core statement, not the ORM's bulk update by primary key: the flush runs beside the hot path, and the ORM's
# per-row bookkeeping took a third of its time (py-spy, benchmarks/checkin.py).
_SET_LAST_SEEN = update(_DEVICES).where(_DEVICES.c.id == bindparam("b_id")).values(last_seen=bindparam("b_seen"))


def flush_seen(s: Session, seen: dict[str, datetime]) -> None:
    """One executemany for the whole batch instead of one write per check-in."""
    if seen:
        s.connection().execute(_SET_LAST_SEEN, [{"b_id": k, "b_seen": v} for k, v in seen.items()])


# ----------------------------------------------------------------------------------------------- reports


def store_report(s: Session, d: Device, r: Report, now: datetime | None = None) -> bool:
    """Store a batch once. Returns False when ``batch_id`` was stored before (the answer is the same).

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
    if r.agent_version:
        d.agent_version = r.agent_version
    if r.runtime_version:
        d.runtime_version = r.runtime_version
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
                        "rollout_id": e.rollout_id,
                        "event": e.kind.value,
                        "reason": e.reason,
                        "at": e.at.isoformat(),
                    },
                )
    if r.telemetry:
        have = _stored(s, TelemetryRow.window_id, TelemetryRow.device_id, d.id, [w.window_id for w in r.telemetry])
        for w in r.telemetry:
            if w.window_id in have:
                continue
            have.add(w.window_id)
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
                    received_at=now,
                )
            )
    return True


# ----------------------------------------------------------------------------------------------- routes

router = APIRouter(prefix=API_PREFIX, tags=["check-in"])

_AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing, unknown or revoked device credential"},
    403: {"description": "the credential belongs to another device"},
}


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _device_auth(store: Store, device_id: str, credential: str | None) -> Entry | None:
    """The device's cache entry if the credential is its own; raises otherwise. None: not in this cache yet."""
    if credential is None:
        raise AuthError("missing device credential (Authorization: Bearer <credential>)")
    h = hash_secret(credential)
    entry = store.cache.entries.get(device_id)
    if entry is None:
        owner = store.cache.by_hash.get(h)
        if owner is not None and owner != device_id:
            raise ForbiddenError("a device may only read and write its own resources")
        return None
    if entry.cred_hash != h:
        owner = store.cache.by_hash.get(h)
        if owner is not None:
            raise ForbiddenError("a device may only read and write its own resources")
        raise AuthError("invalid device credential")
    if entry.revoked:
        raise AuthError("this device's credential was revoked")
    return entry


async def _entry(store: Store, device_id: str, credential: str | None) -> Entry:
    entry = _device_auth(store, device_id, credential)
    if entry is None:
        # Enrolled through another replica since the last sync: load this one device, then judge again.
        await run_in_threadpool(store.refresh, [device_id])
        entry = _device_auth(store, device_id, credential)
        if entry is None:
            raise AuthError("invalid device credential")
    return entry


@router.post(
    "/enroll",
    response_model=EnrollResponse,
    responses={
        401: {"description": "bad enrollment token"},
        409: {"description": "the hardware contradicts the token's tier (and the agent does not emulate it)"},
    },
)
def enroll(body: EnrollRequest, request: Request) -> EnrollResponse:
    store = _store(request)
    with store.db.session() as s:
        dev, credential = devices.enroll(s, body)
        tier, device_id = dev.tier, dev.id
        from edgefleet.controlplane import audit

        audit.record(s, f"device:{device_id}", "device.enroll", device_id, tier=tier, hardware=dev.hardware)
    store.refresh([device_id])
    base = store.settings.public_url or str(request.base_url)
    return EnrollResponse(
        device_id=device_id,
        credential=credential,
        tier=tier,
        root_json=store.repo.root_json().decode(),
        repository_url=base.rstrip("/") + "/tuf",
    )


@router.get(
    "/devices/{device_id}/desired",
    response_model=DesiredState,
    responses={**_AUTH_RESPONSES, 304: {"description": "unchanged since the ETag in If-None-Match"}},
)
async def desired(device_id: str, request: Request) -> Response:
    store = _store(request)
    entry = await _entry(store, device_id, bearer(request))
    store.cache.seen[device_id] = utcnow()
    inm = request.headers.get("if-none-match")
    if inm is not None and (inm == entry.etag or entry.etag in {t.strip() for t in inm.split(",")}):
        request.app.state.metrics.checkins_304.inc()
        return Response(status_code=304, headers={"ETag": entry.etag})
    request.app.state.metrics.checkins_200.inc()
    return Response(entry.body, media_type="application/json", headers={"ETag": entry.etag})


# The body is read by the route itself (authentication and the size cap come before any parsing), so the
# schema is named here for the OpenAPI document; create_app registers Report among its components.
REPORT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Report"}}},
        "required": True,
    }
}


async def read_report(request: Request, limit: int = MAX_REPORT_BYTES) -> Report:
    """The request's :class:`Report`, read without ever holding more than ``limit`` bytes of it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLargeError(f"report of {int(declared)} bytes is over the {limit}-byte cap: send smaller batches")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLargeError(f"report is over the {limit}-byte cap: send smaller batches")
    try:
        return Report.model_validate_json(bytes(body))
    except ValidationError as exc:
        raise InvalidReportError(f"invalid report: {validation_message(exc)}") from None


@router.post(
    "/devices/{device_id}/report",
    response_model=ReportResponse,
    responses={
        **_AUTH_RESPONSES,
        413: {"description": "the body is over MAX_REPORT_BYTES (4 MiB); nothing stored"},
        422: {"description": "the report breaks the wire format; the detail names the fields; nothing stored"},
    },
    openapi_extra=REPORT_OPENAPI,
)
async def report(device_id: str, request: Request) -> ReportResponse:
    store = _store(request)
    await _entry(store, device_id, bearer(request))
    try:
        body = await read_report(request)
    except (InvalidReportError, TooLargeError) as err:
        await run_in_threadpool(_refused, store, device_id, str(err))
        raise
    store.cache.seen.pop(device_id, None)  # the report writes last_seen itself

    def write() -> None:
        try:
            with store.db.session() as s:
                d = s.get(Device, device_id)
                if d is None:
                    raise NotFoundError(f"no device {device_id}")
                store_report(s, d, body)
        except IntegrityError:
            # The same batch arrived twice at once (a retry racing its original): the other one stored it.
            pass

    await run_in_threadpool(write)
    request.app.state.metrics.reports.inc()
    store.wake()
    return ReportResponse(accepted_batch_ids=[body.batch_id])


def _refused(store: Store, device_id: str, reason: str) -> None:
    with store.db.session() as s:
        devices.record_invalid_report(s, device_id, reason)


async def flush_loop(store: Store) -> None:
    """Background task: write pending last-seen times, then sync the cache with other replicas' changes."""
    while True:
        await asyncio.sleep(store.settings.lastseen_flush_s)
        try:
            await run_in_threadpool(store.flush_and_sync)
        except Exception as exc:  # a database hiccup must not end the loop; the next round retries
            store.log(f"check-in cache flush/sync failed: {exc}")


def _stored(s: Session, id_col: Any, device_col: Any, device_id: str, ids: list[str]) -> set[str]:
    """Which of a device's record ids are already stored: a report the device retries is applied once."""
    return set(s.scalars(select(id_col).where(device_col == device_id, id_col.in_(ids))))
