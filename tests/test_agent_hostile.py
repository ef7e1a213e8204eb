"""Hostile clients against a running agent and its real inference worker, over raw sockets.

One device (``edgefleet agent`` as a process, enrolled in the real control plane on loopback behind the test edge
of ``tests/_fleet_support.py``, which only serves it here: the attacks are on the agent's local API; a package in
probation with a crash-loop threshold of ONE crash, ``--memory-mb 256``, short HTTP timeouts through
``EDGEFLEET_AGENT_HTTP_*``) takes every attack of docs/agent.md's "Limits of the local API": long URLs, huge
headers, half-sent requests, idle keep-alive connections, more connections than allowed, no file descriptors left
(EMFILE), a 24 MiB JSON infer, deep nesting, huge numbers, bad UTF-8, tensors larger than the device, and
hypothesis-fuzzed requests. Each gets a 4xx with a JSON error (or a close, for timeouts and limits); afterwards the
same worker process answers a normal infer, and no crash was counted — not by probation (one crash would have
rolled the device back), not in the telemetry windows and events the control plane stored, not in the state it
keeps for the device.

The agent's own HTTP path (before a worker takes the port) runs the same protocol; it is checked in process with
a handler that parks answers. The frames between agent and worker are checked to carry no code.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _fleet_support import AgentProc, Fleet, make_packages, state_of
from conftest import free_port, starts_processes
from edgefleet.agent import frames
from edgefleet.agent.httpserver import HTTPLimits, serve_http

AGENT = Path(__file__).parents[1] / "src" / "edgefleet" / "agent"
HEADER_TIMEOUT_S = 3.0
MAX_CONNECTIONS = 48
MEMORY_MB = 256
LIMITS_ENV = {
    "EDGEFLEET_AGENT_HTTP_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    "EDGEFLEET_AGENT_HTTP_BODY_TIMEOUT_S": "3",
    "EDGEFLEET_AGENT_HTTP_KEEPALIVE_TIMEOUT_S": "2",
    "EDGEFLEET_AGENT_HTTP_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
}
INFER = "/v2/models/digits/infer"
GOOD = json.dumps({"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}).encode()


# ---------------------------------------------------------------- raw HTTP


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes] | None:
    """One response, or None when the server closed (or reset) the connection without one."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, headers, rest[:length]
    except (ConnectionResetError, BrokenPipeError):
        return None


def _request(port: int, raw: bytes, stream: Iterator[bytes] | None = None) -> tuple[int, dict[str, str], bytes] | None:
    """Send ``raw`` (then ``stream``'s chunks from a thread, until the server stops taking them) and read."""
    with _connect(port) as s:
        s.sendall(raw)
        sender = None
        if stream is not None:

            def push() -> None:
                with contextlib.suppress(OSError):
                    for chunk in stream:
                        s.sendall(chunk)

            sender = threading.Thread(target=push, daemon=True)
            sender.start()
        answer = _read_response(s)
        if sender is not None:
            s.shutdown(socket.SHUT_RDWR)
            sender.join(60)
        return answer


def _json_error(answer: tuple[int, dict[str, str], bytes] | None, status: int, words: str) -> None:
    assert answer is not None, f"no answer, expected {status}"
    got, headers, body = answer
    assert got == status, body[:300]
    assert headers.get("content-type") == "application/json"
    assert words.lower() in json.loads(body)["error"].lower()


def _post(port: int, body: bytes, headers: str = "") -> bytes:
    return f"POST {INFER} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n{headers}\r\n".encode() + body


