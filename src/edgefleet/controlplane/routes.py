"""The operator API: registry, devices, groups, rollouts, compatibility, fleet KPIs, audit, tokens.

Every route here depends on :func:`auth.authorize` (the matrix decides the role it needs) and every mutating one
writes an audit entry in the same transaction as its change."""

from __future__ import annotations

import hashlib
import re
import secrets
import shutil
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body, Depends, Query, Request, Response, Security
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from edgefleet.controlplane import audit, compat, devices, kpi, reconciler, registry, schemas
from edgefleet.controlplane.auth import Principal, authorize, hash_secret, new_secret
from edgefleet.controlplane.db import (
    ApiToken,
    DeviceGroup,
    ModelVersion,
    Rollout,
    RolloutDevice,
    RolloutTransition,
    utcnow,
)
from edgefleet.controlplane.rollout import RolloutPlan, RolloutPolicy, RolloutState
from edgefleet.errors import ConflictError, ForbiddenError, NotFoundError, TooLargeError, UsageError
from edgefleet.protocol import API_PREFIX, DeviceConfig

if TYPE_CHECKING:
    from edgefleet.controlplane.store import Store

__all__ = ["API_TOKEN", "router"]

# Declares the operator token in the OpenAPI document (Swagger's "Authorize" button sends it). It never refuses a
# request itself (auto_error=False): ``authorize`` does, with the matrix's role check and the server's own messages.
API_TOKEN = HTTPBearer(
    scheme_name="apiToken",
    description="An operator API token (`edgefleet tokens create --role R`, or the admin token the server wrote).",
    auto_error=False,
)

router = APIRouter(prefix=API_PREFIX, dependencies=[Depends(authorize), Security(API_TOKEN)])

# Every route answers with its response model's schema, serialized with exactly the keys the route's dict holds.
_OUT: dict[str, Any] = {"response_model_exclude_unset": True}


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


_TOKEN_MAX_S = 10 * 365 * 86400.0


class TokenCreate(_In):
    role: str = Field(pattern="^(admin|operator|viewer)$")
    name: str = Field("api", min_length=1, max_length=128)
    # default: the server's ``token_expires_s``; only the bootstrap / configured admin token never expires
    expires_s: float | None = Field(None, gt=0, le=_TOKEN_MAX_S)


class TokenRotate(_In):
    grace_s: float = Field(0.0, ge=0, le=30 * 86400)
    # default: the old token's kind (a never-expiring token stays so), else the server's ``token_expires_s``
    expires_s: float | None = Field(None, gt=0, le=_TOKEN_MAX_S)


class EnrollTokenCreate(_In):
    tier: str = Field(min_length=1, max_length=64)
    group: str | None = Field(None, max_length=128)
    expires_s: float = Field(3600.0, gt=0, le=365 * 86400)


class PinBody(_In):
    version: str = Field(min_length=1, max_length=64)
    model: str | None = Field(None, max_length=128)


class GroupBody(_In):
    channel: str | None = Field(None, pattern="^(dev|canary|stable)$")
    config: DeviceConfig | None = None
    pinned_model: str | None = Field(None, max_length=128)
    pinned_version: str | None = Field(None, max_length=64)
    unpin: bool = False


class DeviceGroupBody(_In):
    group: str | None = Field(None, max_length=128)


class _Override(_In):
    """``force`` releases a version the release policy refuses (admin only; ``reason`` goes to the audit log)."""

    force: bool = False
    reason: str | None = Field(None, max_length=2000)


class PromoteBody(_Override):
    to: str | None = Field(None, pattern="^(dev|canary|stable)$")


class RolloutCreate(_Override):
    model: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)
    tier: str | None = Field(None, max_length=64)
    channel: str | None = Field(None, pattern="^(dev|canary|stable)$")
    policy: RolloutPolicy = Field(default_factory=RolloutPolicy)


class ReleasePolicyBody(_In):
    """Fields left out stay as they are; ``null`` inherits (a model from the global policy, the global policy from
    the built-in default)."""

    require_gate: bool | None = None
    require_bench: bool | None = None
    reason: str | None = Field(None, max_length=2000)


class ActionBody(_In):
    reason: str | None = Field(None, max_length=2000)


