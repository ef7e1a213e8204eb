"""Update flows end to end: a real ``edgefleet agent`` process against the real control plane and its TUF
repository over HTTP, behind a faulty edge (``tests/_fleet_support.py``) that cuts a download once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from _fleet_support import AgentProc, Fleet, committed_version, make_packages, state_of
from conftest import free_port, starts_processes
from edgefleet.agent.updater import CHUNK
from edgefleet.controlplane.db import UpdateEventRow


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory: pytest.TempPathFactory, mlp_path: Path, digits: Any) -> dict[str, Path]:
    return make_packages(mlp_path, digits.x_test, tmp_path_factory.mktemp("pkgs"), ["1.0.0", "2.0.0", "3.0.0"])


@pytest.fixture
@starts_processes
def cp(tmp_path: Path, pkgs: dict[str, Path]) -> Any:
    f = Fleet(tmp_path / "cp")
    f.publish(*pkgs.values())
    yield f
    f.close()


def _device(cp: Fleet, tmp_path: Path, **opts: Any) -> AgentProc:
    return AgentProc(cp.url, cp.enrollment_token(), tmp_path / "dev", free_port(), **opts)


def _enrolled(cp: Fleet, agent: AgentProc, env: dict[str, str] | None = None) -> None:
    agent.start(env)
    agent.wait_until(lambda: cp.device_ids(), what="enrollment")


def _events(cp: Fleet) -> list[tuple[str, str | None, str | None]]:
    return cp.events()


def test_happy_path_then_update_with_cut_link(cp: Fleet, tmp_path: Path, pkgs: dict[str, Path]) -> None:
    agent = _device(cp, tmp_path)
    _enrolled(cp, agent)
    try:
        cp.pin("1.0.0", probation_seconds=0.3, probation_requests=1000)
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "committed", what="v1 committed")
        assert agent.serving() == "1.0.0"
        # The link is cut once in the middle of v2's download; the agent resumes with a Range request.
        size = pkgs["2.0.0"].stat().st_size
        cp.faults.drop_after = size // 2
        cp.rollout("2.0.0")
        agent.wait_until(lambda: committed_version(agent.data_dir) == "2.0.0", what="v2 committed")
        assert agent.serving() == "2.0.0"
        served = sum(v for k, v in cp.faults.bytes.items() if k.endswith("digits-2.0.0.efpkg"))
        assert size <= served <= size + CHUNK, (served, size)
        agent.wait_until(lambda: any(k == "committed" and v == "2.0.0" for k, v, _ in _events(cp)), what="report")
        kinds = [k for k, v, _ in _events(cp) if v == "2.0.0"]
        for k in ("download_started", "verified", "staged", "health_check_passed", "switched", "committed"):
            assert k in kinds
        agent.wait_until(lambda: cp.record()["served"]["version"] == "2.0.0", what="v2 reported as served")
        last = cp.faults.reports[-1]
        assert last.served.version == "2.0.0" and last.served.model_sha256
    finally:
        agent.stop()


def test_tampered_package_is_refused_and_reported(cp: Fleet, tmp_path: Path) -> None:
    agent = _device(cp, tmp_path)
    _enrolled(cp, agent)
    try:
        cp.pin("1.0.0", probation_seconds=0.2, probation_requests=1000)
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "committed", what="v1 committed")
        # the repository's copy of v2 altered after signing (as a compromised mirror would serve it)
        target = next((cp.settings.repo / "targets").glob("*.digits-2.0.0.efpkg"))
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
        cp.pin("2.0.0")
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "rolled_back", what="refusal")
        s = state_of(agent.data_dir)
        assert "signed metadata" in s["reason"]
        assert s["active"]["version"] == "1.0.0" and agent.serving() == "1.0.0"
        agent.wait_until(lambda: any(k == "refused" for k, _, _ in _events(cp)), what="refusal reported")
        assert not [k for k, v, _ in _events(cp) if v == "2.0.0" and k == "rolled_back"]
    finally:
        agent.stop()


def test_a_byte_flipped_on_the_link_is_caught_and_the_download_retried(cp: Fleet, tmp_path: Path) -> None:
    agent = _device(cp, tmp_path)
    _enrolled(cp, agent)
    try:
        cp.pin("1.0.0", probation_seconds=0.2, probation_requests=1000)
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "committed", what="v1 committed")
        cp.faults.corrupt = 1
        cp.pin("2.0.0")
        agent.wait_until(lambda: committed_version(agent.data_dir) == "2.0.0", what="v2 committed after a retry")
        v2 = [n for n in cp.faults.gets if n.endswith("digits-2.0.0.efpkg")]
        assert cp.faults.corrupt == 0 and [cp.faults.gets[n] for n in v2] == [2], cp.faults.gets
        assert agent.serving() == "2.0.0"
    finally:
        agent.stop()


def test_incompatible_package_refused(cp: Fleet, tmp_path: Path, mlp_path: Path, digits: Any) -> None:
    from edgefleet.package import Requirements

    pkg = make_packages(mlp_path, digits.x_test, tmp_path, ["9.0.0"], requirements=Requirements(tiers=["big-gpu"]))
    cp.publish(pkg["9.0.0"])
    agent = _device(cp, tmp_path)
    _enrolled(cp, agent)
    try:
        # a pin is the operator's word: the server sends it, and the device itself refuses what it cannot run
        cp.pin("9.0.0")
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


def test_failing_health_check_rolls_back(cp: Fleet, tmp_path: Path) -> None:
    agent = _device(cp, tmp_path)
    _enrolled(cp, agent)
    try:
        cp.pin("1.0.0", probation_seconds=0.2, probation_requests=1000)
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "committed", what="v1 committed")
        # A latency budget no model meets: the golden run's p95 breaks it.
        cp.rollout("2.0.0", p95_budget_ms=1e-6)
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "rolled_back", what="rollback")
        s = state_of(agent.data_dir)
        assert s["reason"].startswith("health check failed") and "budget" in s["reason"]
        assert agent.serving() == "1.0.0"
        agent.wait_until(lambda: any(k == "health_check_failed" for k, _, _ in _events(cp)), what="report")
        failures = [
            k for k, v, _ in _events(cp) if v == "2.0.0" and k in ("refused", "rolled_back", "health_check_failed")
        ]
        assert failures == ["health_check_failed"]  # one failed update, one failure event
        # Not retried under the same rollout id, even though the desired state still names it (no reconcile ran:
        # the rollout has not judged the failure yet) and the budget is lifted.
        cp.configure_group(probation_seconds=0.2, probation_requests=1000)
        import time

        time.sleep(1.0)
        assert state_of(agent.data_dir).get("state") == "rolled_back"
        # A new rollout id is tried again.
        cp.rollout("2.0.0", probation_seconds=0.2, probation_requests=1000)
        agent.wait_until(lambda: committed_version(agent.data_dir) == "2.0.0", what="v2 on a new rollout")
    finally:
        agent.stop()


@pytest.mark.parametrize("fault", ["abort", "alloc"])
def test_crash_loop_rolls_back(cp: Fleet, tmp_path: Path, fault: str) -> None:
    """The test hook makes v2's *serving* worker abort (or blow the emulated memory) right after loading; its
    golden vectors pass, so only probation's crash-loop rule can catch it."""
    agent = _device(cp, tmp_path, memory_mb=400)
    _enrolled(cp, agent, env={"EDGEFLEET_WORKER_FAULT": f"2.0.0:{fault}"})
    try:
        cp.pin("1.0.0", probation_seconds=0.2, probation_requests=1000)
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "committed", what="v1 committed")
        rid = cp.rollout(
            "2.0.0",
            probation_seconds=30,
            probation_requests=100000,
            crash_loop_crashes=2,
            crash_loop_window_s=30,
        )
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "rolled_back", what="rollback")
        s = state_of(agent.data_dir)
        assert s["reason"].startswith("crash loop"), s["reason"]
        # and how the worker ended, so the operator sees the cause, not only the count
        cause = "exceeds the device memory" if fault == "alloc" else "exit"
        assert "; the worker crashed: " in s["reason"] and cause in s["reason"], s["reason"]
        agent.wait_until(lambda: agent.serving() == "1.0.0", what="v1 back")
        agent.wait_until(
            lambda: any(k == "rolled_back" and "crash loop" in (r or "") for k, _, r in _events(cp)), what="report"
        )
        crashes = [r for k, _, r in _events(cp) if k == "worker_crashed"]
        assert crashes and (fault != "alloc" or any("memory" in (r or "") for r in crashes)), crashes
        # each crash names the rollout whose version crashed
        with cp.store.db.session() as s:
            rows = s.scalars(select(UpdateEventRow).where(UpdateEventRow.kind == "worker_crashed")).all()
            assert rows and {(e.version, e.rollout_id) for e in rows} == {("2.0.0", rid)}
    finally:
        agent.stop()
