"""Update flows end to end: a real ``edgefleet agent`` process, a real TUF repository served over HTTP by the fake
control plane (``tests/agent_support.py``; a fake because the real control plane is built in parallel)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent_support import AgentProc, FakeControlPlane, committed_version, make_packages, make_repo, state_of
from conftest import free_port, starts_processes
from edgefleet.agent.updater import CHUNK


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory: pytest.TempPathFactory, mlp_path: Path, digits: Any) -> dict[str, Path]:
    return make_packages(mlp_path, digits.x_test, tmp_path_factory.mktemp("pkgs"), ["1.0.0", "2.0.0", "3.0.0"])


@pytest.fixture
@starts_processes
def cp(tmp_path: Path, pkgs: dict[str, Path]) -> Any:
    repo = make_repo(tmp_path / "repo", list(pkgs.values()))
    f = FakeControlPlane(free_port(), repo, tmp_path / "cp.json")
    f.start()
    yield f
    f.kill()


def _events(cp: FakeControlPlane) -> list[tuple[str, str | None, str | None]]:
    return [(e["kind"], e.get("version"), e.get("reason")) for e in cp.stats()["events"]]


def test_happy_path_then_update_with_cut_link(cp: FakeControlPlane, tmp_path: Path, pkgs: dict[str, Path]) -> None:
    cp.desire("digits", "1.0.0", probation_seconds=0.3, probation_requests=1000)
    agent = AgentProc(cp.url, tmp_path / "dev", free_port())
    agent.start()
    try:
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "committed", what="v1 committed")
        assert agent.serving() == "1.0.0"
        # The link is cut once in the middle of v2's download; the agent resumes with a Range request.
        size = pkgs["2.0.0"].stat().st_size
        cp.configure(drop_after=size // 2)
        cp.desire("digits", "2.0.0", rollout="r2", probation_seconds=0.3, probation_requests=1000)
        agent.wait_until(lambda: committed_version(agent.data_dir) == "2.0.0", what="v2 committed")
        assert agent.serving() == "2.0.0"
        served = sum(v for k, v in cp.stats()["bytes"].items() if k.endswith("digits-2.0.0.efpkg"))
        assert size <= served <= size + CHUNK, (served, size)
        agent.wait_until(lambda: any(k == "committed" and v == "2.0.0" for k, v, _ in _events(cp)), what="report")
        kinds = [k for k, v, _ in _events(cp) if v == "2.0.0"]
        for k in ("download_started", "verified", "staged", "health_check_passed", "switched", "committed"):
            assert k in kinds
        last = cp.stats()["reports"][-1]
        assert last["served"]["version"] == "2.0.0" and last["served"]["model_sha256"]
    finally:
        agent.stop()


def test_tampered_package_is_refused_and_reported(cp: FakeControlPlane, tmp_path: Path) -> None:
    cp.desire("digits", "1.0.0", probation_seconds=0.2, probation_requests=1000)
    agent = AgentProc(cp.url, tmp_path / "dev", free_port())
    agent.start()
    try:
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "committed", what="v1 committed")
        target = next((cp.repo / "targets").glob("*.digits-2.0.0.efpkg"))
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
        cp.desire("digits", "2.0.0", rollout="r2")
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "rolled_back", what="refusal")
        s = state_of(agent.data_dir)
        assert "signed metadata" in s["reason"]
        assert s["active"]["version"] == "1.0.0" and agent.serving() == "1.0.0"
        agent.wait_until(lambda: any(k == "refused" for k, _, _ in _events(cp)), what="refusal reported")
        assert not [k for k, v, _ in _events(cp) if v == "2.0.0" and k == "rolled_back"]
    finally:
        agent.stop()


def test_incompatible_package_refused(cp: FakeControlPlane, tmp_path: Path, mlp_path: Path, digits: Any) -> None:
    from edgefleet.package import Requirements
    from edgefleet.repository import Repository

    pkg = make_packages(mlp_path, digits.x_test, tmp_path, ["9.0.0"], requirements=Requirements(tiers=["big-gpu"]))
    Repository(cp.repo).publish(pkg["9.0.0"])
    cp.desire("digits", "9.0.0")
    agent = AgentProc(cp.url, tmp_path / "dev", free_port())
    agent.start()
    try:
        agent.wait_until(lambda: state_of(agent.data_dir).get("reason") or False, what="refusal")
        s = state_of(agent.data_dir)
        assert s["state"] == "rolled_back" and "incompatible" in s["reason"] and "big-gpu" in s["reason"]
        # First install refused: nothing half-installed, the device answers 503 with the reason.
        agent.wait_until(lambda: agent.serving() is None, what="503")
        import httpx

        r = httpx.post(f"{agent.url}/v2/models/digits/infer", content=b"{}")
        assert r.status_code == 503 and "incompatible" in r.json()["error"]
    finally:
        agent.stop()


def test_failing_health_check_rolls_back(cp: FakeControlPlane, tmp_path: Path) -> None:
    cp.desire("digits", "1.0.0", probation_seconds=0.2, probation_requests=1000)
    agent = AgentProc(cp.url, tmp_path / "dev", free_port())
    agent.start()
    try:
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "committed", what="v1 committed")
        # A latency budget no model meets: the golden run's p95 breaks it.
        cp.desire("digits", "2.0.0", rollout="r2", p95_budget_ms=1e-6)
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "rolled_back", what="rollback")
        s = state_of(agent.data_dir)
        assert s["reason"].startswith("health check failed") and "budget" in s["reason"]
        assert agent.serving() == "1.0.0"
        agent.wait_until(lambda: any(k == "health_check_failed" for k, _, _ in _events(cp)), what="report")
        failures = [
            k for k, v, _ in _events(cp) if v == "2.0.0" and k in ("refused", "rolled_back", "health_check_failed")
        ]
        assert failures == ["health_check_failed"]  # one failed update, one failure event
        # Not retried under the same rollout id, even though the desired state still names it.
        cp.desire("digits", "2.0.0", rollout="r2")
        import time

        time.sleep(1.0)
        assert state_of(agent.data_dir).get("state") == "rolled_back"
        # A new rollout id is tried again.
        cp.desire("digits", "2.0.0", rollout="r3", probation_seconds=0.2, probation_requests=1000)
        agent.wait_until(lambda: committed_version(agent.data_dir) == "2.0.0", what="v2 on r3")
    finally:
        agent.stop()


@pytest.mark.parametrize("fault", ["abort", "alloc"])
def test_crash_loop_rolls_back(cp: FakeControlPlane, tmp_path: Path, fault: str) -> None:
    """The test hook makes v2's *serving* worker abort (or blow the emulated memory) right after loading; its
    golden vectors pass, so only probation's crash-loop rule can catch it."""
    cp.desire("digits", "1.0.0", probation_seconds=0.2, probation_requests=1000)
    agent = AgentProc(cp.url, tmp_path / "dev", free_port(), memory_mb=400)
    agent.start(env={"EDGEFLEET_WORKER_FAULT": f"2.0.0:{fault}"})
    try:
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "committed", what="v1 committed")
        cp.desire(
            "digits",
            "2.0.0",
            rollout="r2",
            probation_seconds=30,
            probation_requests=100000,
            crash_loop_crashes=2,
            crash_loop_window_s=30,
        )
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "rolled_back", what="rollback")
        s = state_of(agent.data_dir)
        assert s["reason"].startswith("crash loop"), s["reason"]
        agent.wait_until(lambda: agent.serving() == "1.0.0", what="v1 back")
        agent.wait_until(
            lambda: any(k == "rolled_back" and "crash loop" in (r or "") for k, _, r in _events(cp)), what="report"
        )
        crashes = [r for k, _, r in _events(cp) if k == "worker_crashed"]
        assert crashes and (fault != "alloc" or any("memory" in (r or "") for r in crashes)), crashes
    finally:
        agent.stop()