class CompatClear(_In):
    tier: str = Field(min_length=1, max_length=64)
    runtime_version: str = Field(max_length=64)
    model: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)
    reason: str | None = Field(None, max_length=2000)


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _who(request: Request) -> Principal:
    p: Principal = request.state.principal
    return p


_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


# ------------------------------------------------------------------------------------------------ misc


@router.get("/whoami", response_model=schemas.WhoAmI, tags=["tokens"], **_OUT)
def whoami(request: Request) -> dict[str, Any]:
    p = _who(request)
    return {"name": p.name, "role": p.role}


def _token_dict(t: ApiToken, now: datetime) -> dict[str, Any]:
    expired = t.expires_at is not None and t.expires_at <= now
    status = "revoked" if t.revoked_at is not None else "expired" if expired else "active"
    return {
        "id": t.id,
        "name": t.name,
        "role": t.role,
        "created_at": t.created_at.isoformat(),
        "expires_at": t.expires_at.isoformat() if t.expires_at else None,
        "never_expires": t.expires_at is None,
        "status": status,
        "revoked": t.revoked_at is not None,
        "replaced_by": t.replaced_by,
    }


@router.get("/tokens", response_model=list[schemas.ApiToken], tags=["tokens"], **_OUT)
def list_tokens(request: Request) -> list[dict[str, Any]]:
    now = utcnow()
    with _store(request).db.session() as s:
        return [_token_dict(t, now) for t in s.scalars(select(ApiToken).order_by(ApiToken.id))]


@router.post("/tokens", status_code=201, response_model=schemas.ApiTokenCreated, tags=["tokens"], **_OUT)
def create_token(body: TokenCreate, request: Request) -> dict[str, Any]:
    token = new_secret("efa")
    st = _store(request)
    now = utcnow()
    expires_at = now + timedelta(seconds=body.expires_s or st.settings.token_expires_s)
    with st.db.session() as s:
        row = ApiToken(name=body.name, role=body.role, token_hash=hash_secret(token), expires_at=expires_at)
        s.add(row)
        s.flush()
        audit.record(
            s,
            _who(request).actor,
            "token.create",
            str(row.id),
            role=body.role,
            name=body.name,
            expires_at=expires_at.isoformat(),
        )
        return _token_dict(row, now) | {"token": token}


@router.post(
    "/tokens/{token_id}/rotate", status_code=201, response_model=schemas.ApiTokenRotated, tags=["tokens"], **_OUT
)
def rotate_token(token_id: int, request: Request, body: TokenRotate | None = None) -> dict[str, Any]:
    """A new secret for the same name and role; the old one keeps working for ``grace_s`` (default 0), then is
    refused as expired, naming its replacement."""
    b = body or TokenRotate()
    st = _store(request)
    token = new_secret("efa")
    now = utcnow()
    with st.db.session() as s:
        old = s.scalar(select(ApiToken).where(ApiToken.id == token_id).with_for_update())
        if old is None:
            raise NotFoundError(f"no API token {token_id}")
        if old.revoked_at is not None or (old.expires_at is not None and old.expires_at <= now):
            raise ConflictError(
                f"API token {token_id} is revoked or expired: create a new one with `edgefleet tokens create`"
            )
        if old.replaced_by is not None:
            raise ConflictError(f"API token {token_id} was rotated already (replaced by {old.replaced_by})")
        if b.expires_s is not None:
            expires_at: datetime | None = now + timedelta(seconds=b.expires_s)
        else:
            expires_at = None if old.expires_at is None else now + timedelta(seconds=st.settings.token_expires_s)
        new = ApiToken(name=old.name, role=old.role, token_hash=hash_secret(token), expires_at=expires_at)
        s.add(new)
        s.flush()
        old.replaced_by = new.id
        until = now + timedelta(seconds=b.grace_s)
        old.expires_at = until if old.expires_at is None else min(old.expires_at, until)
        audit.record(
            s,
            _who(request).actor,
            "token.rotate",
            str(token_id),
            replaced_by=new.id,
            old_valid_until=old.expires_at.isoformat(),
        )
        return _token_dict(new, now) | {
            "token": token,
            "replaces": token_id,
            "old_valid_until": old.expires_at.isoformat(),
        }


