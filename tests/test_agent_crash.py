"""``kill -9`` at every durable step of an update (before/after each fsync and rename), restart, and check which
version serves — the committed one or the new one, never nothing and never a half-installed slot.

The crash is the agent's own ``os._exit`` at a named point (``EDGEFLEET_AGENT_CRASHPOINT``), which loses exactly
what a ``kill -9`` or a power cut loses. The device talks to the real control plane behind a faulty edge
(``tests/_fleet_support.py``). After the crash the agent restarts *offline* (the edge answers 503), so what serves
is what recovery chose, not a fresh update; then the link returns and the update completes.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from _fleet_support import AgentProc, Fleet, committed_version, make_packages, state_of
from conftest import free_port, starts_processes
from edgefleet.agent.durable import CRASH_EXIT_CODE, CRASHPOINT_ENV

STEPS = [
    "state.downloading",
    "state.verifying",
    "stage",
    "state.staged",
    "state.health_check",
    "state.probation",
    "state.committed",
]
POINTS = [f"{s}.{p}" for s in STEPS for p in ("before_fsync", "after_fsync", "after_rename")]
SWITCHED = {"state.probation.after_rename"} | {p for p in POINTS if p.startswith("state.committed")}
FAST: dict[str, Any] = {"probation_seconds": 0.2, "probation_requests": 1000}


@dataclass
class World:
    fleet: Fleet
    token: str  # the token that enrolled the device: every copy starts with it, so none re-enrolls
    v1_dir: Path


@pytest.fixture(scope="module")
@starts_processes
def world(tmp_path_factory: pytest.TempPathFactory, mlp_path: Path, digits: Any) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("crash")
    pkgs = make_packages(mlp_path, digits.x_test, tmp, ["1.0.0", "2.0.0"])
    fleet = Fleet(tmp / "cp")
    fleet.publish(*pkgs.values())
    # One device with v1 committed, copied for every case. Every copy is the same device to the control plane
    # (same id and credential): the cases run one at a time, each setting what it desires before it starts.
    token = fleet.enrollment_token()
    agent = AgentProc(fleet.url, token, tmp / "v1-device", free_port())
    agent.start()
    try:
        agent.wait_until(lambda: fleet.device_ids(), what="enrollment")
        fleet.pin("1.0.0", **FAST)
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "committed", what="v1 committed")
    finally:
        agent.stop()
    yield World(fleet, token, tmp / "v1-device")
    fleet.close()


def _crash_and_restart(w: World, data_dir: Path, point: str, version: str) -> AgentProc:
    w.fleet.faults.offline = False
    # A fresh rollout per case: the desired state names a rollout id this copy of the device has never seen.
    w.fleet.rollout(version, **FAST)
    agent = AgentProc(w.fleet.url, w.token, data_dir, free_port())
    agent.start(env={CRASHPOINT_ENV: point})
    assert agent.wait_exit(60) == CRASH_EXIT_CODE, f"the agent never reached {point}"
    w.fleet.faults.offline = True
    agent.start()
    agent.wait_until(lambda: agent.serving() != "down", what="the restarted agent's API")
    return agent


@pytest.mark.parametrize("point", POINTS)
def test_kill9_during_update(world: World, tmp_path: Path, point: str) -> None:
    data_dir = tmp_path / "dev"
    shutil.copytree(world.v1_dir, data_dir)
    agent = _crash_and_restart(world, data_dir, point, "2.0.0")
    try:
        want = "2.0.0" if point in SWITCHED else "1.0.0"
        assert agent.serving() == want
        world.fleet.faults.offline = False
        agent.wait_until(lambda: committed_version(data_dir) == "2.0.0", what="the update to finish")
        agent.wait_until(lambda: agent.serving() == "2.0.0", what="v2 serving")
    finally:
        agent.stop()


@pytest.mark.parametrize(
    "point",
    [
        "state.downloading.after_rename",
        "stage.after_rename",
        "state.health_check.after_rename",
        "state.probation.after_fsync",
        "state.probation.after_rename",
        "state.committed.before_fsync",
    ],
)
def test_kill9_during_first_install(world: World, tmp_path: Path, point: str) -> None:
    data_dir = tmp_path / "dev"
    data_dir.mkdir()
    for name in ("identity.json", "device.key", "device.pub", "tuf"):  # enrolled, nothing installed yet
        src = world.v1_dir / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, data_dir / name)
    agent = _crash_and_restart(world, data_dir, point, "1.0.0")
    try:
        assert agent.serving() == ("1.0.0" if point in SWITCHED else None)
        world.fleet.faults.offline = False
        agent.wait_until(lambda: committed_version(data_dir) == "1.0.0", what="the install to finish")
    finally:
        agent.stop()
