"""Pure decisions and small stores of the agent: recovery, probation, update choice, telemetry buffer, codec,
resumable download (against a real HTTP server on 127.0.0.1 that cuts the link once)."""

from __future__ import annotations

import asyncio
import http.server
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgefleet.agent.buffer import TelemetryBuffer
from edgefleet.agent.codec import BadRequest, encode_response, parse_request
from edgefleet.agent.probation import ProbationStats, crash_loop, decide, latency_budget_ms
from edgefleet.agent.state import (
    Pending,
    PersistedState,
    SlotInfo,
    StateStore,
    committed,
    recover,
    refusal_key,
    rolled_back,
)
from edgefleet.agent.supervisor import backoff_delay
from edgefleet.agent.updater import CHUNK, download_resumable, jittered, should_update
from edgefleet.protocol import AgentState, DesiredState, DeviceConfig

V1 = SlotInfo(slot="A", model="m", version="1", target="m-1.efpkg")
V2 = SlotInfo(slot="B", model="m", version="2", target="m-2.efpkg", rollout_id="r2")
PENDING = Pending(model="m", version="2", target="m-2.efpkg", rollout_id="r2", slot="B")


@pytest.mark.parametrize("state", ["downloading", "verifying", "staged", "health_check"])
def test_recover_before_switch_serves_committed_and_keeps_pending(state: str) -> None:
    s = PersistedState(state=AgentState(state), committed=V1, active=V1, pending=PENDING)
    r = recover(s)
    assert r.state is AgentState.idle and r.active == V1 and r.pending == PENDING


def test_recover_in_probation_keeps_candidate_then_gives_up() -> None:
    s = PersistedState(state=AgentState.probation, committed=V1, active=V2, pending=PENDING)
    r = recover(s)
    assert r.state is AgentState.probation and r.active == V2 and r.probation_resumes == 1
    r = recover(recover(r))
    assert r.state is AgentState.rolled_back and r.active == V1
    assert r.pending is None and refusal_key("r2", "m-2.efpkg") in r.refused  # not installed again


def test_probation_ends_in_a_commit_or_a_rollback_that_refuses_the_candidate() -> None:
    s = PersistedState(state=AgentState.probation, committed=V1, active=V2, pending=PENDING, probation_resumes=1)
    c = committed(s)
    assert (c.state, c.committed, c.active, c.pending, c.reason, c.probation_resumes) == (
        AgentState.committed, V2, V2, None, None, 0
    )  # fmt: skip
    r = rolled_back(s, "crash loop")
    assert (r.state, r.active, r.committed, r.pending, r.reason) == (AgentState.rolled_back, V1, V1, None, "crash loop")
    assert r.refused == [refusal_key("r2", "m-2.efpkg")]
    many = PersistedState(active=V2, committed=V1, refused=[f"r{i}|x" for i in range(80)])
    assert len(rolled_back(many, "x").refused) == 51  # bounded: the newest 50 and this one


@pytest.mark.parametrize("state", ["idle", "committed", "rolled_back"])
def test_recover_settled_states_unchanged(state: str) -> None:
    s = PersistedState(state=AgentState(state), committed=V1, active=V1)
    assert recover(s) == s