def _chunks(size: int, piece: bytes) -> Iterator[bytes]:
    for _ in range(size // len(piece)):
        yield piece


def _wait_closed(socks: list[socket.socket], deadline_s: float) -> list[bytes]:
    """Read each socket until the server closes it; what each received."""
    got: list[bytes] = []
    deadline = time.monotonic() + deadline_s
    for s in socks:
        data = b""
        while True:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                break
            except TimeoutError:
                raise AssertionError(f"a connection was still open after {deadline_s} s: {data[:200]!r}") from None
            if not chunk:
                break
            data += chunk
        got.append(data)
    return got


# ---------------------------------------------------------------- the device


class Device:
    def __init__(self, agent: AgentProc, cp: Fleet) -> None:
        self.agent, self.cp, self.port = agent, cp, agent.port
        self.worker_pid = self._serving_worker()

    def _serving_worker(self) -> int:
        """The worker that holds the listening socket (it serves the port itself, ADR 0032)."""
        assert self.agent.proc is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for child in psutil.Process(self.agent.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if "serve" in child.cmdline() and any(
                        c.status == psutil.CONN_LISTEN and c.laddr.port == self.port
                        for c in child.net_connections("tcp")
                    ):
                        return int(child.pid)
            time.sleep(0.05)
        raise AssertionError("no worker took the port over")

    def infer_ok(self) -> None:
        r = httpx.post(f"http://127.0.0.1:{self.port}{INFER}", content=GOOD, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"]

    def assert_unharmed(self) -> None:
        """The same worker answers, and nothing counted a crash."""
        self.infer_ok()
        assert psutil.pid_exists(self.worker_pid)
        assert self._serving_worker() == self.worker_pid
        assert state_of(self.agent.data_dir)["state"] == "probation"  # one crash would have rolled it back


@pytest.fixture(scope="module")
@starts_processes
def device(tmp_path_factory: pytest.TempPathFactory, mlp_path: Path, digits: Any) -> Iterator[Device]:
    tmp = tmp_path_factory.mktemp("hostile")
    cp = Fleet(tmp / "cp")
    try:
        cp.publish(*make_packages(mlp_path, digits.x_test, tmp, ["1.0.0"]).values())
        agent = AgentProc(cp.url, cp.enrollment_token(), tmp / "dev", free_port(), memory_mb=MEMORY_MB)
        agent.start(env=LIMITS_ENV)
        try:
            agent.wait_until(lambda: cp.device_ids(), what="enrollment")
            # Probation for the whole module, and one crash is a crash loop: any worker death rolls the device back.
            cp.pin(
                "1.0.0",
                probation_requests=10**9,
                probation_seconds=3600,
                crash_loop_crashes=1,
                max_error_rate=1.0,
            )
            agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "probation", what="probation")
            agent.wait_until(lambda: agent.serving() == "1.0.0", what="v1 serving")
            dev = Device(agent, cp)
            dev.infer_ok()
            yield dev
            # What the control plane stored: every window the device reported since it started says no worker
            # crashed or restarted, no crash event arrived, and the device still reports probation.
            agent.wait_until(lambda: len(cp.windows()) >= 2, what="telemetry windows")
            windows = cp.windows()
            assert all(w["worker_crashes"] == 0 and w["worker_restarts"] == 0 for w in windows), windows
            assert not [e for e in cp.events() if e[0] in ("worker_crashed", "rolled_back")], cp.events()
            agent.wait_until(lambda: cp.record()["state"] == "probation", what="probation on the device record")
            dev.assert_unharmed()
        finally:
            agent.stop()
    finally:
        cp.close()


# ---------------------------------------------------------------- size limits


def test_long_url_and_large_headers_are_refused(device: Device) -> None:
    port = device.port
    _json_error(_request(port, b"GET /v2/health/live?q=" + b"a" * 9000 + b" HTTP/1.1\r\nhost: x\r\n\r\n"), 414, "URL")
    many = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))  # 70 KiB in 70 headers
    _json_error(_request(port, b"GET /v2/health/live HTTP/1.1\r\n" + many + b"\r\n"), 431, "headers")
    # One 32 MiB header: refused once 64 KiB went by, long before the rest is sent (or buffered).
    answer = _request(port, b"GET /v2/health/live HTTP/1.1\r\nx-big: ", _chunks(32 * 2**20, b"a" * 65536))
    _json_error(answer, 431, "bytes")
    device.assert_unharmed()


