"""Enrolled devices: pins, groups, revocation, credential and key rotation."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import Field
from sqlalchemy import select

from edgefleet.controlplane import audit, crashes, devices, samples, schemas
from edgefleet.controlplane.api._paging import PAGED, Page, after, finish, in_memory
from edgefleet.controlplane.api._shared import _OUT, _In, _who
from edgefleet.controlplane.context import Context
from edgefleet.controlplane.db import (
    Device,
    utcnow,
)

router = APIRouter()


class PinBody(_In):
    version: str = Field(min_length=1, max_length=64)
    model: str | None = Field(None, max_length=128)


class DeviceGroupBody(_In):
    group: str | None = Field(None, max_length=128)


@router.get("/devices", response_model=list[schemas.Device], tags=["devices"], **_OUT, **PAGED)
def list_devices(ctx: Context, page: Page, request: Request, response: Response) -> list[dict[str, Any]]:
    """In enrollment order, a page at a time (docs/api.md, "Pagination")."""
    st = ctx.store
    order = (Device.enrolled_at, Device.id)
    q = select(Device).order_by(*order).limit(page.limit + 1)
    if (last := page.key(datetime, str)) is not None:
        q = q.where(after(order, last))
    with st.db.session() as s:
        now = utcnow()
        rows = finish(request, response, page, list(s.scalars(q)), lambda d: (d.enrolled_at, d.id))
        return [devices.device_dict(d, overdue_after_s=st.settings.overdue_after_s, now=now) for d in rows]


# registered before /devices/{device_id}, which would otherwise take "keys" for a device id
@router.get("/devices/keys", response_model=list[schemas.DeviceKey], tags=["devices"], **_OUT, **PAGED)
def device_keys(
    ctx: Context,
    page: Page,
    request: Request,
    response: Response,
    tier: str | None = Query(None, max_length=64),
    group: str | None = Query(None, max_length=128),
) -> list[dict[str, Any]]:
    """The public keys of the active devices matching the filters: what ``package --encrypt-for-group`` uses."""
    with ctx.store.db.session() as s:
        keys = devices.public_keys(s, tier, group)
    return in_memory(request, response, page, keys, lambda k: [k["device_id"]])


@router.get("/devices/{device_id}", response_model=schemas.DeviceDetail, tags=["devices"], **_OUT)
def get_device(device_id: str, ctx: Context) -> dict[str, Any]:
    st = ctx.store
    with st.db.session() as s:
        d = devices.get_device(s, device_id)
        out = devices.device_dict(d, overdue_after_s=st.settings.overdue_after_s)
    entry = st.cache.entries.get(device_id)
    if entry is not None:
        import json

        out["desired_state"] = json.loads(entry.body)
    return out


def _device_change(
    request: Request, ctx: Context, device_id: str, action: str, fn: Any, **detail: Any
) -> dict[str, Any]:
    st = ctx.store
    with st.db.session() as s:
        d = fn(s)
        audit.record(s, _who(request).actor, action, device_id, **detail)
        out = devices.device_dict(d, overdue_after_s=st.settings.overdue_after_s)
    st.refresh([device_id])
    return out


@router.post("/devices/{device_id}/pin", response_model=schemas.Device, tags=["devices"], **_OUT)
def pin_device(device_id: str, body: PinBody, request: Request, ctx: Context) -> dict[str, Any]:
    return _device_change(
        request,
        ctx,
        device_id,
        "device.pin",
        lambda s: devices.pin(s, device_id, body.model, body.version),
        model=body.model,
        version=body.version,
    )


@router.post("/devices/{device_id}/unpin", response_model=schemas.Device, tags=["devices"], **_OUT)
def unpin_device(device_id: str, request: Request, ctx: Context) -> dict[str, Any]:
    return _device_change(request, ctx, device_id, "device.unpin", lambda s: devices.pin(s, device_id, None, None))


@router.post("/devices/{device_id}/revoke", response_model=schemas.Device, tags=["devices"], **_OUT)
def revoke_device(device_id: str, request: Request, ctx: Context) -> dict[str, Any]:
    return _device_change(request, ctx, device_id, "device.revoke", lambda s: devices.revoke(s, device_id))


@router.post("/devices/{device_id}/decommission", response_model=schemas.Device, tags=["devices"], **_OUT)
def decommission_device(device_id: str, request: Request, ctx: Context) -> dict[str, Any]:
    """Retire the device: revoked, kept for the audit, told to wipe itself on its next check-in."""
    return _device_change(request, ctx, device_id, "device.decommission", lambda s: devices.decommission(s, device_id))


@router.post("/devices/{device_id}/rotate-credential", response_model=schemas.Device, tags=["devices"], **_OUT)
def rotate_device_credential(device_id: str, request: Request, ctx: Context) -> dict[str, Any]:
    return _device_change(
        request,
        ctx,
        device_id,
        "device.rotate_credential",
        lambda s: devices.request_rotation(s, device_id=device_id)[0],
    )


@router.post("/devices/{device_id}/rotate-key", response_model=schemas.Device, tags=["devices"], **_OUT)
def rotate_device_key(device_id: str, request: Request, ctx: Context) -> dict[str, Any]:
    return _device_change(
        request,
        ctx,
        device_id,
        "device.rotate_key",
        lambda s: devices.request_rotation(s, device_id=device_id, key=True)[0],
    )


@router.post("/devices/{device_id}/group", response_model=schemas.Device, tags=["devices"], **_OUT)
def set_device_group(device_id: str, body: DeviceGroupBody, request: Request, ctx: Context) -> dict[str, Any]:
    return _device_change(
        request, ctx, device_id, "device.group", lambda s: devices.set_group(s, device_id, body.group), group=body.group
    )


class LogsRequestBody(_In):
    since_s: float = Field(3600.0, gt=0, le=30 * 86400, description="how far back the lines go, in seconds")


@router.post("/devices/{device_id}/logs/request", response_model=schemas.DeviceLogs, tags=["devices"], **_OUT)
def request_device_logs(device_id: str, body: LogsRequestBody, request: Request, ctx: Context) -> dict[str, Any]:
    """Ask the device for its recent log lines (its group must consent: ``remote_logs`` in its configuration
    document). The order goes out with its next desired state; the lines arrive with its answer (GET …/logs)."""
    st = ctx.store
    with st.db.session() as s:
        d = devices.request_logs(s, device_id, utcnow() - timedelta(seconds=body.since_s))
        audit.record(s, _who(request).actor, "device.logs_request", device_id, since_s=body.since_s)
        out = _logs_dict(d, None)
    st.refresh([device_id])
    return out


@router.get("/devices/{device_id}/logs", response_model=schemas.DeviceLogs, tags=["devices"], **_OUT)
def device_logs(device_id: str, request: Request, ctx: Context) -> dict[str, Any]:
    """The device's latest upload of log lines, and whether a request is still open. Reading them is audited."""
    with ctx.store.db.session() as s:
        d, row = devices.latest_logs(s, device_id)
        audit.record(s, _who(request).actor, "device.logs_read", device_id, upload=row.id if row else None)
        return _logs_dict(d, row)