@router.delete("/tokens/{token_id}", response_model=schemas.ApiTokenRevoked, tags=["tokens"], **_OUT)
def revoke_token(token_id: int, request: Request) -> dict[str, Any]:
    with _store(request).db.session() as s:
        row = s.get(ApiToken, token_id)
        if row is None:
            raise NotFoundError(f"no API token {token_id}")
        row.revoked_at = row.revoked_at or utcnow()
        audit.record(s, _who(request).actor, "token.revoke", str(token_id))
        return {"id": token_id, "revoked": True}


@router.get("/audit", response_model=list[schemas.AuditEntry], tags=["audit"], **_OUT)
def get_audit(
    request: Request, limit: int = 200, action: str | None = None, target: str | None = None
) -> list[dict[str, Any]]:
    with _store(request).db.session() as s:
        return audit.list_entries(s, limit=max(1, min(limit, 10_000)), action=action, target=target)


@router.get("/fleet", response_model=schemas.FleetKpis, tags=["fleet"], **_OUT)
def fleet(request: Request) -> dict[str, Any]:
    st = _store(request)
    with st.db.session() as s:
        return kpi.fleet_kpis(s, overdue_after_s=st.settings.overdue_after_s)


@router.get("/compat", response_model=list[schemas.CompatCell], tags=["compat"], **_OUT)
def get_compat(request: Request, model: str | None = None) -> list[dict[str, Any]]:
    with _store(request).db.session() as s:
        rows = compat.matrix(s)
        return [r for r in rows if model is None or r["model"] == model]


@router.post("/compat/clear", response_model=schemas.CompatCleared, tags=["compat"], **_OUT)
def clear_compat(body: CompatClear, request: Request) -> dict[str, Any]:
    """An operator clears a cell: its evidence stays, only what arrives from now on counts."""
    who = _who(request)
    with _store(request).db.session() as s:
        out = compat.clear(
            s,
            tier=body.tier,
            runtime_version=body.runtime_version,
            model=body.model,
            version=body.version,
            actor=who.actor,
        )
        audit.record(
            s,
            who.actor,
            "compat.clear",
            f"{body.model}:{body.version}",
            tier=body.tier,
            runtime_version=body.runtime_version,
            previous_status=out["previous_status"],
            reason=body.reason,
        )
    return out


# ------------------------------------------------------------------------------------------------ devices


@router.post("/enrollment-tokens", status_code=201, response_model=schemas.EnrollmentToken, tags=["enrollment"], **_OUT)
def create_enrollment_token(body: EnrollTokenCreate, request: Request) -> dict[str, Any]:
    st = _store(request)
    # the token pins today's TUF root: the device accepts only that root in its enroll answer
    root = devices.current_root(st.repo.path)
    with st.db.session() as s:
        token, row = devices.create_enrollment_token(
            s, tier=body.tier, group=body.group, expires_s=body.expires_s, root=root
        )
        audit.record(s, _who(request).actor, "enrollment_token.create", str(row.id), tier=body.tier, group=body.group)
        return {
            "token": token,
            "tier": row.tier,
            "group": row.group,
            "expires_at": row.expires_at.isoformat(),
            "root_version": row.root_version,
        }


@router.get("/devices", response_model=list[schemas.Device], tags=["devices"], **_OUT)
def list_devices(request: Request) -> list[dict[str, Any]]:
    st = _store(request)
    with st.db.session() as s:
        now = utcnow()
        return [
            devices.device_dict(d, overdue_after_s=st.settings.overdue_after_s, now=now)
            for d in devices.list_devices(s)
        ]


# registered before /devices/{device_id}, which would otherwise take "keys" for a device id
@router.get("/devices/keys", response_model=list[schemas.DeviceKey], tags=["devices"], **_OUT)
def device_keys(
    request: Request,
    tier: str | None = Query(None, max_length=64),
    group: str | None = Query(None, max_length=128),
) -> list[dict[str, Any]]:
    """The public keys of the active devices matching the filters: what ``package --encrypt-for-group`` uses."""
    with _store(request).db.session() as s:
        return devices.public_keys(s, tier, group)


