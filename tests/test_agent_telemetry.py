"""Offline-first telemetry: a long outage, a server that stores a batch and dies before answering, an agent killed
between the server's answer and its own acknowledgement — every window arrives exactly once; overflow is counted.

Real processes and servers: ``edgefleet agent`` (killed for its crash) against the REAL control plane on loopback
behind a faulty edge (``tests/_fleet_support.py``). The server's outages are ``stop_serving`` then ``serve`` on
the same port and database; ``die_after_store`` lets the real app store a report, then cuts the connection before
the answer. Exactly-once is judged on what the control plane stored (its database) and on what crossed the edge:
the real server stores a batch id and a window id once, so a resend is seen on the edge, not in the database.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from _fleet_support import AgentProc, Fleet, make_packages, state_of, wait_for
from conftest import free_port, starts_processes
from edgefleet.agent.durable import CRASH_EXIT_CODE, CRASHPOINT_ENV

FAST: dict[str, Any] = {"probation_seconds": 0.2, "probation_requests": 1000, "telemetry_interval_s": 0.1}


@pytest.fixture
@starts_processes
def cp(tmp_path: Path, mlp_path: Path, digits: Any) -> Any:
    f = Fleet(tmp_path / "cp")
    f.publish(*make_packages(mlp_path, digits.x_test, tmp_path, ["1.0.0"]).values())
    f.configure_group(**FAST)
    yield f
    f.close()


def _committed_device(cp: Fleet, tmp_path: Path, **opts: Any) -> AgentProc:
    """An agent enrolled, told to run v1 (a pin: no rollout needed), and committed on it."""
    agent = AgentProc(cp.url, cp.enrollment_token(), tmp_path / "dev", free_port(), **opts)
    agent.start()
    agent.wait_until(lambda: cp.device_ids(), what="enrollment")
    cp.pin("1.0.0", **FAST)
    agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "committed", what="v1 committed")
    return agent


def _stored_batches(cp: Fleet) -> list[str]:
    """The batch ids the control plane stored (each once: they are its primary key)."""
    from edgefleet.controlplane.db import ReportBatch

    with cp.store.db.session() as s:
        return list(s.scalars(select(ReportBatch.batch_id)))


def _sent(cp: Fleet) -> Counter[str]:
    """How often each batch id reached the app: above one is a resend (stored once, answered again)."""
    return Counter(r.batch_id for r in cp.faults.reports)


def _chains(windows: list[dict[str, Any]]) -> int:
    """Windows of one agent run tile time: each starts where another ended. Count the starts of chains."""
    ends = {w["end"] for w in windows}
    return sum(1 for w in windows if w["start"] not in ends)


def _breaks(windows: list[dict[str, Any]]) -> list[str]:
    """Where a run's chain breaks, short enough for an assertion message: each window that starts where none
    ended, beside the window before it (its id, model and version say which path cut it)."""
    run = sorted(windows, key=itemgetter("start"))
    ends = {w["end"] for w in run}
    return [
        f"{w['start']:%T.%f} starts {w['window_id'][:8]} ({w['model']} {w['version']}, {w['requests']} req); "
        f"before it {p['window_id'][:8]} {p['start']:%T.%f}-{p['end']:%T.%f} ({p['model']} {p['version']})"
        for p, w in itertools.pairwise(run)
        if w["start"] not in ends
    ] + [f"{len(run)} windows {run[0]['start']:%T.%f}-{run[-1]['end']:%T.%f}" if run else "no windows"]


def _drain(agent: AgentProc) -> None:
    agent.wait_until(lambda: _buffered(agent) == 0, what="the buffer to drain")


def _buffered(agent: AgentProc) -> float:
    text = httpx.get(f"{agent.url}/metrics", timeout=2).text
    line = next(x for x in text.splitlines() if x.startswith("edgefleet_agent_telemetry_buffered_records "))
    return float(line.split()[1])


def test_exactly_once_through_outages_and_restarts(cp: Fleet, tmp_path: Path) -> None:
    agent = _committed_device(cp, tmp_path)
    try:
        for _ in range(5):  # some traffic, so windows carry counts and latency sketches
            httpx.post(
                f"{agent.url}/v2/models/digits/infer",
                json={"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]},
            ).raise_for_status()
        # A long outage (the server is gone), then a server that stores the first batch and dies unanswered.
        cp.stop_serving()
        time.sleep(2.0)  # the outage itself: windows pile up in the agent's buffer
        assert agent.serving() == "1.0.0"  # offline: still serving
        before = len(cp.faults.reports)
        cp.faults.die_after_store = True
        cp.serve()
        # The first report that reaches the app is the one stored and cut; once it is stored the server dies.
        agent.wait_until(lambda: len(cp.faults.reports) > before, what="a report after the outage")
        cut = cp.faults.reports[before].batch_id
        agent.wait_until(lambda: cut in _stored_batches(cp), what="the cut batch stored")
        assert not cp.faults.die_after_store
        cp.stop_serving()
        cp.serve()
        _drain(agent)
        # The unanswered batch was sent again under its id (the server recognised it and answered).
        assert _sent(cp)[cut] >= 2, _sent(cp)
        # The agent dies after the server answered but before it forgot the batch.
        agent.stop()
        second = datetime.now(UTC)
        agent.start(env={CRASHPOINT_ENV: "upload.before_ack"})
        assert agent.wait_exit(60) == CRASH_EXIT_CODE
        unacked = cp.faults.reports[-1].batch_id  # answered, then the agent died before its acknowledgement
        assert unacked in _stored_batches(cp)
        resent_before = _sent(cp)[unacked]
        third = datetime.now(UTC)
        agent.start()
        agent.wait_until(lambda: _sent(cp)[unacked] > resent_before, what="the unacknowledged batch sent again")
        agent.wait_until(
            lambda: sum(w["start"] > third for w in cp.windows()) >= 3,
            what="windows of the last run",
        )
    finally:
        agent.stop()
    # None missing on the way in: every batch that reached the app was stored (once: batch ids are its key). Waited
    # for, as the last one may still be being stored when the agent stops.
    wait_for(lambda: sorted(_stored_batches(cp)) == sorted(_sent(cp)), what="every batch that reached the app stored")
    windows = cp.windows()
    ids = [w["window_id"] for w in windows]
    assert len(ids) == len(set(ids)), "a window was stored twice"
    assert len(ids) >= 15
    # The agent never put a window into two batches: only a batch's resend carries it again, and that the server
    # recognises by its batch id. (The server would also drop a repeated window id: that must not be what saves us.)
    carried: defaultdict[str, set[str]] = defaultdict(set)
    for r in cp.faults.reports:
        for tw in r.telemetry:
            carried[tw.window_id].add(r.batch_id)
    assert all(len(b) == 1 for b in carried.values()), {k: v for k, v in carried.items() if len(v) > 1}
    assert set(carried) == set(ids)  # every window that reached the app was stored
    # Each agent run's windows form one unbroken chain: a window never sent would split it in two.
    runs: list[list[dict[str, Any]]] = [[], [], []]
    for w in windows:
        runs[0 if w["start"] < second else 1 if w["start"] < third else 2].append(w)
    assert _chains(runs[0]) == 1 and _chains(runs[1]) <= 1 and _chains(runs[2]) == 1, (
        [_breaks(r) for r in runs],
        cp.faults.rejected,
    )
    assert sum(w["requests"] for w in windows) == 5


def test_overflow_is_counted(cp: Fleet, tmp_path: Path) -> None:
    agent = _committed_device(cp, tmp_path, buffer_max_records=5)
    try:
        cp.stop_serving()
        time.sleep(2.0)  # ~20 windows into a buffer of 5
        cp.serve()
        agent.wait_until(lambda: any(r.dropped_records > 0 for r in cp.faults.reports), what="drops reported")
        _drain(agent)
    finally:
        agent.stop()
    dropped = max(r.dropped_records for r in cp.faults.reports)
    assert dropped >= 5
    # The control plane keeps the largest count reported on the device's record (waited for: the last report may
    # still be being stored when the agent stops).
    wait_for(lambda: cp.record()["dropped_records"] == dropped, what=f"{dropped} drops on the device record")
    assert _chains(cp.windows()) >= 2  # the dropped windows left a visible gap, and it was counted