@router.get("/devices/{device_id}/crashes", response_model=schemas.DeviceCrashes, tags=["devices"], **_OUT)
def device_crashes(
    device_id: str, ctx: Context, limit: int = Query(50, ge=1, le=crashes.KEEP_PER_DEVICE)
) -> dict[str, Any]:
    """The worker crash reports the device uploaded (its group consenting: ``crash_reports`` in its configuration
    document), newest first."""
    with ctx.store.db.session() as s:
        d, rows = crashes.list_crashes(s, device_id, limit)
        return {"device_id": d.id, "consent": crashes.consents(s, d), "crashes": [crashes.crash_dict(c) for c in rows]}


@router.get("/devices/{device_id}/samples", response_model=schemas.DeviceSamples, tags=["devices"], **_OUT)
def device_samples(
    device_id: str, ctx: Context, limit: int = Query(50, ge=1, le=samples.KEEP_PER_DEVICE)
) -> dict[str, Any]:
    """Whether the device samples its served inputs and at what rate (its group consenting: ``input_sampling`` in
    its configuration document), and the samples it uploaded, newest first: encrypted to the operator's key, only
    its holder opens them (``edgefleet samples pull``)."""
    with ctx.store.db.session() as s:
        d, rows = samples.list_samples(s, device_id, limit)
        return {
            "device_id": d.id,
            "sampling": samples.sampling_status(s, d),
            "samples": [samples.sample_dict(r) for r in rows],
        }


@router.get("/devices/{device_id}/samples/{sample_id}", response_model=schemas.SampleDownload, tags=["devices"], **_OUT)
def device_sample(device_id: str, sample_id: str, request: Request, ctx: Context) -> dict[str, Any]:
    """One input sample as the device sealed it, for the holder of its key to open. Audited."""
    with ctx.store.db.session() as s:
        row = samples.get_sample(s, device_id, sample_id)
        audit.record(s, _who(request).actor, "device.sample_download", device_id, sample_id=sample_id)
        received = row.received_at.isoformat()
        return {"device_id": device_id, "received_at": received, "sample": samples.envelope_dict(row)}


def _logs_dict(d: Any, row: Any) -> dict[str, Any]:
    def iso(t: Any) -> str | None:
        return t.isoformat() if t is not None else None

    return {
        "device_id": d.id,
        "requested_at": iso(d.logs_requested_at),
        "pending": d.logs_requested_at is not None,
        "upload": None
        if row is None
        else {
            "requested_at": iso(row.requested_at),
            "since": iso(row.since),
            "uploaded_at": iso(row.uploaded_at),
            "lines": list(row.lines),
            "dropped": row.dropped,
        },
    }