@router.get("/devices/{device_id}", response_model=schemas.DeviceDetail, tags=["devices"], **_OUT)
def get_device(device_id: str, request: Request) -> dict[str, Any]:
    st = _store(request)
    with st.db.session() as s:
        d = devices.get_device(s, device_id)
        out = devices.device_dict(d, overdue_after_s=st.settings.overdue_after_s)
    entry = st.cache.entries.get(device_id)
    if entry is not None:
        import json

        out["desired_state"] = json.loads(entry.body)
    return out


def _device_change(request: Request, device_id: str, action: str, fn: Any, **detail: Any) -> dict[str, Any]:
    st = _store(request)
    with st.db.session() as s:
        d = fn(s)
        audit.record(s, _who(request).actor, action, device_id, **detail)
        out = devices.device_dict(d, overdue_after_s=st.settings.overdue_after_s)
    st.refresh([device_id])
    return out


@router.post("/devices/{device_id}/pin", response_model=schemas.Device, tags=["devices"], **_OUT)
def pin_device(device_id: str, body: PinBody, request: Request) -> dict[str, Any]:
    return _device_change(
        request,
        device_id,
        "device.pin",
        lambda s: devices.pin(s, device_id, body.model, body.version),
        model=body.model,
        version=body.version,
    )


@router.post("/devices/{device_id}/unpin", response_model=schemas.Device, tags=["devices"], **_OUT)
def unpin_device(device_id: str, request: Request) -> dict[str, Any]:
    return _device_change(request, device_id, "device.unpin", lambda s: devices.pin(s, device_id, None, None))


@router.post("/devices/{device_id}/revoke", response_model=schemas.Device, tags=["devices"], **_OUT)
def revoke_device(device_id: str, request: Request) -> dict[str, Any]:
    return _device_change(request, device_id, "device.revoke", lambda s: devices.revoke(s, device_id))


@router.post("/devices/{device_id}/decommission", response_model=schemas.Device, tags=["devices"], **_OUT)
def decommission_device(device_id: str, request: Request) -> dict[str, Any]:
    """Retire the device: revoked, kept for the audit, told to wipe itself on its next check-in."""
    return _device_change(request, device_id, "device.decommission", lambda s: devices.decommission(s, device_id))


@router.post("/devices/{device_id}/rotate-credential", response_model=schemas.Device, tags=["devices"], **_OUT)
def rotate_device_credential(device_id: str, request: Request) -> dict[str, Any]:
    return _device_change(
        request,
        device_id,
        "device.rotate_credential",
        lambda s: devices.request_rotation(s, device_id=device_id)[0],
    )


@router.post("/devices/{device_id}/rotate-key", response_model=schemas.Device, tags=["devices"], **_OUT)
def rotate_device_key(device_id: str, request: Request) -> dict[str, Any]:
    return _device_change(
        request,
        device_id,
        "device.rotate_key",
        lambda s: devices.request_rotation(s, device_id=device_id, key=True)[0],
    )


@router.post("/groups/{name}/rotate-credential", response_model=schemas.GroupRotation, tags=["groups"], **_OUT)
def rotate_group_credentials(name: str, request: Request, key: bool = False) -> dict[str, Any]:
    """Ask every live device of the group to rotate its credential (``key=true``: its X25519 key pair)."""
    st = _store(request)
    with st.db.session() as s:
        ids = [d.id for d in devices.request_rotation(s, group=name, key=key)]
        action = "group.rotate_key" if key else "group.rotate_credential"
        audit.record(s, _who(request).actor, action, name, devices=ids)
    st.refresh(ids)
    return {"group": name, "key": key, "devices": ids}


@router.post("/devices/{device_id}/group", response_model=schemas.Device, tags=["devices"], **_OUT)
def set_device_group(device_id: str, body: DeviceGroupBody, request: Request) -> dict[str, Any]:
    return _device_change(
        request, device_id, "device.group", lambda s: devices.set_group(s, device_id, body.group), group=body.group
    )


