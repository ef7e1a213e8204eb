"""What crash reports and input samples share as device uploads under a group's consent: the consent check (409
when the device's group has not consented; a revoked or decommissioned device sends nothing), idempotent storing by
the device's own id for each item (a lost answer is sent again; it is stored once), the newest ``keep`` per device,
and listing them newest first."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from edgefleet.controlplane.db import Device, DeviceGroup
from edgefleet.controlplane.devices import get_device
from edgefleet.errors import ConflictError
from edgefleet.protocol import DeviceConfig

__all__ = ["consenting_device", "group_config", "newest", "store_once"]

Row = TypeVar("Row")


def group_config(s: Session, d: Device) -> DeviceConfig:
    """The configuration document of the device's group (the defaults, every consent off, when it has none)."""
    group = s.get(DeviceGroup, d.group) if d.group else None
    return DeviceConfig.model_validate(group.config or {}) if group is not None else DeviceConfig()


def consenting_device(
    s: Session, device_id: str, consents: Callable[[DeviceConfig], bool], what: str, how: str
) -> Device:
    """The device, if it may upload ``what``: not revoked or decommissioned, and its group consents (``how`` says
    which setting of the group's document allows it)."""
    d = get_device(s, device_id)
    if d.revoked_at is not None or d.decommissioned_at is not None:
        raise ConflictError(f"device {device_id} is revoked or decommissioned")
    if not consents(group_config(s, d)):
        where = f"group {d.group}" if d.group else "no group"
        raise ConflictError(
            f"device {device_id} is in {where}, which has not consented to {what}: set {how} in the group's "
            "configuration document (PUT /api/v1/groups/NAME) to allow it"
        )
    return d


def store_once(
    s: Session,
    model: type[Row],
    id_column: str,
    device_id: str,
    items: Iterable[tuple[str, Callable[[], Row]]],
    keep: int,
) -> tuple[list[str], list[str]]:
    """Add each ``(item id, make row)`` the device has not sent before, then keep its newest ``keep`` rows (by the
    device's clock). Returns (every id it sent, now stored; the ids new with this upload)."""
    cls: Any = model
    items = list(items)
    ids = list(dict.fromkeys(i for i, _ in items))
    col = getattr(cls, id_column)
    known = set(s.scalars(select(col).where(cls.device_id == device_id, col.in_(ids))))
    new: list[str] = []
    for item_id, make in items:
        if item_id in known:
            continue
        known.add(item_id)
        new.append(item_id)
        s.add(make())
    s.flush()
    kept = select(cls.id).where(cls.device_id == device_id).order_by(cls.at.desc(), cls.id.desc()).limit(keep)
    s.execute(delete(cls).where(cls.device_id == device_id, cls.id.not_in(kept.scalar_subquery())))
    return ids, new


def newest(s: Session, model: type[Row], device_id: str, limit: int) -> tuple[Device, list[Row]]:
    """The device and its newest ``limit`` rows of ``model``, newest first (by the device's clock)."""
    cls: Any = model
    d = get_device(s, device_id)
    rows = s.scalars(select(cls).where(cls.device_id == device_id).order_by(cls.at.desc(), cls.id.desc()).limit(limit))
    return d, list(rows)