def test_state_store_roundtrip(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.load() == PersistedState()
    s = PersistedState(state=AgentState.committed, committed=V1, active=V1)
    store.save(s)
    assert store.load() == s
    assert not list(tmp_path.glob("*.tmp"))


def _desired(target: str | None = "m-2.efpkg", rollout: str | None = "r2") -> DesiredState:
    return DesiredState(device_id="d", model="m", version="2", target=target, rollout_id=rollout)


def test_should_update() -> None:
    idle = PersistedState(state=AgentState.committed, committed=V1, active=V1)
    assert should_update(idle, _desired(), busy=False)
    assert not should_update(idle, _desired(), busy=True)
    assert not should_update(idle, _desired(target=None), busy=False)
    assert not should_update(idle.with_(active=V2), _desired(), busy=False)  # already serving it
    assert not should_update(idle.with_(state=AgentState.probation), _desired(), busy=False)
    refused = idle.with_(refused=[refusal_key("r2", "m-2.efpkg")])
    assert not should_update(refused, _desired(), busy=False)  # rolled back: not retried in the same rollout
    assert should_update(refused, _desired(rollout="r3"), busy=False)  # a new rollout id tries again


CFG = DeviceConfig(
    probation_requests=10, probation_seconds=5, crash_loop_crashes=3, crash_loop_window_s=10, max_error_rate=0.1
)


def test_probation_decisions() -> None:
    st = ProbationStats(started=0.0)
    assert decide(CFG, st, 1.0, None).action == "continue"
    for _ in range(10):
        st.observe("ok", 0.001)
    assert decide(CFG, st, 1.0, None).action == "commit"
    assert decide(CFG, st, 1.0, 0.5).action == "rollback"  # p95 1 ms > 0.5 ms budget
    bad = ProbationStats(started=0.0)
    for i in range(10):
        bad.observe("model_error" if i < 2 else "unavailable" if i < 3 else "ok", 0.001)
    d = decide(CFG, bad, 1.0, None)
    # the reason says what the errors were, not only how many
    assert d.action == "rollback" and d.reason == (
        "error rate 30.0% over 10 requests exceeds 10.0% (the model failed the request: 2, no worker to answer: 1)"
    )
    client_errors = ProbationStats(started=0.0)
    for _ in range(10):
        client_errors.observe("bad_request", None)  # the client's fault, not the model's
    assert decide(CFG, client_errors, 1.0, None).action == "commit"
    timed = ProbationStats(started=0.0)
    assert decide(CFG, timed, 5.0, None).action == "commit"  # T seconds without traffic
    crashing = ProbationStats(started=0.0, crash_times=[1.0, 2.0, 3.0])
    d = decide(CFG, crashing, 3.5, None)
    assert d.action == "rollback" and d.reason.startswith("crash loop")
    assert not crash_loop([1.0, 2.0, 3.0], 12.5, 3, 10)  # the first crash left the window


def test_latency_budget() -> None:
    assert latency_budget_ms({}, "t", None) is None
    assert latency_budget_ms({"latency_p95_ms": 4}, "t", None) == 4
    assert latency_budget_ms({"latency_p95_ms": {"t": 3, "default": 9}}, "t", None) == 3
    assert latency_budget_ms({"latency_p95_ms": {"default": 9}}, "x", None) == 9
    assert latency_budget_ms({"latency_p95_ms": 4}, "t", 2.0) == 2.0


def test_backoff_and_jitter() -> None:
    assert [backoff_delay(i, 0.2, 1.0) for i in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    assert all(8 <= jittered(10) <= 12 for _ in range(100))


def test_buffer_batches_are_stable_until_acked(tmp_path: Path) -> None:
    buf = TelemetryBuffer(tmp_path / "t.db", max_records=100, batch_size=3)
    for i in range(5):
        buf.add("window", f"w{i}")
    b1 = buf.next_batch()
    assert b1 is not None and [r[2] for r in b1[1]] == ["w0", "w1", "w2"]
    buf.close()
    buf = TelemetryBuffer(tmp_path / "t.db", max_records=100, batch_size=3)  # a restart mid-upload
    assert buf.next_batch() == b1  # the same id and records go out again
    buf.ack(b1[0])
    b2 = buf.next_batch()
    assert b2 is not None and b2[0] != b1[0] and [r[2] for r in b2[1]] == ["w3", "w4"]
    buf.ack(b2[0])
    assert buf.next_batch() is None and len(buf) == 0


def test_buffer_cap_drops_oldest_and_counts(tmp_path: Path) -> None:
    buf = TelemetryBuffer(tmp_path / "t.db", max_records=5, batch_size=2)
    buf.add("window", "w0")
    buf.add("window", "w1")
    inflight = buf.next_batch()
    assert inflight is not None
    for i in range(2, 10):
        buf.add("window", f"w{i}")
    assert len(buf) == 5 and buf.dropped == 5
    # Records in flight are never dropped (the server may hold them already).
    assert buf.next_batch() == inflight
    buf.ack(inflight[0])
    rest = buf.next_batch()
    assert rest is not None and [r[2] for r in rest[1]] == ["w7", "w8"]


SPEC = [{"name": "X", "dtype": "float32", "shape": [None, 4]}]


def test_codec_json_and_binary() -> None:
    body = b'{"id":"7","inputs":[{"name":"X","shape":[1,4],"datatype":"FP32","data":[[1,2,3,4]]}]}'
    req = parse_request(body, None, SPEC)
    assert req.id == "7" and req.feeds["X"].dtype == np.float32 and req.feeds["X"].tolist() == [[1, 2, 3, 4]]
    raw = np.arange(8, dtype="<f4").tobytes()
    head = b'{"inputs":[{"name":"X","shape":[2,4],"datatype":"FP32","parameters":{"binary_data_size":32}}],'
    head += b'"parameters":{"binary_data_output":true}}'
    req = parse_request(head + raw, len(head), SPEC)
    assert req.feeds["X"].shape == (2, 4) and req.binary["*"]
    out, hl = encode_response("m", "1", None, {"y": np.array([1.5, 2.5], np.float32)}, req.binary)
    assert hl is not None and np.frombuffer(out[hl:], "<f4").tolist() == [1.5, 2.5]
    out, hl = encode_response("m", "1", "7", {"y": np.array([1, 2])}, {"*": False})
    assert hl is None and b'"data":[1,2]' in out and b'"id":"7"' in out


@pytest.mark.parametrize(
    "body",
    [
        b'{"inputs":[{"name":"X","shape":[1,4],"datatype":"FP32","data":[1,2,3,true]}]}',
        b'{"inputs":[{"name":"X","shape":[1,-4],"datatype":"FP32","data":[]}]}',
        b'{"inputs":[{"name":"X","shape":[1,4],"datatype":"BYTES","data":[1,2,3,4]}]}',
        b'{"inputs":[{"name":"X","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]},'
        b'{"name":"X","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}',
        b'{"inputs":[{"name":"X","shape":[1,4],"datatype":"FP32"}]}',
        b'{"inputs":"X"}',
    ],
)
def test_codec_rejects(body: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_request(body, None, SPEC)


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Serves DATA with Range support; the first response is cut after CUT bytes. Counts bytes sent."""

    data = bytes(range(256)) * 2048  # 512 KiB
    cut: int | None = 200_000
    sent = 0
    ranges: list[str | None] = []  # noqa: RUF012

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        type(self).ranges.append(rng)
        start = int(rng[6:].split("-")[0]) if rng else 0
        body = self.data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).cut is not None:
            body, type(self).cut = body[: type(self).cut], None
            self.wfile.write(body)
            type(self).sent += len(body)
            self.close_connection = True
            return
        self.wfile.write(body)
        type(self).sent += len(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_download_resumes_by_range(tmp_path: Path) -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/pkg"

        async def go() -> Path:
            async with httpx.AsyncClient() as http_client:
                return await download_resumable(
                    http_client, url, tmp_path / "p.partial", length=len(_Flaky.data), backoff_s=0.01
                )

        out = asyncio.run(go())
    finally:
        srv.shutdown()
        srv.server_close()
    assert out.read_bytes() == _Flaky.data
    assert _Flaky.ranges[0] is None and _Flaky.ranges[1] is not None
    resumed_at = int(_Flaky.ranges[1][6:-1])
    assert 200_000 - CHUNK <= resumed_at <= 200_000  # what arrived was kept, at most a chunk in flight was lost
    assert _Flaky.sent - len(_Flaky.data) <= CHUNK


@pytest.mark.process
def test_lean_worker_shares_the_dtype_table_without_the_runtime_layer() -> None:
    # One table for both (edgefleet.dtypes), and reading it must not load the runtime layer into the lean worker.
    import subprocess
    import sys

    from edgefleet.agent.worker import main as worker_main
    from edgefleet.runtime import schema

    assert worker_main.ORT_TO_NUMPY is schema.ORT_TO_NUMPY
    probe = (
        "import runpy, sys; runpy.run_path(sys.argv[1], run_name='probe'); "
        "print(sorted(m for m in sys.modules if m.startswith(('edgefleet.runtime', 'pydantic_settings'))))"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", probe, worker_main.__file__], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
