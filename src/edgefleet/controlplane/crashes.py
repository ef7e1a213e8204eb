"""Worker crash reports: what devices upload when their group consents (``crash_reports`` in its configuration
document), and what operators read (``GET /devices/{id}/crashes``, ``edgefleet devices crashes``, the device page).

A device cannot send reports for a group that has not consented (409): the consent is checked here as well as on
the device. Uploads are idempotent by ``crash_id`` (a lost answer is sent again; it is stored once), and each
device keeps its newest :data:`KEEP_PER_DEVICE` here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from edgefleet.controlplane.db import Device, DeviceCrash
from edgefleet.controlplane.uploads import consenting_device, group_config, newest, store_once
from edgefleet.protocol import CrashReport, CrashUpload

__all__ = ["KEEP_PER_DEVICE", "consents", "crash_dict", "list_crashes", "store_crashes"]

KEEP_PER_DEVICE = 200


def consents(s: Session, d: Device) -> bool:
    """Whether the device's group consents to crash reports."""
    return group_config(s, d).crash_reports


def store_crashes(s: Session, device_id: str, upload: CrashUpload) -> tuple[list[str], list[str]]:
    """Keep the reports of a consenting device's upload. Returns (every id it sent that is now stored, the ids
    new with this upload)."""
    consenting_device(s, device_id, lambda c: c.crash_reports, "crash reports", "crash_reports")

    def row(r: CrashReport) -> Callable[[], DeviceCrash]:
        return lambda: DeviceCrash(device_id=device_id, **r.model_dump())

    items = ((r.crash_id, row(r)) for r in upload.reports)
    return store_once(s, DeviceCrash, "crash_id", device_id, items, KEEP_PER_DEVICE)


def list_crashes(s: Session, device_id: str, limit: int = 50) -> tuple[Device, list[DeviceCrash]]:
    """The device and its newest ``limit`` crash reports, newest first (by the device's clock)."""
    return newest(s, DeviceCrash, device_id, limit)


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
