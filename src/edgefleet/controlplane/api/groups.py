"""Device groups: channel, configuration, pinned version, credential rotation of every member."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import Field
from sqlalchemy import select

from edgefleet.controlplane import audit, devices, schemas
from edgefleet.controlplane.api._paging import PAGED, Page, after, finish
from edgefleet.controlplane.api._shared import _ID, _OUT, _In, _who
from edgefleet.controlplane.context import Context
from edgefleet.controlplane.db import (
    DeviceGroup,
)
from edgefleet.errors import UsageError
from edgefleet.protocol import DeviceConfig

router = APIRouter()

# remote diagnostics a group opts into (protocol.DeviceConfig): each change is audited as group.consent
_CONSENTS = ("remote_logs", "crash_reports", "input_sampling", "sample_rate_per_min", "sample_public_key")


class GroupBody(_In):
    channel: str | None = Field(None, pattern="^(dev|canary|stable)$")
    config: DeviceConfig | None = None
    pinned_model: str | None = Field(None, max_length=128)
    pinned_version: str | None = Field(None, max_length=64)
    unpin: bool = False


@router.post("/groups/{name}/rotate-credential", response_model=schemas.GroupRotation, tags=["groups"], **_OUT)
def rotate_group_credentials(name: str, request: Request, ctx: Context, key: bool = False) -> dict[str, Any]:
    """Ask every live device of the group to rotate its credential (``key=true``: its X25519 key pair)."""
    st = ctx.store
    with st.db.session() as s:
        ids = [d.id for d in devices.request_rotation(s, group=name, key=key)]
        action = "group.rotate_key" if key else "group.rotate_credential"
        audit.record(s, _who(request).actor, action, name, devices=ids)
    st.refresh(ids)
    return {"group": name, "key": key, "devices": ids}


@router.get("/groups", response_model=list[schemas.Group], tags=["groups"], **_OUT, **PAGED)
def list_groups(ctx: Context, page: Page, request: Request, response: Response) -> list[dict[str, Any]]:
    q = select(DeviceGroup).order_by(DeviceGroup.name).limit(page.limit + 1)
    if (last := page.key(str)) is not None:
        q = q.where(after([DeviceGroup.name], last))
    with ctx.store.db.session() as s:
        return [
            {
                "name": g.name,
                "channel": g.channel,
                "config": g.config,
                "pinned": {"model": g.pinned_model, "version": g.pinned_version} if g.pinned_version else None,
            }
            for g in finish(request, response, page, list(s.scalars(q)), lambda g: (g.name,))
        ]


@router.put("/groups/{name}", response_model=schemas.Group, tags=["groups"], **_OUT)
def put_group(name: str, body: GroupBody, request: Request, ctx: Context) -> dict[str, Any]:
    if not _ID.match(name):
        raise UsageError("group names use letters, digits, '.', '_', ':' and '-' (at most 128)")
    st = ctx.store
    with st.db.session() as s:
        before = s.get(DeviceGroup, name)
        was = DeviceConfig.model_validate(before.config or {}) if before is not None else DeviceConfig()
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
        now = DeviceConfig.model_validate(g.config or {})
        changed = {k: getattr(now, k) for k in _CONSENTS if getattr(now, k) != getattr(was, k)}
        if changed:  # what a group lets leave its devices: findable on its own in the audit log
            audit.record(s, _who(request).actor, "group.consent", name, **changed)
        out = {
            "name": g.name,
            "channel": g.channel,
            "config": g.config,
            "pinned": {"model": g.pinned_model, "version": g.pinned_version} if g.pinned_version else None,
        }
    st.sync()  # every device of the group has a new desired state (config or pin)
    return out