@router.get("/groups", response_model=list[schemas.Group], tags=["groups"], **_OUT)
def list_groups(request: Request) -> list[dict[str, Any]]:
    with _store(request).db.session() as s:
        return [
            {
                "name": g.name,
                "channel": g.channel,
                "config": g.config,
                "pinned": {"model": g.pinned_model, "version": g.pinned_version} if g.pinned_version else None,
            }
            for g in s.scalars(select(DeviceGroup).order_by(DeviceGroup.name))
        ]


@router.put("/groups/{name}", response_model=schemas.Group, tags=["groups"], **_OUT)
def put_group(name: str, body: GroupBody, request: Request) -> dict[str, Any]:
    if not _ID.match(name):
        raise UsageError("group names use letters, digits, '.', '_', ':' and '-' (at most 128)")
    st = _store(request)
    with st.db.session() as s:
        g = devices.upsert_group(
            s,
            name,
            channel=body.channel,
            config=body.config.model_dump(mode="json", exclude={"version"}) if body.config else None,
            pinned_model=body.pinned_model,
            pinned_version=body.pinned_version,
            unpin=body.unpin,
        )
        audit.record(s, _who(request).actor, "group.put", name, **body.model_dump(mode="json"))
        out = {
            "name": g.name,
            "channel": g.channel,
            "config": g.config,
            "pinned": {"model": g.pinned_model, "version": g.pinned_version} if g.pinned_version else None,
        }
    st.sync()  # every device of the group has a new desired state (config or pin)
    return out


# ------------------------------------------------------------------------------------------------ registry


@router.post(
    "/packages",
    status_code=201,
    response_model=schemas.ModelVersion,
    tags=["models"],
    **_OUT,
    openapi_extra={
        "requestBody": {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "required": True,
        }
    },
)
async def upload_package(request: Request) -> dict[str, Any]:
    """The body is streamed to a file under ``<repo>/uploads/`` and hashed on the way, never held whole: a 2 GiB
    model must not cost 2 GiB of server memory per upload. Over ``max_package_mb`` it is refused (413), from the
    declared Content-Length when there is one, else as soon as the stream passes the cap."""
    st = _store(request)
    limit = int(st.settings.max_package_mb * 1024 * 1024)
    too_large = f"package over the {st.settings.max_package_mb:g} MB upload cap (server setting max_package_mb)"
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLargeError(too_large)
    who = _who(request)
    uploads = st.repo.path / "uploads"
    await run_in_threadpool(uploads.mkdir, parents=True, exist_ok=True)
    tmp = Path(await run_in_threadpool(tempfile.mkdtemp, "", "upload-", str(uploads)))
    try:
        path = tmp / "upload.efpkg"
        size, sha256 = await _spool(request, path, limit, too_large)
        if not size:
            raise UsageError("empty upload: send the .efpkg bytes as the request body")
        return await run_in_threadpool(_publish, st, who, path, sha256)
    finally:
        await run_in_threadpool(shutil.rmtree, tmp, True)


