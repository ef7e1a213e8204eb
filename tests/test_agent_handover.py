"""The worker serves the OIP port itself (ADR 0032): the agent hands it the listening socket, takes it back the
moment the worker dies (503 while none runs), and still counts every request the worker answered."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

from conftest import free_port, starts_processes


@pytest.fixture()
@starts_processes
def served(mlp_path: Path) -> Any:
    port = free_port()
    exe = str(Path(sys.executable).with_name("edgefleet"))
    proc = subprocess.Popen([exe, "serve", str(mlp_path), "--port", str(port)], stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    _wait(lambda: _status(base, "/v2/health/ready") == 200, "ready")
    yield proc, base, port, mlp_path.stem
    proc.terminate()
    proc.wait(15)


def _status(base: str, path: str) -> int | None:
    try:
        return httpx.get(base + path, timeout=2).status_code
    except httpx.HTTPError:
        return None


def _wait(pred: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _worker(agent: subprocess.Popen[bytes]) -> psutil.Process:
    kids = psutil.Process(agent.pid).children()
    assert len(kids) == 1, kids
    return kids[0]


def _serves(proc: psutil.Process, port: int) -> bool:
    return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED for c in proc.net_connections())


def _body(digits: Any) -> bytes:
    x = digits.x_test[:1].astype(np.float32)
    return json.dumps(
        {"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
    ).encode()


def _counter(text: str, outcome: str) -> int:
    pattern = r"edgefleet_agent_requests_total\{[^}]*outcome=\"" + outcome + r"\"[^}]*\} ([0-9.e+]+)"
    m = re.search(pattern, text)
    return int(float(m.group(1))) if m else 0


def _histogram_count(text: str) -> int:
    m = re.search(r"edgefleet_agent_request_duration_seconds_count\{[^}]*\} ([0-9.e+]+)", text)
    return int(float(m.group(1))) if m else 0


def test_worker_serves_then_sigkill_gives_503_then_serves_again(served: Any, digits: Any) -> None:
    agent, base, port, name = served
    body = _body(digits)
    worker = _worker(agent)

    def worker_holds_a_new_connection() -> bool:
        with httpx.Client(base_url=base) as c:
            assert c.post(f"/v2/models/{name}/infer", content=body).status_code == 200
            # The keep-alive connection is held by the worker, not the agent: no hop on the hot path.
            return _serves(worker, port) and not _serves(psutil.Process(agent.pid), port)

    _wait(worker_holds_a_new_connection, "the worker to serve the port (the handover)", timeout=10)
    os.kill(worker.pid, signal.SIGKILL)
    t0 = time.monotonic()
    seen: list[int] = []

    def unavailable() -> bool:
        r = httpx.post(f"{base}/v2/models/{name}/infer", content=body, timeout=5)
        seen.append(r.status_code)
        if r.status_code == 503:
            assert "error" in r.json()
            return True
        return False

    _wait(unavailable, "the agent's 503 while no worker runs", timeout=10)
    assert time.monotonic() - t0 < 2.0, seen
    _wait(lambda: httpx.post(f"{base}/v2/models/{name}/infer", content=body, timeout=5).status_code == 200,
          "the restarted worker")  # fmt: skip
    new = _worker(agent)
    assert new.pid != worker.pid
    with httpx.Client(base_url=base) as c:
        assert c.post(f"/v2/models/{name}/infer", content=body).status_code == 200
        assert _serves(new, port)


def test_counts_exact_across_handover(served: Any, digits: Any) -> None:
    agent, base, _port, name = served
    body = _body(digits)
    with httpx.Client(base_url=base) as c:
        for _ in range(37):
            assert c.post(f"/v2/models/{name}/infer", content=body).status_code == 200
        for _ in range(5):
            assert c.post(f"/v2/models/{name}/infer", content=b"{not json").status_code == 400
        text = c.get("/metrics").text  # the worker ships its pending counts before the agent renders
    assert _counter(text, "ok") == 37 and _counter(text, "bad_request") == 5
    assert _histogram_count(text) == 37
    os.kill(_worker(agent).pid, signal.SIGKILL)
    _wait(lambda: httpx.post(f"{base}/v2/models/{name}/infer", content=body, timeout=5).status_code == 200,
          "the restarted worker")  # fmt: skip
    text = httpx.get(f"{base}/metrics").text
    ok, unavailable = _counter(text, "ok"), _counter(text, "unavailable")
    with httpx.Client(base_url=base) as c:
        for _ in range(23):
            assert c.post(f"/v2/models/{name}/infer", content=body).status_code == 200
        text = c.get("/metrics").text
    assert _counter(text, "ok") == ok + 23 and _counter(text, "unavailable") == unavailable
    assert _histogram_count(text) == ok + 23


def test_a_keep_alive_connection_opened_on_the_agent_moves_to_the_worker(served: Any, digits: Any) -> None:
    """A client that connected while the agent answered (no worker yet, or after a crash) must not stay on the
    agent's forwarding path for good: once a worker serves the port, its next answer closes the connection and the
    client's next request lands on the worker."""
    agent, base, port, name = served
    body = _body(digits)
    os.kill(_worker(agent).pid, signal.SIGKILL)
    with httpx.Client(base_url=base) as c:
        # connect while the agent holds the port (503s), then keep using the same client across the handover
        _wait(lambda: c.post(f"/v2/models/{name}/infer", content=body).status_code == 503, "the agent's 503")
        assert _serves(psutil.Process(agent.pid), port)
        _wait(lambda: c.post(f"/v2/models/{name}/infer", content=body).status_code == 200, "the restarted worker")
        for _ in range(3):
            assert c.post(f"/v2/models/{name}/infer", content=body).status_code == 200
        assert _serves(_worker(agent), port)
        assert not _serves(psutil.Process(agent.pid), port)
