"""Maintenance windows: a serving device downloads, verifies and stages a new version at any time, but switches to
it only inside one of its group's windows, in its local time zone.

The grammar (``edgefleet.protocol.parse_window``) and the evaluation (``edgefleet.agent.windows.next_open``) are
pure and tested on their own; an agent in this process, against the real control plane (``tests/_fleet_support.py``)
and on a clock the test sets, holds a staged version until the window opens, then switches."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from _fleet_support import Fleet, make_packages, running, settings, until
from edgefleet.agent.windows import next_open, window_zone
from edgefleet.controlplane.devices import render
from edgefleet.protocol import AgentState, DesiredState, DeviceConfig, MaintenanceWindow, parse_window

SAT = datetime(2026, 11, 28, tzinfo=UTC)  # a Saturday, for the pure tests


def recent_saturday() -> datetime:
    """The latest Saturday 00:00 UTC at least two days ago: times the agent's clock reports from it are in the past,
    never ahead of the server's clock (which would refuse them)."""
    day = (datetime.now(UTC) - timedelta(days=2)).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=(day.weekday() - 5) % 7)


def at(day: datetime, hh: int, mm: int = 0) -> datetime:
    return day + timedelta(hours=hh, minutes=mm)


def test_the_window_grammar() -> None:
    assert parse_window("daily 02:00-04:00") == MaintenanceWindow(frozenset(range(7)), 120, 120)
    assert parse_window("Mon-Fri 22:30-01:00") == MaintenanceWindow(frozenset(range(5)), 22 * 60 + 30, 150)
    assert parse_window("sat,Sun 00:00-24:00") == MaintenanceWindow(frozenset({5, 6}), 0, 24 * 60)
    assert parse_window("Fri-Mon 01:00-02:00").days == frozenset({4, 5, 6, 0})  # a range across the week's end
    assert parse_window("Wed 03:00-03:00").minutes == 24 * 60  # a whole day from 03:00
    for bad, why in [
        ("02:00-04:00", "write DAYS HH:MM-HH:MM"),
        ("daily 2-4", "write DAYS HH:MM-HH:MM"),
        ("weekdays 02:00-04:00", "'weekdays' is not daily, a day"),
        ("daily 25:00-26:00", "not HH:MM within a day"),
        ("daily 02:60-04:00", "not HH:MM within a day"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_window(bad)


def test_next_open() -> None:
    nightly = ["daily 02:00-04:00"]
    assert next_open(nightly, at(SAT, 3)) is None  # open
    assert next_open(nightly, at(SAT, 4)) == at(SAT, 26)  # the end is outside: next night
    assert next_open(nightly, at(SAT, 1, 59)) == at(SAT, 2)
    assert next_open([], at(SAT, 12)) is None  # no windows: any time
    late = ["Fri 23:00-01:00"]  # runs past midnight into Saturday
    assert next_open(late, at(SAT, 0, 30)) is None
    assert next_open(late, at(SAT, 1)) == at(SAT, 6 * 24 + 23)  # next Friday
    weekend = ["Sat,Sun 10:00-11:00", "Mon-Fri 20:00-21:00"]
    assert next_open(weekend, at(SAT, 12)) == at(SAT, 24 + 10)  # the soonest of several
    # local time: 02:00 in Berlin (UTC+1 in November) is 01:00 UTC
    berlin = window_zone("Europe/Berlin")
    assert next_open(nightly, at(SAT, 1, 30), berlin) is None
    assert next_open(nightly, at(SAT, 0, 30), berlin) == at(SAT, 1).astimezone(berlin)
    assert window_zone(None) is UTC and window_zone("No/Such_Zone") is UTC  # a device without the zone: UTC


def test_the_document_refuses_bad_windows_and_zones_and_leaves_them_out_unset() -> None:
    with pytest.raises(ValidationError, match="write DAYS HH:MM-HH:MM"):
        DeviceConfig(maintenance_windows=["soon"])
    with pytest.raises(ValidationError, match="not an IANA time zone name"):
        DeviceConfig(timezone="Mars/Olympus")
    plain = render(DesiredState(device_id="d1"))
    assert b"maintenance_windows" not in plain and b"timezone" not in plain
    doc = DeviceConfig(maintenance_windows=["Mon-Fri 02:00-04:00"], timezone="Europe/Berlin")
    back = DesiredState.model_validate_json(render(DesiredState(device_id="d1", config=doc))).config
    assert back.maintenance_windows == ["Mon-Fri 02:00-04:00"] and back.timezone == "Europe/Berlin"


class SetClock:
    """Wall time the test sets; monotonic time and sleeps are real (a sleep is at most 50 ms, so the agent looks
    at the wall time again soon after the test moves it)."""

    def __init__(self, now: datetime) -> None:
        self.wall = now

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(min(seconds, 0.05))


def test_a_staged_version_waits_for_the_window_then_switches(
    fleet: Fleet, tmp_path: Path, mlp_path: Path, digits: Any
) -> None:
    from edgefleet.agent import InProcessBackend

    fleet.publish(*make_packages(mlp_path, digits.x_test, tmp_path / "pkgs", ["1.0.0", "2.0.0"]).values())
    sat = recent_saturday()
    clock = SetClock(at(sat, 12))
    conf = settings(tmp_path / "dev", "http://control-plane.test", fleet.enrollment_token())
    fast: dict[str, Any] = {"probation_seconds": 0.2, "probation_requests": 1000}

    async def go() -> None:
        async with running(conf, transport=fleet.transport(), clock=clock, backend_factory=InProcessBackend) as a:
            await until(lambda: fleet.device_ids(), 30, "enrollment")
            # the first install serves nothing yet: there is no service to protect, so no wait
            await asyncio.to_thread(fleet.pin, "1.0.0", maintenance_windows=["daily 02:00-04:00"], **fast)
            await until(lambda: a.state.committed is not None, 60, "v1 committed")
            await asyncio.to_thread(fleet.pin, "2.0.0")
            await until(lambda: "waiting for the maintenance window" in (a.state.reason or ""), 60, "the wait")
            sunday_2am = at(sat, 26).isoformat(timespec="minutes")
            assert a.state.state is AgentState.staged and sunday_2am in (a.state.reason or ""), a.state.reason
            await asyncio.sleep(1.0)  # time passes, the window stays shut: no switch
            assert a.state.state is AgentState.staged and a.state.active and a.state.active.version == "1.0.0"
            reported = await asyncio.to_thread(fleet.record)
            assert "waiting for the maintenance window" in (reported["state_reason"] or ""), reported
            clock.wall = at(sat, 26, 5)  # Sunday 02:05: open
            await until(
                lambda: a.state.committed is not None and a.state.committed.version == "2.0.0", 60, "v2 committed"
            )

    asyncio.run(go())


def _step_at(fleet: Fleet, rollout_id: str, now: datetime) -> tuple[str, str]:
    """One reconciler step of the rollout as if at ``now``: its (state, reason) after."""
    from edgefleet.controlplane.db import Rollout
    from edgefleet.controlplane.reconciler import step

    with fleet.store.db.session() as s:
        r = s.get(Rollout, rollout_id)
        assert r is not None
        step(s, r, "test", now=now)
        return r.state, r.reason or ""


def test_a_wave_bakes_from_the_switch_not_from_the_move(
    fleet: Fleet, tmp_path: Path, mlp_path: Path, digits: Any
) -> None:
    """A rollout's wave whose device holds the new version for its window has not begun to bake: hours after the
    move it is still waiting (never paused as "inconclusive at the bake deadline"), and once the device switches
    the bake counts from that switch."""
    from edgefleet.agent import InProcessBackend
    from edgefleet.controlplane.db import utcnow

    fleet.publish(*make_packages(mlp_path, digits.x_test, tmp_path / "pkgs", ["1.0.0", "2.0.0"]).values())
    sat = recent_saturday()
    clock = SetClock(at(sat, 12))
    conf = settings(tmp_path / "dev", "http://control-plane.test", fleet.enrollment_token())
    fast: dict[str, Any] = {"probation_seconds": 0.2, "probation_requests": 1000}

    async def go() -> None:
        async with running(conf, transport=fleet.transport(), clock=clock, backend_factory=InProcessBackend) as a:
            await until(lambda: fleet.device_ids(), 30, "enrollment")
            await asyncio.to_thread(fleet.pin, "1.0.0", maintenance_windows=["daily 02:00-04:00"], **fast)
            await until(lambda: a.state.committed is not None, 60, "v1 committed")
            rid = await asyncio.to_thread(fleet.rollout, "2.0.0")  # one wave, bake 3600 s
            await until(lambda: "waiting for the maintenance window" in (a.state.reason or ""), 60, "the wait")
            state, reason = await asyncio.to_thread(_step_at, fleet, rid, utcnow() + timedelta(hours=2))
            # not "paused: inconclusive at bake deadline": two hours after the move, the wave has not begun to bake
            assert state == "running" and reason.startswith("wave 0 inconclusive: need 1 committed"), reason
            clock.wall = at(sat, 26, 5)  # the window opens: the device switches
            await until(
                lambda: a.state.committed is not None and a.state.committed.version == "2.0.0", 60, "v2 committed"
            )
            await until(lambda: ("committed", "2.0.0") in [(k, v) for k, v, _ in fleet.events()], 30, "the event")
            state, reason = await asyncio.to_thread(_step_at, fleet, rid, utcnow() + timedelta(minutes=10))
            assert state == "running" and reason.startswith("wave 0 baking ("), reason
            baked = float(reason.split("(")[1].split("/")[0])
            assert 595 <= baked <= 660, reason

    asyncio.run(go())
