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

Lifecycle (docs/adr/0103-device-lifecycle-and-pinned-enrollment.md): a rotated credential is accepted beside the
old one until its first use, which promotes it; a decommissioned device is answered the wipe order once, and
refused from then on.
"""

from __future__ import annotations

import asyncio
import threading
import time
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

from edgefleet.controlplane import audit, compat, devices
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
    CredentialResponse,
    DesiredState,
    EnrollRequest,
    EnrollResponse,
    KeyRotation,
    Report,
    ReportResponse,
    validation_message,
)

if TYPE_CHECKING:
    from edgefleet.controlplane.store import Store

__all__ = ["DEVICE_SCHEME", "REPORT_OPENAPI", "CheckinCache", "Entry", "read_report", "router", "store_report"]

# Unknown device ids are remembered this long, at most this many (docs/adr/0040-checkin-hot-path-from-memory.md).
MISS_TTL_S = 30.0
MISS_MAX = 10_000
# A known device presenting a credential the cache does not hold is re-read from the database at most this often:
# a credential rotated through another replica is found on the device's next try, and a stream of wrong
# credentials for a known id costs one query per interval, not one each.
STALE_RELOAD_S = 2.0


@dataclass(frozen=True, slots=True)
class Entry:
    cred_hash: str
    revoked: bool  # refused: revoked, or decommissioned with the wipe order sent
    etag: str
    body: bytes
    pending_hash: str | None = None  # a rotated credential not used yet: accepted beside ``cred_hash``
    decommissioned: bool = False
    wipe_due: bool = False  # decommissioned, the wipe order not sent yet: still accepted, once


def _entry_of(d: Device, body: bytes) -> Entry:
    decommissioned = d.decommissioned_at is not None
    wipe_due = decommissioned and d.wipe_sent_at is None
    return Entry(
        cred_hash=d.credential_hash,
        revoked=d.revoked_at is not None and not wipe_due,
        etag=devices.etag_of(body),
        body=body,
        pending_hash=d.pending_credential_hash,
        decommissioned=decommissioned,
        wipe_due=wipe_due,
    )


class CheckinCache:
    """Per-process memory of what the hot path needs. Dict reads and writes only: safe from the event loop."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.by_hash: dict[str, str] = {}
        self.seen: dict[str, datetime] = {}
        self.synced_at: datetime | None = None
        # Device ids the database did not have, refused from memory until the monotonic time stored (a stream of
        # requests for an unknown id costs one query, not one each); oldest dropped first beyond MISS_MAX, and an
        # id leaves as soon as a load or sync brings its device (enrolled here or on another replica).
        self.misses: dict[str, float] = {}
        self._miss_lock = threading.Lock()
        self.reloaded: dict[str, float] = {}  # device id → monotonic time of its last reload for a stale credential

    def may_reload(self, device_id: str) -> bool:
        """Whether a stale-looking credential for ``device_id`` may cost a database read now (then it is noted)."""
        now = time.monotonic()
        with self._miss_lock:
            if self.reloaded.get(device_id, 0.0) > now - STALE_RELOAD_S:
                return False
            self.reloaded.pop(device_id, None)
            self.reloaded[device_id] = now
            while len(self.reloaded) > MISS_MAX:
                del self.reloaded[next(iter(self.reloaded))]
        return True

    def miss(self, device_id: str) -> None:
        with self._miss_lock:
            self.misses.pop(device_id, None)
            self.misses[device_id] = time.monotonic() + MISS_TTL_S
            while len(self.misses) > MISS_MAX:
                del self.misses[next(iter(self.misses))]

    def missed(self, device_id: str) -> bool:
        """Whether ``device_id`` was looked up and not found less than MISS_TTL_S ago."""
        until = self.misses.get(device_id)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        with self._miss_lock:
            self.misses.pop(device_id, None)
        return False

    def _put(self, d: Device, group: DeviceGroup | None, versions: dict[tuple[str, str], ModelVersion]) -> None:
        if self.misses:
            with self._miss_lock:
                self.misses.pop(d.id, None)
        body = devices.render(devices.desired_state(d, group, versions))
        old = self.entries.get(d.id)
        if old is not None:
            for h in (old.cred_hash, old.pending_hash):
                if h is not None and h not in (d.credential_hash, d.pending_credential_hash):
                    self.by_hash.pop(h, None)
        self.entries[d.id] = _entry_of(d, body)
        self.by_hash[d.credential_hash] = d.id
        if d.pending_credential_hash is not None:
            self.by_hash[d.pending_credential_hash] = d.id

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

# The OpenAPI security scheme of a device credential (create_app adds it to the components). Declared by hand, not
# as a dependency: the handlers check the credential themselves, and the hot path runs no dependency.
DEVICE_SCHEME = "deviceCredential"
_DEVICE_SECURITY: dict[str, Any] = {"security": [{DEVICE_SCHEME: []}]}


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


class _Stale(Exception):
    """The credential is not the one this cache holds for the device: it may be newer than the cache."""


def _device_auth(store: Store, device_id: str, credential: str | None) -> Entry | None:
    """The device's cache entry if the credential is its own (current or pending); raises otherwise. None: not
    in this cache yet."""
    if credential is None:
        raise AuthError("missing device credential (Authorization: Bearer <credential>)")
    h = hash_secret(credential)
    entry = store.cache.entries.get(device_id)
    if entry is None:
        owner = store.cache.by_hash.get(h)
        if owner is not None and owner != device_id:
            raise ForbiddenError("a device may only read and write its own resources")
        return None
    if h not in (entry.cred_hash, entry.pending_hash):
        owner = store.cache.by_hash.get(h)
        if owner is not None:
            raise ForbiddenError("a device may only read and write its own resources")
        raise _Stale
    if entry.revoked:
        if entry.decommissioned:
            raise AuthError("this device was decommissioned: its credential no longer works")
        raise AuthError("this device's credential was revoked")
    return entry