async def _spool(request: Request, path: Path, limit: int, too_large: str) -> tuple[int, str]:
    """Write the request body to ``path`` in writes of about 1 MiB, hashing it; (size, sha256)."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray()
    f = await run_in_threadpool(path.open, "wb")
    try:
        async for c in request.stream():
            size += len(c)
            if size > limit:
                raise TooLargeError(too_large)
            h.update(c)
            buf += c
            if len(buf) >= 1 << 20:
                await run_in_threadpool(f.write, buf)
                buf.clear()
        if buf:
            await run_in_threadpool(f.write, buf)
    finally:
        await run_in_threadpool(f.close)
    return size, h.hexdigest()


def _publish(st: Store, who: Principal, path: Path, sha256: str) -> dict[str, Any]:
    opened, info = st.repo.receive(path, sha256=sha256)
    with st.db.session() as s:
        mv = registry.register_version(
            s,
            opened.manifest,
            target=info.name,
            package_sha256=info.sha256,
            length=info.length,
            reference=opened.reference,
        )
        audit.record(
            s, who.actor, "package.publish", f"{mv.model}:{mv.version}", target_name=info.name, sha256=info.sha256
        )
        return registry.version_dict(mv)


@router.get("/models", response_model=list[schemas.Model], tags=["models"], **_OUT)
def list_models(request: Request) -> list[dict[str, Any]]:
    with _store(request).db.session() as s:
        return registry.list_models(s)


@router.get("/models/{name}", response_model=schemas.Model, tags=["models"], **_OUT)
def get_model(name: str, request: Request) -> dict[str, Any]:
    with _store(request).db.session() as s:
        return registry.list_models(s, name)[0]


@router.get("/models/{name}/versions/{version}", response_model=schemas.ModelVersionDetail, tags=["models"], **_OUT)
def get_version(name: str, version: str, request: Request) -> dict[str, Any]:
    with _store(request).db.session() as s:
        mv = registry.get_version(s, name, version)
        return {**registry.version_dict(mv, full=True), "release": registry.release_status(s, mv)}


def _release_check(s: Any, mv: ModelVersion, body: _Override | None, who: Principal, action: str) -> str | None:
    """Refuse a version the release policy does not admit, unless an admin forces it: then the override (actor,
    reason, what it overrode) is audited in the same transaction as the promotion or rollout. Returns the
    overridden refusal, if any."""
    force, reason = (body.force, (body.reason or "").strip()) if body else (False, "")
    if force and not reason:
        raise UsageError("--force needs --reason: overriding the release policy is written to the audit log")
    refusal = registry.release_refusal_of(s, mv)
    if refusal is None:
        return None
    if not force:
        raise ConflictError(refusal)
    if who.role != "admin":
        raise ForbiddenError(f"overriding the release policy needs an admin token ({who.actor} is {who.role})")
    audit.record(
        s,
        who.actor,
        "release.override",
        f"{mv.model}:{mv.version}",
        overrode=action,
        reason=reason,
        refusal=refusal,
        package_sha256=mv.package_sha256,
    )
    return refusal


@router.post("/models/{name}/versions/{version}/promote", response_model=schemas.ModelVersion, tags=["models"], **_OUT)
def promote(name: str, version: str, request: Request, body: PromoteBody | None = None) -> dict[str, Any]:
    who = _who(request)
    with _store(request).db.session() as s:
        mv = registry.get_version(s, name, version)
        forced = _release_check(s, mv, body, who, "model.promote")
        old, new = registry.promote(s, mv, body.to if body else None)
        audit.record(
            s,
            who.actor,
            "model.promote",
            f"{name}:{version}",
            from_channel=old,
            to_channel=new,
            forced=forced is not None,
        )
        return registry.version_dict(mv)


@router.put(
    "/models/{name}/versions/{version}/gate", response_model=schemas.ModelVersionDetail, tags=["models"], **_OUT
)
def put_gate(
    name: str,
    version: str,
    request: Request,
    verdict: dict[str, Any] = Body(...),
    package_sha256: str | None = Query(
        None, pattern="^[0-9a-fA-F]{64}$", description="the package the verdict judged, when it does not name it"
    ),
) -> dict[str, Any]:
    who = _who(request)
    with _store(request).db.session() as s:
        mv = registry.get_version(s, name, version)
        rec = registry.attach_gate(s, mv, verdict, package_sha256=package_sha256, actor=who.actor)
        audit.record(
            s,
            who.actor,
            "model.gate",
            f"{name}:{version}",
            passed=rec["passed"],
            package_sha256=rec["package_sha256"],
        )
        return {**registry.version_dict(mv, full=True), "release": registry.release_status(s, mv)}


@router.put(
    "/models/{name}/versions/{version}/bench", response_model=schemas.ModelVersionDetail, tags=["models"], **_OUT
)
def put_bench(name: str, version: str, request: Request, bench: dict[str, Any] = Body(...)) -> dict[str, Any]:
    who = _who(request)
    with _store(request).db.session() as s:
        mv = registry.get_version(s, name, version)
        n = registry.attach_bench(s, mv, bench, actor=who.actor)
        audit.record(s, who.actor, "model.bench", f"{name}:{version}", compat_entries=n)
        return {**registry.version_dict(mv, full=True), "release": registry.release_status(s, mv)}


@router.get("/release-policy", response_model=schemas.ReleasePolicyDoc, tags=["release-policy"], **_OUT)
def get_release_policy(request: Request) -> dict[str, Any]:
    with _store(request).db.session() as s:
        return registry.policy_doc(s)


def _set_policy(request: Request, scope: str, body: ReleasePolicyBody) -> dict[str, Any]:
    who = _who(request)
    changes = {f: getattr(body, f) for f in body.model_fields_set if f != "reason"}
    with _store(request).db.session() as s:
        registry.set_policy(s, scope, changes, actor=who.actor)
        audit.record(s, who.actor, "release.policy", scope, changes=changes, reason=body.reason)
        return registry.policy_doc(s, None if scope == registry.GLOBAL_SCOPE else scope)


@router.put("/release-policy", response_model=schemas.ReleasePolicyDoc, tags=["release-policy"], **_OUT)
def put_release_policy(body: ReleasePolicyBody, request: Request) -> dict[str, Any]:
    """The global policy: what every model needs unless its own override says otherwise."""
    return _set_policy(request, registry.GLOBAL_SCOPE, body)


@router.get("/models/{name}/release-policy", response_model=schemas.ReleasePolicyDoc, tags=["release-policy"], **_OUT)
def get_model_release_policy(name: str, request: Request) -> dict[str, Any]:
    with _store(request).db.session() as s:
        return registry.policy_doc(s, name)


@router.put("/models/{name}/release-policy", response_model=schemas.ReleasePolicyDoc, tags=["release-policy"], **_OUT)
def put_model_release_policy(name: str, body: ReleasePolicyBody, request: Request) -> dict[str, Any]:
    """A model's override; it may be set before the model's first version is published."""
    if not _ID.match(name) or name == registry.GLOBAL_SCOPE:
        raise UsageError("model names use letters, digits, '.', '_', ':' and '-' (at most 128)")
    return _set_policy(request, name, body)


@router.delete(
    "/models/{name}/release-policy", response_model=schemas.ReleasePolicyDoc, tags=["release-policy"], **_OUT
)
def delete_model_release_policy(name: str, request: Request) -> dict[str, Any]:
    who = _who(request)
    with _store(request).db.session() as s:
        if not registry.clear_policy(s, name):
            raise NotFoundError(f"model {name} has no release policy override")
        audit.record(s, who.actor, "release.policy", name, cleared=True)
        return registry.policy_doc(s, name)


# ------------------------------------------------------------------------------------------------ rollouts


def rollout_dict(s: Any, r: Rollout, *, full: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "rollout_id": r.id,
        "model": r.model,
        "version": r.version,
        "tier": r.tier,
        "channel": r.channel,
        "state": r.state,
        "wave": r.wave,
        "waves": r.policy.get("waves"),
        "reason": r.reason,
        "created_at": r.created_at.isoformat(),
        "created_by": r.created_by,
        "wave_started_at": r.wave_started_at.isoformat(),
        "blocked": r.reason if r.state == RolloutState.blocked.value else None,
        # the last error of this rollout's own reconcile step (None once a step goes through again)
        "step_error": r.step_error,
    }
    if full:
        out["policy"] = r.policy
        out["devices"] = [
            {"device_id": x.device_id, "wave": x.wave, "previous_version": x.previous_version, "reverted": x.reverted}
            for x in s.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == r.id))
        ]
        out["transitions"] = [
            {
                "seq": t.seq,
                "from": t.from_state,
                "to": t.to_state,
                "wave": t.wave,
                "reason": t.reason,
                "actor": t.actor,
                "at": t.at.isoformat(),
            }
            for t in s.scalars(
                select(RolloutTransition).where(RolloutTransition.rollout_id == r.id).order_by(RolloutTransition.seq)
            )
        ]
    return out


_ACTIVE = (RolloutState.running.value, RolloutState.paused.value, RolloutState.blocked.value)


def plan_dict(p: RolloutPlan, waves: list[float]) -> dict[str, Any]:
    return {
        "waves": [
            {"wave": i, "percent": pct, "devices": list(ids)}
            for i, (pct, ids) in enumerate(zip(waves, p.waves, strict=True))
        ],
        "devices": p.devices,
        "already_on_version": list(p.already),
        "excluded": dict(sorted(p.excluded.items())),
        "blocked": p.blocked,
    }


@router.post("/rollouts/plan", response_model=schemas.RolloutPlanPreview, tags=["rollouts"], **_OUT)
def plan_rollout(body: RolloutCreate, request: Request) -> dict[str, Any]:
    """``rollout start --dry-run``: the devices each wave would move on today's fleet; starts nothing."""
    with _store(request).db.session() as s:
        mv = registry.get_version(s, body.model, body.version)
        p = reconciler.plan(s, body.model, body.version, tier=body.tier, channel=body.channel, policy=body.policy)
        refusal = registry.release_refusal_of(s, mv)
        return {
            "model": body.model,
            "version": body.version,
            "tier": body.tier,
            "channel": body.channel,
            **plan_dict(p, body.policy.waves),
            "release": {"allowed": refusal is None, "refusal": refusal},
        }


