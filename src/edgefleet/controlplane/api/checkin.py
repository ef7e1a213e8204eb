"""The check-in API (docs/api.md): enrollment, desired state with ETag, idempotent reports, credential and key
rotation. These routes are what devices call; they authenticate with the device's own credential in the handler,
not through the operator API's dependencies.

A report is the one body a device writes, so its route trusts nothing of it: it authenticates first, reads at
most ``MAX_REPORT_BYTES`` (413 above, whether or not a length was declared), validates it against the wire
models (422 naming the fields) and only then stores it (:mod:`edgefleet.controlplane.reports`), stamped with the
server's own receive time. A refused report stores nothing but the refusal, on the device.

``GET …/desired`` is the hot path: tens of thousands of devices poll it. It is an ``async`` handler answered from
the :class:`~edgefleet.controlplane.checkin_cache.CheckinCache` and runs no dependency: it reads the server's
context with :func:`~edgefleet.controlplane.context.context_of` itself.

Lifecycle (docs/adr/0103-device-lifecycle-and-pinned-enrollment.md): a rotated credential is accepted beside the
old one until its first use, which promotes it; a decommissioned device is answered the wipe order once, and
refused from then on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from edgefleet.controlplane import audit, crashes, devices, samples
from edgefleet.controlplane.auth import bearer
from edgefleet.controlplane.checkin_cache import Entry
from edgefleet.controlplane.context import context_of
from edgefleet.controlplane.credentials import hash_secret
from edgefleet.controlplane.db import Device, utcnow
from edgefleet.controlplane.reports import store_report
from edgefleet.errors import AuthError, ForbiddenError, InvalidReportError, NotFoundError, TooLargeError
from edgefleet.protocol import (
    API_PREFIX,
    MAX_CRASH_UPLOAD_BYTES,
    MAX_REPORT_BYTES,
    MAX_SAMPLE_UPLOAD_BYTES,
    SEVERAL_MODELS_HEADER,
    CrashUpload,
    CrashUploadResponse,
    CredentialResponse,
    DesiredState,
    EnrollRequest,
    EnrollResponse,
    KeyRotation,
    LogUpload,
    Report,
    ReportResponse,
    SampleUpload,
    SampleUploadResponse,
    validation_message,
)

if TYPE_CHECKING:
    from edgefleet.controlplane.store import Store

__all__ = ["DEVICE_SCHEME", "REPORT_OPENAPI", "read_report", "router"]

router = APIRouter(prefix=API_PREFIX, tags=["check-in"])

_AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing, unknown or revoked device credential"},
    403: {"description": "the credential belongs to another device"},
}

# The OpenAPI security scheme of a device credential (create_app adds it to the components). Declared by hand, not
# as a dependency: the handlers check the credential themselves, and the hot path runs no dependency.
DEVICE_SCHEME = "deviceCredential"
_DEVICE_SECURITY: dict[str, Any] = {"security": [{DEVICE_SCHEME: []}]}


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
    store = context_of(request).store
    with store.db.session() as s:
        dev, credential, root_version = devices.enroll(s, body)
        tier, device_id = dev.tier, dev.id
        # the root the token pinned, exactly: its hash is in the token, and the TUF client walks forward from it
        root = store.repo.root_version_json(root_version) if root_version else store.repo.root_json()
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
        repository_url=store.settings.repository_url or base.rstrip("/") + "/tuf",
    )


@router.get(
    "/devices/{device_id}/desired",
    response_model=DesiredState,
    responses={**_AUTH_RESPONSES, 304: {"description": "unchanged since the ETag in If-None-Match"}},
    openapi_extra=_DEVICE_SECURITY,
)
async def desired(device_id: str, request: Request) -> Response:
    ctx = context_of(request)
    store = ctx.store
    try:
        entry = await _entry(store, device_id, bearer(request))
        store.cache.seen[device_id] = utcnow()
        if entry.wipe_due:
            # Delivered once: from this answer on the credential is refused (a lost answer leaves a device that is
            # refused and says so, which an operator wipes by hand).
            await run_in_threadpool(_wipe_sent, store, device_id)
    except Exception as exc:  # counted under the status the error handlers answer, then theirs to answer
        ctx.metrics.checkin_failed(exc)
        raise
    inm = request.headers.get("if-none-match")
    if inm is not None and (inm == entry.etag or entry.etag in {t.strip() for t in inm.split(",")}):
        ctx.metrics.checkins_304.inc()
        return Response(status_code=304, headers={"ETag": entry.etag})
    ctx.metrics.checkins_200.inc()
    return Response(entry.body, media_type="application/json", headers={"ETag": entry.etag})


# The body is read by the route itself (authentication and the size cap come before any parsing), so the
# schema is named here for the OpenAPI document; create_app registers Report among its components.
REPORT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Report"}}},
        "required": True,
    }
}


M = TypeVar("M", bound=BaseModel)


async def read_capped(request: Request, model: type[M], limit: int, what: str, hint: str = "") -> M:
    """The request's body as ``model``, read without ever holding more than ``limit`` bytes of it: a device's
    upload is refused by its declared length, or as soon as it streams past the cap (413), and one that breaks the
    wire format names its fields (422). ``what`` names the upload in both, ``hint`` says what to do about a 413."""
    how = f": {hint}" if hint else ""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLargeError(f"{what} of {int(declared)} bytes is over the {limit}-byte cap{how}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLargeError(f"{what} is over the {limit}-byte cap{how}")
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as exc:
        raise InvalidReportError(f"invalid {what}: {validation_message(exc)}") from None


async def read_report(request: Request, limit: int = MAX_REPORT_BYTES) -> Report:
    """The request's :class:`Report`, read without ever holding more than ``limit`` bytes of it."""
    return await read_capped(request, Report, limit, "report", "send smaller batches")


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
    ctx = context_of(request)
    store = ctx.store
    await _entry(store, device_id, bearer(request))
    try:
        body = await read_report(request)
    except (InvalidReportError, TooLargeError) as err:
        await run_in_threadpool(_refused, store, device_id, str(err))
        raise
    store.cache.seen.pop(device_id, None)  # the report writes last_seen itself
    several = request.headers.get(SEVERAL_MODELS_HEADER) == "1"

    def write() -> None:
        try:
            with store.db.session() as s:
                d = s.get(Device, device_id)
                if d is None:
                    raise NotFoundError(f"no device {device_id}")
                store_report(s, d, body, several=several)
        except IntegrityError:
            # The same batch arrived twice at once (a retry racing its original): the other one stored it.
            pass

    await run_in_threadpool(write)
    ctx.metrics.reports.inc()
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
    store = context_of(request).store
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
    store = context_of(request).store
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


