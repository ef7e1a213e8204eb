"""``kill -9`` at every durable step of an update (before/after each fsync and rename), restart, and check which
version serves — the committed one or the new one, never nothing and never a half-installed slot.

The crash is the agent's own ``os._exit`` at a named point (``EDGEFLEET_AGENT_CRASHPOINT``), which loses exactly
what a ``kill -9`` or a power cut loses. After the crash the agent restarts *offline* (the fake control plane
answers 503), so what serves is what recovery chose, not a fresh update; then the link returns and the update
completes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from agent_support import AgentProc, FakeControlPlane, committed_version, make_packages, make_repo, state_of
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


@pytest.fixture(scope="module")
@starts_processes
def world(tmp_path_factory: pytest.TempPathFactory, mlp_path: Path, digits: Any) -> Any:
    tmp = tmp_path_factory.mktemp("crash")
    pkgs = make_packages(mlp_path, digits.x_test, tmp, ["1.0.0", "2.0.0"])
    cp = FakeControlPlane(free_port(), make_repo(tmp / "repo", list(pkgs.values())), tmp / "cp.json")
    cp.start()
    # One device with v1 committed, copied for every case.
    cp.desire("digits", "1.0.0", **FAST)
    agent = AgentProc(cp.url, tmp / "v1-device", free_port())
    agent.start()
    agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "committed", what="v1 committed")
    agent.stop()
    yield cp, tmp / "v1-device"
    cp.kill()


def _crash_and_restart(cp: FakeControlPlane, data_dir: Path, point: str, version: str) -> AgentProc:
    cp.configure(offline=False)
    cp.desire("digits", version, rollout=f"r-{version}", **FAST)
    agent = AgentProc(cp.url, data_dir, free_port())
    agent.start(env={CRASHPOINT_ENV: point})
    assert agent.wait_exit(60) == CRASH_EXIT_CODE, f"the agent never reached {point}"
    cp.configure(offline=True)
    agent.start()
    agent.wait_until(lambda: agent.serving() != "down", what="the restarted agent's API")
    return agent


@pytest.mark.parametrize("point", POINTS)
def test_kill9_during_update(world: Any, tmp_path: Path, point: str) -> None:
    cp, v1_dir = world
    data_dir = tmp_path / "dev"
    shutil.copytree(v1_dir, data_dir)
    agent = _crash_and_restart(cp, data_dir, point, "2.0.0")
    try:
        want = "2.0.0" if point in SWITCHED else "1.0.0"
        assert agent.serving() == want
        cp.configure(offline=False)
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
def test_kill9_during_first_install(world: Any, tmp_path: Path, point: str) -> None:
    cp, v1_dir = world
    data_dir = tmp_path / "dev"
    data_dir.mkdir()
    for name in ("identity.json", "device.key", "device.pub", "tuf"):  # enrolled, nothing installed yet
        src = v1_dir / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, data_dir / name)
    agent = _crash_and_restart(cp, data_dir, point, "1.0.0")
    try:
        assert agent.serving() == ("1.0.0" if point in SWITCHED else None)
        cp.configure(offline=False)
        agent.wait_until(lambda: committed_version(data_dir) == "1.0.0", what="the install to finish")
    finally:
        agent.stop()