@router.post("/rollouts", status_code=201, response_model=schemas.RolloutStarted, tags=["rollouts"], **_OUT)
def start_rollout(body: RolloutCreate, request: Request) -> dict[str, Any]:
    st = _store(request)
    who = _who(request)
    with st.db.session() as s:
        mv = registry.get_version(s, body.model, body.version)
        forced = _release_check(s, mv, body, who, "rollout.start")
        active = s.scalar(select(Rollout.id).where(Rollout.model == body.model, Rollout.state.in_(_ACTIVE)))
        if active is not None:
            raise ConflictError(f"rollout {active} of {body.model} is still active: finish, abort or roll it back")
        now = utcnow()
        r = Rollout(
            id="ro-" + secrets.token_hex(6),
            model=body.model,
            version=body.version,
            tier=body.tier,
            channel=body.channel,
            policy=body.policy.model_dump(mode="json"),
            state=RolloutState.draft.value,
            wave=0,
            wave_started_at=now,
            created_by=who.actor,
            created_at=now,
        )
        s.add(r)
        s.flush()
        audit.record(
            s,
            who.actor,
            "rollout.start",
            r.id,
            model=body.model,
            version=body.version,
            tier=body.tier,
            channel=body.channel,
            policy=r.policy,
            forced=forced is not None,
        )
        why = f"started by {who.actor}"
        if forced is not None:
            why += f", overriding the release policy: {(body.reason or '').strip()}"
        reconciler.transition(s, r, RolloutState.running, why, who.actor)
        p = reconciler.plan(s, body.model, body.version, tier=body.tier, channel=body.channel, policy=body.policy)
        if p.blocked is not None:
            # say so now: the operator who started it is the one to hear that it reaches no device
            reconciler.transition(s, r, RolloutState.blocked, p.blocked, who.actor)
        out = rollout_dict(s, r)
        out["plan"] = plan_dict(p, body.policy.waves)
        out["warning"] = p.blocked
    st.wake()
    return out


