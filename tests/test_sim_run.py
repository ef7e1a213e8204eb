"""A short simulated fleet against a real `edgefleet server` subprocess: 3 full agents (`edgefleet agent`
processes) and 9 lightweight ones, every fault kind at least once, while v1 rolls out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from _cp_support import gate_verdict
from edgefleet.data import CallData
from edgefleet.package import build_package
from edgefleet.sim import Fleet, FleetOptions, ServerProcess, parse_faults, parse_tiers, plan_fleet
from edgefleet.sim.lite import SimAgent

FAULTS = (
    "flaky=0.3@x86-avx2,cut=4s@x86-avx2,slow=300ms@arm-a72,clock-skew=2h@arm-a72,memory=64@x86-vnni,"
    "crash=1.0.0@rk3308,disk-full@arm-a72,power-loss@x86-avx2"
)


def _device_id(a: SimAgent) -> str:
    assert a.cp is not None and a.cp.device_id is not None, "the simulated agent has not enrolled"
    return a.cp.device_id


async def _until(pred: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    end = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < end:
        if await pred():
            return True
        await asyncio.sleep(0.5)
    return False


@pytest.mark.process
@pytest.mark.timeout(240)
def test_every_fault_kind_with_full_and_lightweight_agents(
    tmp_path: Path, mlp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="edgefleet.agent")  # quiet, and restored for the tests after this
    pkg = build_package(
        mlp_path,
        tmp_path / "digits-1.0.0.efpkg",
        name="digits",
        version="1.0.0",
        sample_inputs=CallData({"X": np.zeros((4, 1, 64), np.float32)}),
    )
    plans = plan_fleet(parse_tiers(None, 12), full=3, faults=parse_faults(FAULTS))
    by_kind = {f.kind: p for p in plans for f in p.faults}
    assert set(by_kind) == {"flaky", "cut", "slow", "clock-skew", "memory", "crash", "disk-full", "power-loss"}
    server = ServerProcess(tmp_path / "server")
    server.start()

    async def run() -> None:
        fleet = Fleet(server.url, server.admin_token, plans, tmp_path / "fleet", FleetOptions(probation_s=2))
        try:
            await fleet.start()
            # a wave covers the devices enrolled when it starts: a device whose link is cut or flaky enrolls late
            await fleet.wait_enrolled(120)
            await fleet.publish(pkg, gate=gate_verdict())
            await fleet.api(
                "POST",
                "/api/v1/rollouts",
                json={
                    "model": "digits",
                    "version": "1.0.0",
                    "policy": {"waves": [100], "bake_s": 0, "min_devices": 1, "min_requests": 0},
                },
            )

            async def settled() -> bool:
                devs = await fleet.api("GET", "/api/v1/devices")
                return (
                    len(devs) == 12
                    and fleet.power_kills == 1
                    and sum(d["state"] in ("committed", "rolled_back") for d in devs) >= 10
                )

            assert await _until(settled, 150), fleet.summary()
            devs = {d["device_id"]: d for d in await fleet.api("GET", "/api/v1/devices")}
            s = fleet.summary()
            # link faults were injected, yet nearly every check-in still got through
            assert s["injected_link_faults"] > 0 and s["checkins_ok"] > 0.8 * s["checkins"]
            # power loss: the agent was killed -9 mid-update, restarted from its disk, and finished the update
            victim = next(a for a in fleet.full if a.kills)
            assert await _until(lambda: _served(fleet, victim.device_id(), "1.0.0"), 60)
            # the chipset fault: version 1.0.0 aborts the real worker process of the rk3308 device → rolled back
            crashed = next(a for a in fleet.full if a.plan.fault("crash"))
            assert devs[crashed.device_id()]["state"] == "rolled_back", devs[crashed.device_id()]
            # disk full: the package cannot be written, so the device never serves 1.0.0
            disk = next(a for a in fleet.full if a.plan.fault("disk-full"))
            assert devs[disk.device_id()]["served"]["version"] is None
            # memory: a lightweight agent with 64 MB cannot load the model (simulated out-of-memory) → rolled back
            small = next(a for a in fleet.lite if a.plan.fault("memory"))
            assert devs[_device_id(small)]["state"] == "rolled_back"
            assert "MB" in (devs[_device_id(small)]["state_reason"] or "")
            # the rest — slow, flaky, cut and skewed links included — serve 1.0.0
            for a in fleet.lite:
                if a.plan.fault("crash"):  # emulated: the shared model "crashes" on every call → probation fails
                    assert devs[_device_id(a)]["state"] == "rolled_back"
            healthy = [a for a in fleet.lite if not a.plan.fault("crash") and not a.plan.fault("memory")]
            assert any(a.plan.faults for a in healthy)

            async def all_served() -> bool:
                return all([await _served(fleet, _device_id(a), "1.0.0") for a in healthy])

            assert await _until(all_served, 90), [(a.plan.faults, a.state.state) for a in healthy]
        finally:
            await fleet.stop()

    async def _served(fleet: Fleet, device_id: str | None, version: str) -> bool:
        devs = {d["device_id"]: d for d in await fleet.api("GET", "/api/v1/devices")}
        return device_id in devs and devs[device_id]["served"]["version"] == version

    try:
        asyncio.run(run())
    finally:
        server.stop()