def test_json_body_cap_comes_from_device_memory(device: Device) -> None:
    port = device.port
    cap = HTTPLimits.for_device(MEMORY_MB).max_json_bytes
    assert cap == MEMORY_MB * 2**20 // 64
    piece = b"0.5," * 16384
    # A 24 MiB JSON infer (the one that killed a 256 MB device's worker): refused on its length...
    size = 24 * 2**20
    head = f"POST {INFER} HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\n\r\n".encode()
    _json_error(_request(port, head + b'{"inputs":[{"name":"X","data":[', _chunks(size, piece)), 413, "JSON body")
    # ... and chunked, without a length: refused when the cap is passed.
    head = f"POST {INFER} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".encode()
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    _json_error(_request(port, head, _chunks(size, chunk)), 413, "JSON body")
    # A binary tensor body keeps a larger cap: a body over the JSON cap is read, and answered on its merits.
    x = np.zeros((cap // 256 + 1, 64), np.float32)
    meta: dict[str, Any] = {"inputs": [{"name": "X", "shape": list(x.shape), "datatype": "FP32"}]}
    meta["inputs"][0]["parameters"] = {"binary_data_size": x.nbytes}
    jhead = json.dumps(meta).encode()
    answer = _request(port, _post(port, jhead + x.tobytes(), f"inference-header-content-length: {len(jhead)}\r\n"))
    assert answer is not None and answer[0] == 200, answer
    device.assert_unharmed()


def test_tensors_larger_than_the_device_are_refused_before_the_worker_decodes_them(device: Device) -> None:
    port = device.port
    tensor_cap = HTTPLimits.for_device(MEMORY_MB).max_tensor_bytes
    rows = tensor_cap // 256 + 1
    meta: dict[str, Any] = {"inputs": [{"name": "X", "shape": [rows, 64], "datatype": "FP32"}]}
    meta["inputs"][0]["parameters"] = {"binary_data_size": rows * 256}
    jhead = json.dumps(meta).encode()
    answer = _request(port, _post(port, jhead, f"inference-header-content-length: {len(jhead)}\r\n"))
    _json_error(answer, 413, "more than this device can take")
    big = json.dumps({"inputs": [{"name": "X", "shape": [rows, 64], "datatype": "FP32", "data": [0.5]}]}).encode()
    _json_error(_request(port, _post(port, big)), 413, "more than this device")
    device.assert_unharmed()


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"[" * 50_000 + b"]" * 50_000, "nested"),
        (
            b'{"inputs":[{"name":"X","shape":[1,64],"datatype":"FP32","data":'
            + b"[" * 50_000
            + b"1"
            + b"]" * 50_000
            + b"}]}",
            "nested",
        ),
        (
            b'{"inputs":[{"name":"X","shape":[1,64],"datatype":"FP32","data":'
            + b"[" * 500
            + b"1"
            + b"]" * 500
            + b"}]}",
            "nested deeper",
        ),
        (b'{"inputs":[{"name":"X","shape":[1,64],"datatype":"FP32","data":[1' + b"9" * 5000 + b"]}]}", "JSON"),
        (
            b'{"inputs":[{"name":"X","shape":[1,64],"datatype":"INT64","data":[' + b"9" * 4000 + b"]}]}",
            "datatype",
        ),
        (b'{"inputs":[{"name":"X\xff\xfe","shape":[1,64]}]}', "JSON"),
        (b'{"inputs":[{"name":"X","shape":[1,64],"datatype":"FP32","data":[1e999999]}]}', "do not fill"),
    ],
    ids=["deep-array", "deep-data", "data-500-deep", "huge-number", "huge-int", "bad-utf8", "huge-float"],
)
def test_pathological_json_is_a_400(device: Device, body: bytes, words: str) -> None:
    _json_error(_request(device.port, _post(device.port, body)), 400, words)
    device.assert_unharmed()


# ---------------------------------------------------------------- time and connection limits