async def _entry(store: Store, device_id: str, credential: str | None) -> Entry:
    try:
        entry = _device_auth(store, device_id, credential)
    except _Stale:
        # rotated through another replica since the last sync, perhaps: look, but not for every wrong guess
        if not store.cache.may_reload(device_id):
            raise AuthError("invalid device credential")
        entry = None
    if entry is None:
        if device_id not in store.cache.entries and store.cache.missed(device_id):
            raise AuthError("invalid device credential")  # looked up moments ago: no such device
        # Enrolled (or its credential rotated) through another replica since the last sync: load this one
        # device, then judge again.
        await run_in_threadpool(store.refresh, [device_id])
        try:
            entry = _device_auth(store, device_id, credential)
        except _Stale:
            entry = None
        if entry is None:
            if device_id not in store.cache.entries:
                store.cache.miss(device_id)
            raise AuthError("invalid device credential")
    assert credential is not None
    h = hash_secret(credential)
    if h == entry.pending_hash:
        # The first use of a rotated credential: from now on it is the only one.
        await run_in_threadpool(_promote, store, device_id, h)
        entry = store.cache.entries.get(device_id) or entry
    return entry


def _promote(store: Store, device_id: str, cred_hash: str) -> None:
    with store.db.session() as s:
        if devices.promote_credential(s, device_id, cred_hash):
            audit.record(s, f"device:{device_id}", "device.credential_rotated", device_id)
    store.refresh([device_id])


def _wipe_sent(store: Store, device_id: str) -> None:
    with store.db.session() as s:
        if devices.mark_wiped(s, device_id):
            audit.record(s, f"device:{device_id}", "device.wipe_sent", device_id)
    store.refresh([device_id])


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
        dev, credential, root_version = devices.enroll(s, body)
        tier, device_id = dev.tier, dev.id
        # the root the token pinned, exactly: its hash is in the token, and the TUF client walks forward from it
        root = devices.root_version_json(store.repo.path, root_version) if root_version else store.repo.root_json()
        audit.record(
            s,
            f"device:{device_id}",
            "device.enroll",
            device_id,
            tier=tier,
            hardware=dev.hardware,
            root_version=root_version,
            previous_device_id=body.previous_device_id,
        )
    store.refresh([device_id])
    base = store.settings.public_url or str(request.base_url)
    return EnrollResponse(
        device_id=device_id,
        credential=credential,
        tier=tier,
        root_json=root.decode(),
        repository_url=base.rstrip("/") + "/tuf",
    )


@router.get(
    "/devices/{device_id}/desired",
    response_model=DesiredState,
    responses={**_AUTH_RESPONSES, 304: {"description": "unchanged since the ETag in If-None-Match"}},
    openapi_extra=_DEVICE_SECURITY,
)
async def desired(device_id: str, request: Request) -> Response:
    store = _store(request)
    entry = await _entry(store, device_id, bearer(request))
    store.cache.seen[device_id] = utcnow()
    if entry.wipe_due:
        # Delivered once: from this answer on the credential is refused (a lost answer leaves a device that is
        # refused and says so, which an operator wipes by hand).
        await run_in_threadpool(_wipe_sent, store, device_id)
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
    openapi_extra={**REPORT_OPENAPI, **_DEVICE_SECURITY},
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


@router.post(
    "/devices/{device_id}/credential",
    response_model=CredentialResponse,
    responses={**_AUTH_RESPONSES, 409: {"description": "the device is revoked or decommissioned"}},
    openapi_extra=_DEVICE_SECURITY,
)
async def rotate_credential(device_id: str, request: Request) -> CredentialResponse:
    """A new credential for the calling device. The current one keeps working until the new one is first used,
    so a device that loses this answer (or crashes before storing it) asks again with the old one."""
    store = _store(request)
    await _entry(store, device_id, bearer(request))

    def issue() -> str:
        with store.db.session() as s:
            credential = devices.issue_credential(s, device_id)
            audit.record(s, f"device:{device_id}", "device.credential_issued", device_id)
        store.refresh([device_id])
        return credential

    return CredentialResponse(credential=await run_in_threadpool(issue))


@router.post(
    "/devices/{device_id}/key",
    response_model=KeyRotation,
    responses={**_AUTH_RESPONSES, 409: {"description": "the device is revoked or decommissioned"}},
    openapi_extra=_DEVICE_SECURITY,
)
async def rotate_key(device_id: str, body: KeyRotation, request: Request) -> KeyRotation:
    """The calling device's new X25519 public key; packages built from now on are encrypted to it."""
    store = _store(request)
    await _entry(store, device_id, bearer(request))

    def record() -> None:
        with store.db.session() as s:
            d = devices.set_public_key(s, device_id, body.public_key)
            audit.record(
                s,
                f"device:{device_id}",
                "device.key_rotated",
                device_id,
                public_key=d.public_key,
                previous_public_key=d.previous_public_key,
            )
        store.refresh([device_id])

    await run_in_threadpool(record)
    return KeyRotation(public_key=body.public_key)


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
