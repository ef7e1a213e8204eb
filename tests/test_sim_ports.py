"""Ports for child processes: chosen outside the kernel's ephemeral range, and a child that loses its port to
another process before it binds it (the gap between choosing a port and the child's bind) starts again on a new one
instead of leaving the simulated fleet one device short until a timeout."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

import edgefleet.sim.fleet as fleet_mod
import edgefleet.sim.server as server_mod
from edgefleet.errors import EdgefleetError
from edgefleet.sim import Fleet, FleetOptions, ServerProcess, parse_tiers, plan_fleet
from edgefleet.sim.server import _ephemeral_low, free_port


def test_free_ports_are_below_the_ephemeral_range_free_and_never_repeated() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(p < _ephemeral_low() for p in ports)
    for p in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


@pytest.fixture
def held() -> Iterator[int]:
    """A port another process holds (listening), which the first :func:`free_port` below hands out anyway."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _first_taken(monkeypatch: pytest.MonkeyPatch, module: object, port: int) -> list[int]:
    given: list[int] = []

    def fake() -> int:
        given.append(port if not given else free_port())
        return given[-1]

    monkeypatch.setattr(module, "free_port", fake)
    return given


@pytest.mark.process
@pytest.mark.timeout(120)
def test_a_server_that_lost_its_port_starts_on_another(
    tmp_path: Path, held: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    given = _first_taken(monkeypatch, server_mod, held)
    server = ServerProcess(tmp_path / "server")
    try:
        url = server.start()
        assert given[0] == held and server.port == given[1] != held and url.endswith(f":{given[1]}")
    finally:
        server.stop()
    # a port the caller named is the caller's: lost, it is an error, not a silent move
    named = ServerProcess(tmp_path / "named", port=held)
    with pytest.raises(EdgefleetError, match="exited"):
        named.start()


@pytest.mark.process
@pytest.mark.timeout(180)
def test_a_full_agent_that_lost_its_port_starts_again_and_enrolls(
    tmp_path: Path, held: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = ServerProcess(tmp_path / "server")
    server.start()
    given = _first_taken(monkeypatch, fleet_mod, held)
    plans = plan_fleet(parse_tiers("x86-avx2", 1), full=1)

    async def run() -> None:
        fleet = Fleet(server.url, server.admin_token, plans, tmp_path / "fleet", FleetOptions())
        try:
            await fleet.start()
            devs = await fleet.wait_enrolled(90)
            assert len(devs) == 1
            a = fleet.full[0]
            assert given[0] == held and a.port == given[1] and a.port_retries == 1
            assert "could not listen" in (a.log.read_text() if a.log else "")
        finally:
            await fleet.stop()

    try:
        asyncio.run(run())
    finally:
        server.stop()


@pytest.mark.process
@pytest.mark.timeout(120)
def test_a_full_agent_that_dies_before_enrolling_is_named_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = ServerProcess(tmp_path / "server")
    server.start()
    # the agent's command, replaced by one that says why it gives up and exits (the agent's arguments follow it)
    monkeypatch.setattr(fleet_mod, "edgefleet_command", lambda: ["sh", "-c", "echo no such tier; exit 4", "sh"])
    plans = plan_fleet(parse_tiers("x86-avx2", 1), full=1)

    async def run() -> None:
        fleet = Fleet(server.url, server.admin_token, plans, tmp_path / "fleet", FleetOptions())
        try:
            await fleet.start()
            with pytest.raises(EdgefleetError, match=r"exited \(4\) before it enrolled: no such tier$"):
                await fleet.wait_enrolled(60)
        finally:
            await fleet.stop()

    try:
        asyncio.run(run())
    finally:
        server.stop()
