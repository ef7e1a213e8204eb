"""Worker crash reports: what devices upload when their group consents (``crash_reports`` in its configuration
document), and what operators read (``GET /devices/{id}/crashes``, ``edgefleet devices crashes``, the device page).

A device cannot send reports for a group that has not consented (409): the consent is checked here as well as on
the device. Uploads are idempotent by ``crash_id`` (a lost answer is sent again; it is stored once), and each
device keeps its newest :data:`KEEP_PER_DEVICE` here.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from edgefleet.controlplane.db import Device, DeviceCrash, DeviceGroup
from edgefleet.controlplane.devices import get_device
from edgefleet.errors import ConflictError
from edgefleet.protocol import CrashUpload, DeviceConfig

__all__ = ["KEEP_PER_DEVICE", "consents", "crash_dict", "list_crashes", "store_crashes"]

KEEP_PER_DEVICE = 200


def consents(s: Session, d: Device) -> bool:
    """Whether the device's group consents to crash reports."""
    group = s.get(DeviceGroup, d.group) if d.group else None
    return group is not None and DeviceConfig.model_validate(group.config or {}).crash_reports


def store_crashes(s: Session, device_id: str, upload: CrashUpload) -> tuple[list[str], list[str]]:
    """Keep the reports of a consenting device's upload. Returns (every id it sent that is now stored, the ids
    new with this upload)."""
    d = get_device(s, device_id)
    if d.revoked_at is not None or d.decommissioned_at is not None:
        raise ConflictError(f"device {device_id} is revoked or decommissioned")
    if not consents(s, d):
        where = f"group {d.group}" if d.group else "no group"
        raise ConflictError(
            f"device {device_id} is in {where}, which has not consented to crash reports: set crash_reports in the "
            "group's configuration document (PUT /api/v1/groups/NAME) to allow it"
        )
    ids = list(dict.fromkeys(r.crash_id for r in upload.reports))
    known = set(
        s.scalars(select(DeviceCrash.crash_id).where(DeviceCrash.device_id == device_id, DeviceCrash.crash_id.in_(ids)))
    )
    new: list[str] = []
    for r in upload.reports:
        if r.crash_id in known:
            continue
        known.add(r.crash_id)
        new.append(r.crash_id)
        s.add(DeviceCrash(device_id=device_id, **r.model_dump()))
    s.flush()
    keep = select(DeviceCrash.id).where(DeviceCrash.device_id == device_id)
    keep = keep.order_by(DeviceCrash.at.desc(), DeviceCrash.id.desc()).limit(KEEP_PER_DEVICE)
    s.execute(
        delete(DeviceCrash).where(DeviceCrash.device_id == device_id, DeviceCrash.id.not_in(keep.scalar_subquery()))
    )
    return ids, new


def list_crashes(s: Session, device_id: str, limit: int = 50) -> tuple[Device, list[DeviceCrash]]:
    """The device and its newest ``limit`` crash reports, newest first (by the device's clock)."""
    d = get_device(s, device_id)
    rows = s.scalars(
        select(DeviceCrash)
        .where(DeviceCrash.device_id == device_id)
        .order_by(DeviceCrash.at.desc(), DeviceCrash.id.desc())
        .limit(limit)
    )
    return d, list(rows)


def crash_dict(c: DeviceCrash) -> dict[str, Any]:
    return {
        "crash_id": c.crash_id,
        "at": c.at.isoformat(),
        "received_at": c.received_at.isoformat(),
        "reason": c.reason,
        "exit_code": c.exit_code,
        "signal": c.signal,
        "fault": c.fault,
        "fault_dropped": c.fault_dropped,
        "rss_bytes": c.rss_bytes,
        "rss_age_s": c.rss_age_s,
        "uptime_s": c.uptime_s,
        "model": c.model,
        "version": c.version,
        "model_sha256": c.model_sha256,
        "agent_version": c.agent_version,
        "runtime_version": c.runtime_version,
    }
