"""The agent composed from its injection points, in-process, against the REAL control plane app: its transport
(an ASGI transport around the app, wrapped by one that injects faults), its clock, its health check and its
backend. Through a link that fails every other control-plane request, and every repository file the first time
it is asked for, the device still enrolls and converges to the desired version; the clock it is given is the one
it decides and reports by."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from _cp_support import CP, build_pkg
from edgefleet.agent import Agent, InProcessBackend, ModelInfo, WorkerSpec
from edgefleet.agent.healthcheck import HealthResult, check_latency
from edgefleet.config import AgentSettings
from edgefleet.protocol import AgentState

SKEW = timedelta(hours=2)
TIER = "x86-avx2"


class FaultyLink(httpx.AsyncBaseTransport):
    """Every other control-plane request (/api/...) fails, and each repository file (/tuf/...) fails the first
    time it is asked for; the rest reach the app."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.api_requests = 0
        self.tuf_asked: Counter[str] = Counter()
        self.injected = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.startswith("/tuf/"):
            self.tuf_asked[path] += 1
            failing = self.tuf_asked[path] == 1
        else:
            self.api_requests += 1
            failing = self.api_requests % 2 == 1
        if failing:
            self.injected += 1
            raise httpx.ConnectError("injected link fault", request=request)
        return await self.inner.handle_async_request(request)


class SkewedFastClock:
    """Wall time 2 h ahead of the machine's; monotonic time 1000 times faster than real (a 60 s probation passes
    in 60 ms); sleeps are real."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC) + SKEW

    def monotonic(self) -> float:
        return (time.monotonic() - self.t0) * 1000.0

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def _until(cond: Callable[[], Any], timeout_s: float, what: str) -> Any:
    end = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_agent_converges_through_a_faulty_transport_on_its_injected_clock(tmp_path: Path, mlp_path: Path) -> None:
    cp = CP(tmp_path / "cp", f"sqlite:///{tmp_path / 'cp.db'}")
    try:
        up = cp.upload(build_pkg(mlp_path, tmp_path / "pkgs", "1.0.0"))
        token = cp.api("POST", "/api/v1/enrollment-tokens", json={"tier": TIER})["token"]
        link = FaultyLink(httpx.ASGITransport(app=cp.app))
        clock = SkewedFastClock()
        checked: list[Path] = []

        async def health_check(spec: WorkerSpec, budget_ms_for: Callable[[ModelInfo], float | None]) -> HealthResult:
            # in this process, on the staged slot: the golden vectors and their latency, as the worker would
            checked.append(spec.path)
            backend = InProcessBackend(spec)
            try:
                info = await backend.start()
                golden = await backend.golden()
            finally:
                await backend.stop()
            ok, p95, why = check_latency(golden["latencies_s"], budget_ms_for(info))
            return HealthResult(ok, why, p95, info)

        settings = AgentSettings(
            server="http://control-plane.test",  # never resolved: the transport is the app
            token=token,
            data_dir=tmp_path / "device",
            checkin_interval_s=0.1,
            telemetry_interval_s=0.2,
            tier=TIER,  # this machine emulates the token's tier
        )

        def device() -> dict[str, Any] | None:
            devs = cp.api("GET", "/api/v1/devices")
            return devs[0] if devs else None

        async def go() -> tuple[Agent, dict[str, Any]]:
            a = Agent(
                settings,
                backend_factory=InProcessBackend,
                transport=link,
                health_check=health_check,
                clock=clock,
                serve_http=False,
            )
            await a.start()
            try:
                dev = await _until(device, 10, "enrollment")
                pin = {"model": "digits", "version": "1.0.0"}
                await asyncio.to_thread(cp.api, "POST", f"/api/v1/devices/{dev['device_id']}/pin", json=pin)
                await _until(
                    lambda: a.state.state is AgentState.committed and a.state.committed is not None,
                    15,
                    "the commit of 1.0.0",
                )

                def reported() -> dict[str, Any] | None:
                    d = device()
                    return d if d and d["served"]["version"] == "1.0.0" and d["state"] == "committed" else None

                seen = await _until(reported, 10, "the control plane to hear of the commit")
                window = a.close_window()
                lag = window.end - datetime.now(UTC)
                assert SKEW - timedelta(minutes=1) < lag < SKEW + timedelta(minutes=1), window
            finally:
                await a.stop()
            return a, seen

        a, seen = asyncio.run(go())
    finally:
        cp.close()

    assert a.state.committed is not None and a.state.committed.version == "1.0.0"
    assert a.state.committed.package_sha256 == up["package_sha256"]
    # the faults were real, on both the control plane's and the repository's requests
    assert link.injected >= 4 and link.api_requests >= 6
    assert any(p.startswith("/tuf/targets/") for p in link.tuf_asked), link.tuf_asked
    assert any(p.endswith("timestamp.json") for p in link.tuf_asked), link.tuf_asked
    # the injected health check judged the staged slot, once
    assert len(checked) == 1
    # what the device reports is dated by its clock: the server measures the device 2 h ahead of its own
    assert abs(seen["clock_offset_s"] - SKEW.total_seconds()) < 60, seen["clock_offset_s"]
