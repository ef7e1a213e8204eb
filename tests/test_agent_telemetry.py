"""Offline-first telemetry: a long outage, a server that stores a batch and dies before answering, an agent killed
between the server's answer and its own acknowledgement — every window arrives exactly once; overflow is counted.

Real processes: ``edgefleet agent`` and the fake control plane (``tests/agent_support.py``; a fake because the
real control plane is built in parallel), killed with SIGKILL for the outages.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent_support import AgentProc, FakeControlPlane, make_packages, make_repo, state_of
from conftest import free_port, starts_processes
from edgefleet.agent.durable import CRASH_EXIT_CODE, CRASHPOINT_ENV

FAST: dict[str, Any] = {"probation_seconds": 0.2, "probation_requests": 1000, "telemetry_interval_s": 0.1}


@pytest.fixture
@starts_processes
def cp(tmp_path: Path, mlp_path: Path, digits: Any) -> Any:
    pkgs = make_packages(mlp_path, digits.x_test, tmp_path, ["1.0.0"])
    f = FakeControlPlane(free_port(), make_repo(tmp_path / "repo", list(pkgs.values())), tmp_path / "cp.json")
    f.start()
    f.desire("digits", "1.0.0", **FAST)
    yield f
    f.kill()


def _set_offline_state(cp: FakeControlPlane, **kw: Any) -> None:
    """Change the dead server's stored flags before it restarts."""
    st = json.loads(cp.state_file.read_text())
    st.update(kw)
    cp.state_file.write_text(json.dumps(st))


def _chains(windows: list[dict[str, Any]]) -> int:
    """Windows of one agent run tile time: each starts where another ended. Count the starts of chains."""
    ends = {w["end"] for w in windows}
    return sum(1 for w in windows if w["start"] not in ends)


def _drain(agent: AgentProc) -> None:
    agent.wait_until(lambda: _buffered(agent) == 0, what="the buffer to drain")


def _buffered(agent: AgentProc) -> float:
    text = httpx.get(f"{agent.url}/metrics", timeout=2).text
    line = next(x for x in text.splitlines() if x.startswith("edgefleet_agent_telemetry_buffered_records "))
    return float(line.split()[1])


def test_exactly_once_through_outages_and_restarts(cp: FakeControlPlane, tmp_path: Path) -> None:
    agent = AgentProc(cp.url, tmp_path / "dev", free_port())
    agent.start()
    try:
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "committed", what="v1 committed")
        for _ in range(5):  # some traffic, so windows carry counts and latency sketches
            httpx.post(
                f"{agent.url}/v2/models/digits/infer",
                json={"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]},
            ).raise_for_status()
        # A long outage (the server is gone), then a server that stores the first batch and dies unanswered.
        cp.kill()
        time.sleep(2.0)
        assert agent.serving() == "1.0.0"  # offline: still serving
        _set_offline_state(cp, die_after_store=True)
        cp.start(wait=False)
        assert cp.proc is not None
        cp.proc.wait(30)  # it stored one batch and died
        cp.start()
        _drain(agent)
        assert cp.stats()["duplicates"] >= 1  # the unanswered batch was sent again and recognised
        # The agent dies after the server answered but before it forgot the batch.
        agent.stop()
        second = datetime.now(UTC)
        agent.start(env={CRASHPOINT_ENV: "upload.before_ack"})
        assert agent.wait_exit(60) == CRASH_EXIT_CODE
        dup_before = cp.stats()["duplicates"]
        third = datetime.now(UTC)
        agent.start()
        agent.wait_until(lambda: cp.stats()["duplicates"] > dup_before, what="the resent batch")
        agent.wait_until(
            lambda: sum(datetime.fromisoformat(w["start"]) > third for w in cp.stats()["windows"]) >= 3,
            what="windows of the last run",
        )
    finally:
        agent.stop()
    st = cp.stats()
    ids = [w["window_id"] for w in st["windows"]]
    assert len(ids) == len(set(ids)), "a window arrived twice"
    assert len(ids) >= 15
    # Each agent run's windows form one unbroken chain: a lost window would split it in two.
    runs: list[list[dict[str, Any]]] = [[], [], []]
    for w in st["windows"]:
        t = datetime.fromisoformat(w["start"])
        runs[0 if t < second else 1 if t < third else 2].append(w)
    shown = [
        [(w["start"][11:26], w["end"][11:26], w["model"]) for w in sorted(r, key=lambda w: w["start"])] for r in runs
    ]
    assert _chains(runs[0]) == 1 and _chains(runs[1]) <= 1 and _chains(runs[2]) == 1, (shown, st["rejected"])
    assert sum(w["requests"] for w in st["windows"]) == 5
    assert len(st["batches"]) == len(set(st["batches"]))


def test_overflow_is_counted(cp: FakeControlPlane, tmp_path: Path) -> None:
    agent = AgentProc(cp.url, tmp_path / "dev", free_port(), buffer_max_records=5)
    agent.start()
    try:
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "committed", what="v1 committed")
        cp.kill()
        time.sleep(2.0)  # ~20 windows into a buffer of 5
        cp.start()
        agent.wait_until(lambda: any(r["dropped"] > 0 for r in cp.stats()["reports"]), what="drops reported")
        _drain(agent)
    finally:
        agent.stop()
    st = cp.stats()
    dropped = max(r["dropped"] for r in st["reports"])
    assert dropped >= 5
    assert _chains(st["windows"]) >= 2  # the dropped windows left a visible gap, and it was counted