@router.post(
    "/devices/{device_id}/logs",
    status_code=204,
    responses={**_AUTH_RESPONSES, 409: {"description": "no open request for these lines, or the device is retired"}},
    openapi_extra=_DEVICE_SECURITY,
)
async def upload_logs(device_id: str, body: LogUpload, request: Request) -> Response:
    """The calling device's log lines, answering the operator's open request (``send_logs_since``)."""
    store = context_of(request).store
    await _entry(store, device_id, bearer(request))

    def record() -> None:
        with store.db.session() as s:
            row = devices.store_logs(s, device_id, body)
            s.flush()
            audit.record(
                s, f"device:{device_id}", "device.logs_uploaded", device_id, lines=len(body.lines), upload=row.id
            )
        store.refresh([device_id])

    await run_in_threadpool(record)
    return Response(status_code=204)


@router.post(
    "/devices/{device_id}/crashes",
    response_model=CrashUploadResponse,
    responses={
        **_AUTH_RESPONSES,
        409: {"description": "the device's group has not consented to crash reports, or the device is retired"},
        413: {"description": "the body is over MAX_CRASH_UPLOAD_BYTES (2 MiB); nothing stored"},
        422: {"description": "a report breaks the wire format; the detail names the fields; nothing stored"},
    },
    openapi_extra={
        "requestBody": {
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CrashUpload"}}},
            "required": True,
        },
        **_DEVICE_SECURITY,
    },
)
async def upload_crashes(device_id: str, request: Request) -> CrashUploadResponse:
    """The calling device's worker crash reports (its group consenting: ``crash_reports``). Read like a report:
    authenticated first, at most ``MAX_CRASH_UPLOAD_BYTES``, validated, then stored once per ``crash_id``."""
    store = context_of(request).store
    await _entry(store, device_id, bearer(request))
    upload = await read_capped(request, CrashUpload, MAX_CRASH_UPLOAD_BYTES, "crash upload")

    def record() -> list[str]:
        with store.db.session() as s:
            ids, new = crashes.store_crashes(s, device_id, upload)
            if new:
                audit.record(s, f"device:{device_id}", "device.crashes_uploaded", device_id, crash_ids=new)
        return ids

    return CrashUploadResponse(accepted_crash_ids=await run_in_threadpool(record))


@router.post(
    "/devices/{device_id}/samples",
    response_model=SampleUploadResponse,
    responses={
        **_AUTH_RESPONSES,
        409: {"description": "the device's group has not consented to input sampling, or the device is retired"},
        413: {"description": "the body is over MAX_SAMPLE_UPLOAD_BYTES (8 MiB); nothing stored"},
        422: {"description": "a sample breaks the wire format; the detail names the fields; nothing stored"},
    },
    openapi_extra={
        "requestBody": {
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SampleUpload"}}},
            "required": True,
        },
        **_DEVICE_SECURITY,
    },
)
async def upload_samples(device_id: str, request: Request) -> SampleUploadResponse:
    """The calling device's input samples, each sealed on the device for the operator's key (its group consenting:
    ``input_sampling``). Read like a report: authenticated first, at most ``MAX_SAMPLE_UPLOAD_BYTES``, validated,
    then stored once per ``sample_id``."""
    store = context_of(request).store
    await _entry(store, device_id, bearer(request))
    upload = await read_capped(request, SampleUpload, MAX_SAMPLE_UPLOAD_BYTES, "sample upload")

    def record() -> list[str]:
        with store.db.session() as s:
            ids, new = samples.store_samples(s, device_id, upload)
            if new:
                who = f"device:{device_id}"
                audit.record(s, who, "device.samples_uploaded", device_id, sample_ids=new, dropped=upload.dropped)
        return ids

    return SampleUploadResponse(accepted_sample_ids=await run_in_threadpool(record))


def _refused(store: Store, device_id: str, reason: str) -> None:
    with store.db.session() as s:
        devices.record_invalid_report(s, device_id, reason)