def test_half_sent_requests_are_timed_out_and_excess_connections_refused(device: Device) -> None:
    socks = []
    for i in range(200):
        s = _connect(device.port)
        s.sendall(b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-le" % INFER.encode() if i % 2 else b"GET /v2/hea")
        socks.append(s)
    # Every one ends: a 408 after the header timeout, or a 503 at once for those beyond the connection limit.
    got = _wait_closed(socks, 60)
    for s in socks:
        s.close()
    statuses = [int(g.split(b" ")[1]) if g.startswith(b"HTTP/1.1 ") else None for g in got]
    assert set(statuses) <= {408, 503, None}, statuses
    assert statuses.count(408) >= 1
    for g in got:
        if g:
            assert json.loads(g.partition(b"\r\n\r\n")[2])["error"]
    device.assert_unharmed()


def test_connections_beyond_the_limit_get_a_503_at_once(device: Device) -> None:
    # Silent connections hold their place until the header timeout; those beyond the limit are answered at once.
    # Rounds, so that a test process stalled past the timeout (freeing places) cannot make it pass or fail.
    refused = b""
    for _ in range(5):
        socks = [_connect(device.port) for _ in range(MAX_CONNECTIONS + 10)]
        extra = socks[-1]
        extra.settimeout(HEADER_TIMEOUT_S / 2)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            refused = extra.recv(65536)
        for s in socks:
            s.close()
        if refused:
            break
    assert refused.startswith(b"HTTP/1.1 503 "), refused
    assert "too many connections" in json.loads(refused.partition(b"\r\n\r\n")[2])["error"]
    device.assert_unharmed()


def test_idle_keepalive_connection_is_closed(device: Device) -> None:
    with _connect(device.port) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        answer = _read_response(s)
        assert answer is not None and answer[0] == 200 and "connection" not in answer[1]
        assert _wait_closed([s], 60) == [b""]  # closed by the server, with nothing more said
    device.assert_unharmed()


def test_no_file_descriptors_left_backs_off_instead_of_spinning(device: Device) -> None:
    worker = psutil.Process(device.worker_pid)
    soft, hard = worker.rlimit(psutil.RLIMIT_NOFILE)
    held = []
    try:
        worker.rlimit(psutil.RLIMIT_NOFILE, (worker.num_fds() + 2, hard))
        for _ in range(12):  # two accepted, the rest wait in the backlog: each accept() now fails with EMFILE
            held.append(_connect(device.port))
        cpu0, t0 = sum(worker.cpu_times()[:2]), time.monotonic()
        time.sleep(3.0)  # a window to measure, not a wait for anything
        cpu, wall = sum(worker.cpu_times()[:2]) - cpu0, time.monotonic() - t0
        # A spinning accept loop burns a core; backing off (≤ 1 s between tries) costs next to nothing.
        assert cpu < 0.5 * wall, f"the worker used {cpu:.2f} s of CPU in {wall:.2f} s with no descriptors left"
    finally:
        worker.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
    # Descriptors are back: every waiting connection is accepted (and, silent, closed at its header timeout).
    _wait_closed(held, 60)
    for s in held:
        s.close()
    device.assert_unharmed()


# ---------------------------------------------------------------- fuzzing

_TOKEN = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12)
_PATHS = st.one_of(
    st.sampled_from(["/v2", "/v2/health/live", "/v2/health/ready", "/metrics", INFER, "/v2/models/digits"]),
    st.builds(lambda a, b: f"/v2/models/{a}/{b}", _TOKEN, _TOKEN),
    st.text(alphabet="/%?#&=.~abc\\ \t\x00\x7f\u00e9", min_size=1, max_size=40).map(lambda p: "/" + p),
)
_HEADER = st.tuples(
    st.one_of(
        _TOKEN,
        st.sampled_from(["inference-header-content-length", "expect", "connection", "content-type", "upgrade", "host"]),
    ),
    st.one_of(
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
        st.sampled_from(["-1", "0", "99999999999999999999999", "100-continue", "close", "h2c", "abc", "3e4"]),
    ),
)
_BODY = st.one_of(
    st.binary(max_size=300),
    st.just(GOOD),
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
        max_leaves=30,
    ).map(lambda d: json.dumps({"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": d}]}).encode()),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.one_of(st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"]), _TOKEN),
    path=_PATHS,
    headers=st.lists(_HEADER, max_size=6),
    body=_BODY,
)
def test_fuzzed_requests_get_an_answer_never_a_5xx(
    device: Device, method: str, path: str, headers: list[tuple[str, str]], body: bytes
) -> None:
    lines = [f"{method} {path} HTTP/1.1", "host: x"] + [f"{k}: {v}" for k, v in headers]
    raw = ("\r\n".join(lines) + f"\r\ncontent-length: {len(body)}\r\n\r\n").encode("utf-8") + body
    answer = _request(device.port, raw)
    if answer is None:
        return  # the server closed: what it does for a request it cannot frame (or an upgrade it refuses)
    status, hdrs, payload = answer
    assert status < 500, (status, payload[:300])
    if status >= 400:
        assert hdrs.get("content-type") == "application/json" and json.loads(payload)["error"]


def test_after_fuzzing_the_worker_is_unharmed(device: Device) -> None:
    device.assert_unharmed()


# ---------------------------------------------------------------- the agent's own HTTP path


