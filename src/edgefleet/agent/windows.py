"""When a device may switch to a new version: inside one of its group's maintenance windows, in its local time.

Pure: the windows come parsed from the configuration document (``edgefleet.protocol.parse_window``), the time
from the agent's clock. Outside every window the agent may download, verify and stage, and waits to switch.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, tzinfo

from edgefleet.protocol import MaintenanceWindow, parse_window

__all__ = ["next_open", "window_zone"]


def window_zone(name: str | None) -> tzinfo:
    """The zone the windows are in: ``name`` (IANA), or UTC when none is given or this device lacks the zone
    database (the server checked the name; a device without tzdata still gets a defined answer)."""
    if name is None:
        return UTC
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


def next_open(windows: Sequence[str | MaintenanceWindow], now: datetime, zone: tzinfo = UTC) -> datetime | None:
    """None when a window is open at ``now`` (or there are none); else when the next one opens, in ``zone``."""
    parsed = [w if isinstance(w, MaintenanceWindow) else parse_window(w) for w in windows]
    if not parsed:
        return None
    local = now.astimezone(zone)
    soonest: datetime | None = None
    for w in parsed:
        for offset in range(-1, 8):  # yesterday's window may still run past midnight; a week ahead covers any day
            day = (local + timedelta(days=offset)).date()
            if day.weekday() not in w.days:
                continue
            opens = datetime(day.year, day.month, day.day, tzinfo=zone) + timedelta(minutes=w.start)
            if opens <= local < opens + timedelta(minutes=w.minutes):
                return None
            if opens > local and (soonest is None or opens < soonest):
                soonest = opens
    return soonest