@router.get("/rollouts", response_model=list[schemas.Rollout], tags=["rollouts"], **_OUT)
def list_rollouts(request: Request) -> list[dict[str, Any]]:
    with _store(request).db.session() as s:
        return [rollout_dict(s, r) for r in s.scalars(select(Rollout).order_by(Rollout.created_at.desc()))]


@router.get("/rollouts/{rollout_id}", response_model=schemas.RolloutDetail, tags=["rollouts"], **_OUT)
def get_rollout(rollout_id: str, request: Request) -> dict[str, Any]:
    with _store(request).db.session() as s:
        r = s.get(Rollout, rollout_id)
        if r is None:
            raise NotFoundError(f"no rollout {rollout_id}: `edgefleet rollout list` shows them")
        return rollout_dict(s, r, full=True)


def _action(action: str) -> Any:
    def handler(rollout_id: str, request: Request, body: ActionBody | None = None) -> dict[str, Any]:
        st = _store(request)
        out = reconciler.operator_action(st, rollout_id, action, _who(request).actor, body.reason if body else None)
        st.wake()
        return out

    handler.__name__ = f"{action}_rollout"
    return handler


for _a in ("pause", "resume", "abort", "rollback"):
    router.add_api_route(
        f"/rollouts/{{rollout_id}}/{_a}",
        _action(_a),
        methods=["POST"],
        name=f"{_a}_rollout",
        response_model=schemas.RolloutAction,
        tags=["rollouts"],
        **_OUT,
    )


def metrics_response(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