@pytest.fixture
def agent_http() -> Iterator[tuple[Any, list[Any]]]:
    """The agent's HTTP server (serve_http, as the agent runs it before a worker takes the port) with a handler
    that parks every answer: a parked request holds its connection with no deadline."""
    parked: list[Any] = []
    limits = HTTPLimits.for_device(
        MEMORY_MB, header_timeout_s=1.0, body_timeout_s=1.0, keepalive_timeout_s=1.0, max_connections=8
    )
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    def handle(method: str, path: str, headers: dict[bytes, bytes], body: bytes, respond: Any) -> None:
        if path == "/park":
            parked.append(respond)
        else:
            respond(200, b'{"ok": true}', b"content-type: application/json\r\n")

    async def main() -> None:
        box["server"] = await serve_http(handle, "127.0.0.1", 0, limits)
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(main()), loop.run_forever()), daemon=True)
    thread.start()
    assert started.wait(30)
    yield box["server"], parked
    loop.call_soon_threadsafe(box["server"].close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


def test_agent_path_limits(agent_http: tuple[Any, list[Any]]) -> None:
    server, parked = agent_http
    port = server.port
    _json_error(_request(port, b"GET /x?" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n"), 414, "URL")
    _json_error(_request(port, b"GET /x HTTP/1.1\r\nx-big: ", _chunks(8 * 2**20, b"a" * 65536)), 431, "bytes")
    _json_error(_request(port, b"POST /x HTTP/1.1\r\ncontent-length: %d\r\n\r\n" % (2**30)), 413, "JSON body")
    # Half-sent: a 408 after the header timeout; idle keep-alive: closed.
    with _connect(port) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nhost")
        got = _wait_closed([s], 60)[0]
        assert got.startswith(b"HTTP/1.1 408 ") and b"did not arrive" in got
    with _connect(port) as s:
        s.sendall(b"GET /x HTTP/1.1\r\n\r\n")
        assert (_read_response(s) or (0,))[0] == 200
        assert _wait_closed([s], 60) == [b""]
    # Eight parked requests hold the eight allowed connections; the ninth gets a 503 at once, not a queue.
    deadline = time.monotonic() + 60
    while server.connections and time.monotonic() < deadline:
        time.sleep(0.02)  # the connections above, closed by the client, are gone on the server's side too
    socks = [_connect(port) for _ in range(8)]
    for s in socks:
        s.sendall(b"GET /park HTTP/1.1\r\n\r\n")
    deadline = time.monotonic() + 60
    while len(parked) < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(parked) == 8
    with _connect(port) as extra:
        _json_error(_read_response(extra), 503, "too many connections")
    for s in socks:
        s.close()


@pytest.mark.process
def test_agent_path_backs_off_on_emfile(tmp_path: Path) -> None:
    """The agent's accept loop (a real process whose descriptors run out) pauses instead of spinning."""
    port = free_port()
    code = (
        "import asyncio, sys\n"
        "from edgefleet.agent.httpserver import serve_http\n"
        "def handle(m, p, h, b, respond): respond(200, b'{}', b'content-type: application/json\\r\\n')\n"
        "async def main():\n"
        f"    await serve_http(handle, '127.0.0.1', {port})\n"
        "    print('ready', flush=True)\n"
        "    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        server = psutil.Process(proc.pid)
        soft, hard = server.rlimit(psutil.RLIMIT_NOFILE)
        server.rlimit(psutil.RLIMIT_NOFILE, (server.num_fds() + 2, hard))
        held = [_connect(port) for _ in range(12)]
        cpu0, t0 = sum(server.cpu_times()[:2]), time.monotonic()
        time.sleep(3.0)  # a window to measure, not a wait for anything
        cpu, wall = sum(server.cpu_times()[:2]) - cpu0, time.monotonic() - t0
        assert cpu < 0.5 * wall, f"the server used {cpu:.2f} s of CPU in {wall:.2f} s with no descriptors left"
        server.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
        held[-1].sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert (_read_response(held[-1]) or (0,))[0] == 200
        for s in held:
            s.close()
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- frames carry no code

_FORBIDDEN_MODULES = {"pickle", "marshal", "shelve", "dill", "cloudpickle", "_pickle", "copyreg"}
_FRAME_USERS = [
    "frames.py",
    "worker/main.py",
    "worker/packaged.py",
    "worker/httpserve.py",
    "workerproc.py",
    "supervisor.py",
    "service.py",
]


@pytest.mark.parametrize("name", _FRAME_USERS)
def test_no_code_bearing_serialisation_near_the_frames(name: str) -> None:
    tree = ast.parse((AGENT / name).read_text())
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in _FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _FORBIDDEN_MODULES:
            found.append(node.module or "")
        elif isinstance(node, ast.Name) and node.id in _FORBIDDEN_MODULES:
            found.append(node.id)
        elif isinstance(node, ast.Attribute) and node.attr in _FORBIDDEN_MODULES | {"loads", "load"}:
            base = ast.unparse(node.value)
            if node.attr in _FORBIDDEN_MODULES or base in ("np", "numpy", "pickle"):
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Constant) and node.value in _FORBIDDEN_MODULES:
            found.append(repr(node.value))  # importlib.import_module("pickle") and the like
        elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            found.append("allow_pickle=")
    assert not found, f"{name}: {found}"


def test_frames_round_trip_and_refuse_what_could_carry_code() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    buf = bytearray(frames.encode(("infer", {"X": x, "b": np.array([True, False])}, ["label"])))
    buf += frames.encode(("ok", {"y": np.array([[1, 2]], np.int64)}, 0.25))
    buf += frames.encode(("stats", [("ok", 0.1, 0.05), ("bad_request", None, 0.0)]))
    buf += frames.encode(("metrics", b"# metrics\n"))
    buf += frames.encode(("metrics",))
    buf += frames.encode(("err", "input", "bad"))
    tail = frames.encode(("stop",))
    buf += tail[:7]  # an incomplete frame stays for the next read
    infer, ok, stats, body, ask, err = frames.take(buf)
    assert infer[0] == "infer" and infer[2] == ["label"]
    np.testing.assert_array_equal(infer[1]["X"], x)
    assert infer[1]["b"].dtype == np.bool_
    assert ok[1]["y"].dtype == np.int64 and ok[2] == 0.25
    assert stats == ("stats", [("ok", 0.1, 0.05), ("bad_request", None, 0.0)])
    assert body == ("metrics", b"# metrics\n") and ask == ("metrics",) and err == ("err", "input", "bad")
    assert bytes(buf) == tail[:7]
    with pytest.raises(frames.FrameError, match="dtype object"):
        frames.encode(("ok", {"y": np.array([{"a": 1}], dtype=object)}, 0.0))

    good = frames.encode(("infer", {"X": x}, None))
    head = frames.HEADER.unpack_from(good)
    desc = good[frames.HEADER.size : frames.HEADER.size + head[4]]
    import pickle  # the attack: a pickle where a frame belongs

    bad = {
        "pickle": pickle.dumps(("infer", {"X": x}, None)),
        "magic": b"EVIL" + good[4:],
        "object dtype": frames.HEADER.pack(b"EFWF", 1, 4, 0, len(d := desc.replace(b"float32", b"object")), 48)
        + d
        + bytes(48),
        "short data": frames.HEADER.pack(b"EFWF", 1, 4, 0, len(desc), 47) + desc + bytes(47),
        "long data": frames.HEADER.pack(b"EFWF", 1, 4, 0, len(desc), 49) + desc + bytes(49),
        "huge lengths": frames.HEADER.pack(b"EFWF", 1, 4, 0, 2**31, 2**40),
        "unknown kind": frames.HEADER.pack(b"EFWF", 1, 99, 0, 2, 0) + b"{}",
        "not json": frames.HEADER.pack(b"EFWF", 1, 2, 0, 3, 0) + b"\x80\x04K",
        "deep json": frames.HEADER.pack(b"EFWF", 1, 1, 0, 200_000, 0) + b"[" * 100_000 + b"]" * 100_000,
    }
    for what, data in bad.items():
        with pytest.raises(frames.FrameError):
            frames.take(bytearray(data))
        assert what


@pytest.mark.process
def test_a_worker_that_sends_a_pickle_is_killed_and_nothing_is_unpickled(tmp_path: Path) -> None:
    """A worker taken over by a crafted model answers with the pickle of an object whose unpickling would write a
    file in the agent: the agent reads a broken frame, kills the worker, and nothing runs."""
    from edgefleet.agent.worker.spec import WorkerSpec
    from edgefleet.agent.workerproc import WorkerProcess
    from edgefleet.errors import WorkerUnavailable

    marker = tmp_path / "written-by-the-worker"
    script = (
        "import pickle, socket, struct, sys, time\n"
        "class Evil:\n"
        f"    def __reduce__(self): return (open, ({str(marker)!r}, 'w'))\n"
        "s = socket.socket(fileno=int(sys.argv[1]))\n"
        "data = pickle.dumps(('hello', Evil()))\n"
        "s.sendall(struct.pack('<I', len(data)) + data)\n"
        "time.sleep(120)\n"
    )

    class EvilWorker(WorkerProcess):
        def command(self, fd: int) -> list[str]:
            return [sys.executable, "-c", script, str(fd)]

    async def go() -> WorkerProcess:
        w = EvilWorker(WorkerSpec(tmp_path / "model.onnx"))
        with pytest.raises(WorkerUnavailable):
            await w.start(timeout=60)
        return w

    w = asyncio.run(go())
    assert w.proc is not None and w.proc.wait(60) is not None
    assert "malformed frame" in (w.close_reason or "")
    assert not marker.exists()
