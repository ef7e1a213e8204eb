"""Agent serving overhead, measured side by side in one run.

tritonclient → ``edgefleet serve`` (the agent's OIP server + worker process) for a small digits MLP, at
concurrency 1 and 8, JSON and binary tensors; next to raw ``session.run`` in process and a *null* OIP server
— the floor the client, the transport and the serving loop alone allow. The null server runs the loop that answers
the agent's port (ADR 0032: the inference worker's ``worker/httpserve.py`` ``HTTPLoop``, with the agent's HTTP
protocol, parser and one write per response) with a handler that answers at once, without parsing the body or
running inference — and answers the very bytes the agent answered to the same request (taken from the agent before
each row), so that the client reads and decodes the same answer from both. So the difference between the two
columns is what the agent adds (OIP parsing and checks, the model run, encoding, shared memory access,
bookkeeping). For reference, one row also measures a null ASGI app on uvicorn (the stack the agent used before
ADR 0031; uvicorn picks httptools when it is installed). Plus cold start (``edgefleet serve`` process start →
first inference answered) and idle RSS of the agent and its worker, next to a bare Python + onnxruntime process.

The local zero-copy paths (docs/agent.md, "Local zero-copy path"), at concurrency 1, each next to its own null
floor (the same transport and client, the null server answering at once): binary tensors over TCP and over the
agent's Unix socket, and system shared memory (the input written into a registered region, the outputs read from
one) over TCP and over the Unix socket; for the digits MLP and for an image-like input of ~1 MB per call
(float32[1, 3, 320, 272] → global average pool). tritonclient cannot speak over a Unix socket, so those rows (and
their floors) use a minimal keep-alive HTTP client (``RawClient``), also run over TCP for a like-for-like row.
Within a row the null floor and the agent take turns, 50 calls each, so that both columns see the same machine.

    .venv/bin/python benchmarks/agent_overhead.py [--requests 2000] [--path-requests 1000] [--only-paths]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

NULL_BODY = json.dumps(
    {
        "model_name": "null",
        "model_version": "1",
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [1], "data": [0]}],
    }
).encode()


async def null_app(scope: dict, receive: object, send: object) -> None:
    """The reference: a null ASGI app, for uvicorn."""
    if scope["type"] != "http":
        return
    while True:
        msg = await receive()  # type: ignore[operator]
        if not msg.get("more_body"):
            break
    await send(
        {
            "type": "http.response.start",
            "status": 200,  # type: ignore[operator]
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(NULL_BODY)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": NULL_BODY})  # type: ignore[operator]


def serve_null(port: int, uds: str | None = None) -> None:
    """The floor: a fixed response at once, no parsing, no inference, served by the loop that answers the agent's
    port (the inference worker's selectors loop and HTTP stack, ``worker/httpserve.py``), on TCP and on ``uds``.

    The worker makes no memory system call while it serves ~1 MB bodies (strace: none in 100 requests): glibc's
    mmap threshold there has risen above them (it rises to the size of a mapped block freed, up to 32 MiB), and what
    the model holds sits on top of its heap. In a fresh process each body would be mapped, faulted in and unmapped
    (or the heap grown and trimmed) per request, ~0.9 ms for 1 MB: a floor slower than the worker. A 16 MiB block
    freed at start raises the threshold the same way (and the heap's trim threshold to twice that)."""
    import socket

    block = bytearray(16 * 2**20)
    del block

    from edgefleet.agent.httpserver import DEFAULT_LIMITS, JSON_HEADERS, Respond
    from edgefleet.agent.worker.httpserve import serve_plain

    # The answer to every request: the agent's own answer to the request measured (set through /null/answer before
    # each row, see _same_answer), so that the client decodes the same bytes from both servers.
    answer = [NULL_BODY, JSON_HEADERS]

    def handle(method: str, path: str, headers: dict[bytes, bytes], body: bytes, respond: Respond) -> None:
        if path == "/null/answer":
            json_len = headers.get(b"x-json-length")
            answer[:] = [body, b"%s%s\r\n" % (BINARY_HEADERS, json_len) if json_len else JSON_HEADERS]
        respond(200, answer[0], answer[1])

    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("127.0.0.1", port))
    tcp.listen(1024)
    listens = [tcp]
    if uds:
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(uds)
        unix.listen(1024)
        listens.append(unix)
    serve_plain(listens, handle, DEFAULT_LIMITS)


BINARY_HEADERS = b"content-type: application/octet-stream\r\ninference-header-content-length: "


def _same_answer(null: tuple[str, int] | str, agent: tuple[str, int] | str, path: str, head: bytes, raw: bytes) -> None:
    """Make the null server answer what the agent answers to ``head`` + ``raw`` on ``path``, byte for byte."""
    probe = RawClient(agent)
    status, _, _ = probe.post(path, head, raw)
    body, json_len = probe.last
    probe.close()
    if status != 200:
        raise RuntimeError(f"the agent answered {status}: {body[:200]!r}")
    setter = RawClient(null)
    extra = b"x-json-length: %d\r\n" % json_len if json_len is not None else b""
    setter.sock.sendall(
        b"POST /null/answer HTTP/1.1\r\nhost: local\r\n%scontent-length: %d\r\n\r\n%s" % (extra, len(body), body)
    )
    setter.read()
    setter.close()


def _tc_request(x: np.ndarray, binary: bool) -> tuple[bytes, bytes]:
    """The infer request tritonclient sends in :func:`run_client` (the JSON header and the raw tensor bytes)."""
    inp: dict[str, Any] = {"name": "X", "shape": list(x.shape), "datatype": "FP32"}
    if binary:
        inp["parameters"] = {"binary_data_size": x.nbytes}
    else:
        inp["data"] = x.ravel().tolist()
    head = {"inputs": [inp], "outputs": [{"name": "label", "parameters": {"binary_data": binary}}]}
    return json.dumps(head).encode(), x.tobytes() if binary else b""


def _start_null(port: int, uds: str | None = None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, __file__, "--null-server", str(port)]
    return subprocess.Popen(cmd + (["--null-uds", uds] if uds else []))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.01)
    raise RuntimeError(f"{url} did not come up")


def _pct(xs: list[float]) -> tuple[float, float]:
    return float(np.percentile(xs, 50) * 1000), float(np.percentile(xs, 99) * 1000)


def run_client(url: str, model: str, x: np.ndarray, binary: bool, concurrency: int, n: int) -> dict[str, float]:
    import threading

    import tritonclient.http as th

    def one_client(count: int, lat: list[float]) -> None:
        # One connection per simulated caller, as 8 independent applications on the device would do.
        client = th.InferenceServerClient(url)
        inp = th.InferInput("X", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        outs = [th.InferRequestedOutput("label", binary_data=binary)]
        for _ in range(20):
            client.infer(model, [inp], outputs=outs)
        barrier.wait()
        for _ in range(count):
            s = time.perf_counter()
            client.infer(model, [inp], outputs=outs)
            lat.append(time.perf_counter() - s)
        client.close()

    barrier = threading.Barrier(concurrency + 1)
    lats: list[list[float]] = [[] for _ in range(concurrency)]
    threads = [threading.Thread(target=one_client, args=(n // concurrency, lats[i])) for i in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = [v for xs in lats for v in xs]
    p50, p99 = _pct(lat)
    return {"p50_ms": p50, "p99_ms": p99, "req_s": len(lat) / wall}


# ---------------------------------------------------------------- the local zero-copy paths


class RawClient:
    """A minimal keep-alive HTTP/1.1 client for the OIP binary and shared memory requests, over TCP or a Unix
    socket (tritonclient has no Unix socket transport). It decodes answers as tritonclient would: the JSON header,
    then each binary output as a numpy array."""

    def __init__(self, addr: tuple[str, int] | str) -> None:
        import socket

        if isinstance(addr, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.connect(addr)
        self.buf = b""
        self.last: tuple[bytes, int | None] = (b"", None)

    def post(self, path: str, head: bytes, raw: bytes = b"") -> tuple[int, dict[str, Any], bytes]:
        extra = b"inference-header-content-length: %d\r\n" % len(head) if raw else b""
        req = b"POST %s HTTP/1.1\r\nhost: local\r\n%scontent-length: %d\r\n\r\n" % (
            path.encode(),
            extra,
            len(head) + len(raw),
        )
        self.sock.sendall(req + head if len(raw) < 65536 else req)
        if len(raw) >= 65536:
            self.sock.sendall(head)
            self.sock.sendall(raw)
        elif raw:
            self.sock.sendall(raw)
        status, body, jl = self.read()
        n = len(body) if jl is None else jl
        return status, json.loads(body[:n]), body[n:]

    def read(self) -> tuple[int, bytes, int | None]:
        """One answer: its status, body and JSON header length (None: a JSON body); kept as :attr:`last`."""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(65536)
        top, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = top.split(b"\r\n")
        status = int(lines[0].split()[1])
        hdrs = {k.lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
        n = int(hdrs[b"content-length"])
        while len(rest) < n:
            rest += self.sock.recv(max(65536, n - len(rest)))
        body, self.buf = rest[:n], rest[n:]
        jl = hdrs.get(b"inference-header-content-length")
        self.last = (body, None if jl is None else int(jl))
        return status, body, self.last[1]

    def infer(self, path: str, head: bytes, raw: bytes = b"") -> dict[str, np.ndarray]:
        status, doc, blob = self.post(path, head, raw)
        if status != 200:
            raise RuntimeError(f"{status}: {doc}")
        out: dict[str, np.ndarray] = {}
        pos = 0
        for o in doc["outputs"]:
            size = (o.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                out[o["name"]] = np.frombuffer(blob[pos : pos + size], dtype=_NP[o["datatype"]]).reshape(o["shape"])
                pos += size
        return out

    def close(self) -> None:
        self.sock.close()


_NP = {"FP32": np.float32, "INT64": np.int64, "FP64": np.float64, "INT32": np.int32}


def image_model() -> bytes:
    """A large-input model that computes little: float32[N, 3, 320, 272] (~1 MB at N=1) → global average pool."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 3, 320, 272])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 3])
    pooled = helper.make_node("GlobalAveragePool", ["X"], ["P"])
    flat = helper.make_node("Flatten", ["P"], ["Y"], axis=1)
    graph = helper.make_graph([pooled, flat], "image", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _timed(n: int, call: Any) -> dict[str, float]:
    for _ in range(max(20, n // 20)):
        call()
    lat: list[float] = []
    t0 = time.perf_counter()
    for _ in range(n):
        s = time.perf_counter()
        call()
        lat.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    p50, p99 = _pct(lat)
    return {"p50_ms": p50, "p99_ms": p99, "req_s": n / wall}


def _side_by_side(
    n: int, null_call: Any, agent_call: Any, block: int = 50
) -> tuple[dict[str, float], dict[str, float]]:
    """``n`` calls each of the null floor and the agent, alternating in blocks of ``block``, so that both columns
    see the same machine (other load comes and goes within a row, not between its two columns)."""
    for _ in range(max(20, n // 20)):
        null_call()
        agent_call()
    lats: tuple[list[float], list[float]] = ([], [])
    walls = [0.0, 0.0]
    done = 0
    while done < n:
        k = min(block, n - done)
        for i, call in enumerate((null_call, agent_call)):
            lat = lats[i]
            t0 = time.perf_counter()
            for _ in range(k):
                s = time.perf_counter()
                call()
                lat.append(time.perf_counter() - s)
            walls[i] += time.perf_counter() - t0
        done += k
    out = []
    for lat, wall in zip(lats, walls, strict=True):
        p50, p99 = _pct(lat)
        out.append({"p50_ms": p50, "p99_ms": p99, "req_s": n / wall})
    return out[0], out[1]


class _Regions:
    """An input and an output region (tritonclient.utils.shared_memory), registered on the server at ``url``."""

    def __init__(self, x: np.ndarray, tag: str) -> None:
        import uuid

        import tritonclient.utils.shared_memory as shm

        self.shm = shm
        self.id = uuid.uuid4().hex[:8]
        self.in_key, self.out_key = f"/efb-in-{tag}-{self.id}", f"/efb-out-{tag}-{self.id}"
        self.in_handle = shm.create_shared_memory_region(self.in_key[1:], self.in_key, x.nbytes)
        self.out_handle = shm.create_shared_memory_region(self.out_key[1:], self.out_key, 1 << 16)
        self.in_view = np.ndarray(x.shape, x.dtype, buffer=self.in_handle._mpsm_handle.buf)
        self.nbytes = x.nbytes

    def register(self, url: str) -> None:
        import tritonclient.http as th

        c = th.InferenceServerClient(url)
        for name in ("in-" + self.id, "out-" + self.id):
            try:
                c.unregister_system_shared_memory(name)
            except Exception:
                pass
        c.register_system_shared_memory("in-" + self.id, self.in_key, self.nbytes)
        c.register_system_shared_memory("out-" + self.id, self.out_key, 1 << 16)
        c.close()

    def output(self, shape: list[int]) -> np.ndarray:
        return np.array(self.shm.get_contents_as_numpy(self.out_handle, np.float32, shape))

    def close(self) -> None:
        self.in_view = None  # type: ignore[assignment]
        self.shm.destroy_shared_memory_region(self.in_handle)
        self.shm.destroy_shared_memory_region(self.out_handle)


def path_rows(
    url: str, uds: str, null_url: str, null_uds: str, model: str, x: np.ndarray, out: str, n: int, tag: str
) -> list[tuple[str, dict[str, float], dict[str, float]]]:
    """(path, null floor, agent) at concurrency 1 for each local path; every call is end to end: the input written
    (into the body, or into its region), the answer read and decoded (the output copied out of its region)."""
    import tritonclient.http as th

    infer_path = f"/v2/models/{model}/infer"
    regions = _Regions(x, tag)
    regions.register(url)
    shm_in = {"shared_memory_region": "in-" + regions.id, "shared_memory_byte_size": x.nbytes}
    shm_out = {"shared_memory_region": "out-" + regions.id, "shared_memory_byte_size": 1 << 16}
    shm_head = json.dumps(
        {
            "inputs": [{"name": "X", "shape": list(x.shape), "datatype": "FP32", "parameters": shm_in}],
            "outputs": [{"name": out, "parameters": shm_out}],
        }
    ).encode()
    bin_head = json.dumps(
        {
            "inputs": [
                {"name": "X", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
            ],
            "outputs": [{"name": out, "parameters": {"binary_data": True}}],
        }
    ).encode()

    def tc_binary(target: str) -> Any:
        client = th.InferenceServerClient(target)
        inp = th.InferInput("X", list(x.shape), "FP32")
        outs = [th.InferRequestedOutput(out, binary_data=True)]

        def call() -> None:
            inp.set_data_from_numpy(x, binary_data=True)
            client.infer(model, [inp], outputs=outs).as_numpy(out)

        return call

    def tc_shm(target: str) -> Any:
        client = th.InferenceServerClient(target)
        inp = th.InferInput("X", list(x.shape), "FP32")
        inp.set_shared_memory("in-" + regions.id, x.nbytes)
        o = th.InferRequestedOutput(out)
        o.set_shared_memory("out-" + regions.id, 1 << 16)

        def call() -> None:
            np.copyto(regions.in_view, x)
            res = client.infer(model, [inp], outputs=[o]).get_output(out)
            if res is not None and res.get("parameters", {}).get("shared_memory_region"):
                regions.output(res["shape"])

        return call

    def raw_binary(addr: tuple[str, int] | str) -> Any:
        client = RawClient(addr)

        def call() -> None:
            client.infer(infer_path, bin_head, x.tobytes())

        return call

    def raw_shm(addr: tuple[str, int] | str) -> Any:
        client = RawClient(addr)

        def call() -> None:
            np.copyto(regions.in_view, x)
            _, doc, _ = client.post(infer_path, shm_head)
            for o in doc.get("outputs", []):
                if (o.get("parameters") or {}).get("shared_memory_region"):
                    regions.output(o["shape"])

        return call

    host, port = url.split(":")
    nhost, nport = null_url.split(":")
    tcp, null_tcp = (host, int(port)), (nhost, int(nport))
    raw = x.tobytes()
    # (path, null call, agent call, the request whose answer the null server gives: its transport, head and body)
    paths: list[tuple[str, Any, Any, tuple[Any, Any, bytes, bytes]]] = [
        ("tcp binary (tritonclient)", tc_binary(null_url), tc_binary(url), (null_tcp, tcp, bin_head, raw)),
        ("tcp shm (tritonclient)", tc_shm(null_url), tc_shm(url), (null_tcp, tcp, shm_head, b"")),
        ("tcp binary (raw client)", raw_binary(null_tcp), raw_binary(tcp), (null_tcp, tcp, bin_head, raw)),
        ("uds binary (raw client)", raw_binary(null_uds), raw_binary(uds), (null_uds, uds, bin_head, raw)),
        ("uds shm (raw client)", raw_shm(null_uds), raw_shm(uds), (null_uds, uds, shm_head, b"")),
    ]
    np.copyto(regions.in_view, x)
    rows = []
    for name, null_call, agent_call, (null_addr, agent_addr, head, body) in paths:
        _same_answer(null_addr, agent_addr, infer_path, head, body)
        rows.append((name, *_side_by_side(n, null_call, agent_call)))
    regions.close()
    return rows


def _session_p50(model: Path, x: np.ndarray) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    return _timed(500, lambda: sess.run(None, {"X": x}))["p50_ms"]


def run_paths(exe: str, tmp: Path, small: Path, xs: np.ndarray, n: int) -> None:
    """Start a null server and an agent (TCP + Unix socket) per model; print the local paths' table."""
    big = tmp / "image.onnx"
    big.write_bytes(image_model())
    xb = np.random.default_rng(0).random((1, 3, 320, 272), dtype=np.float32)
    results = []
    for model, x, out, count in ((small, xs, "probabilities", n), (big, xb, "Y", max(100, n // 4))):
        null_port, null_uds = _free_port(), str(tmp / f"null-{model.stem}.sock")
        null = _start_null(null_port, null_uds)
        try:
            port, uds = _free_port(), str(tmp / f"{model.stem}.sock")
            agent = subprocess.Popen([exe, "serve", str(model), "--port", str(port), "--uds", uds])
            try:
                _wait_ready(f"127.0.0.1:{null_port}")
                _wait_ready(f"127.0.0.1:{port}")
                time.sleep(0.5)  # the worker takes the port over just after it reports ready
                rows = path_rows(
                    f"127.0.0.1:{port}", uds, f"127.0.0.1:{null_port}", null_uds, model.stem, x, out, count, model.stem
                )
                results.append((model.stem, x, count, rows, _session_p50(model, x)))
            finally:
                agent.terminate()
                agent.wait()
        finally:
            null.terminate()
            null.wait()
    print()
    print("local paths, concurrency 1, end to end (input written, answer read and decoded); Δ = agent − its null floor")
    print(f"{'model':>8} {'path':>26} | {'null p50':>9} {'p99':>7} | {'agent p50':>9} {'p99':>7} | {'Δp50 µs':>8}")
    for stem, x, count, rows, run_ms in results:
        print(f"{stem:>8} raw session.run p50 {run_ms * 1000:.0f} µs (part of every agent row's Δ)")
        for name, nul, agt in rows:
            print(
                f"{stem:>8} {name:>26} | {nul['p50_ms']:9.3f} {nul['p99_ms']:7.3f} | {agt['p50_ms']:9.3f} "
                f"{agt['p99_ms']:7.3f} | {(agt['p50_ms'] - nul['p50_ms']) * 1000:8.0f}"
            )
        byname = {name: agt for name, _, agt in rows}
        tcp, shm_ = byname["tcp binary (tritonclient)"], byname["tcp shm (tritonclient)"]
        uds_shm = byname["uds shm (raw client)"]
        print(
            f"{stem:>8} input {x.nbytes / 2**20:.2f} MiB ({count} calls per row): shared memory vs binary over TCP "
            f"(tritonclient, agent p50): {tcp['p50_ms'] / shm_['p50_ms']:.1f}x faster; "
            f"uds shm (raw) vs tcp binary (tritonclient): {tcp['p50_ms'] / uds_shm['p50_ms']:.1f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--path-requests", type=int, default=1000, help="calls per local-path row (the large input: 1/4)")
    ap.add_argument("--only-paths", action="store_true", help="measure the local zero-copy paths only")
    ap.add_argument(
        "--edgefleet",
        type=Path,
        help="the edgefleet executable to measure (default: this venv's); e.g. one of a device-only venv, "
        "`pip install -c constraints.txt .` (docs/install.md), to compare its idle RSS",
    )
    ap.add_argument("--null-server", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--null-uds", help=argparse.SUPPRESS)
    ap.add_argument("--uvicorn-null-server", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.null_server:
        serve_null(a.null_server, a.null_uds)
        return
    if a.uvicorn_null_server:
        import uvicorn

        uvicorn.run(
            null_app,
            host="127.0.0.1",
            port=a.uvicorn_null_server,
            log_level="warning",
            lifespan="off",
            access_log=False,
        )
        return

    import onnxruntime as ort

    from edgefleet import examples

    tmp = Path(tempfile.mkdtemp(prefix="agent-bench-"))
    model = tmp / "mlp.onnx"
    model.write_bytes(examples.train_digits_mlp(hidden=(64,)))
    x = examples.digits().x_test[:1].astype(np.float32)
    exe = str(a.edgefleet or Path(sys.executable).with_name("edgefleet"))
    if a.only_paths:
        run_paths(exe, tmp, model, x, a.path_requests)
        return

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    for _ in range(100):
        sess.run(None, {"X": x})
    raw: list[float] = []
    t0 = time.perf_counter()
    for _ in range(a.requests):
        s = time.perf_counter()
        sess.run(None, {"X": x})
        raw.append(time.perf_counter() - s)
    raw_wall = time.perf_counter() - t0
    rp50, rp99 = _pct(raw)

    null_port, agent_port, uvi_port = _free_port(), _free_port(), _free_port()
    null = _start_null(null_port)
    uvi = subprocess.Popen([sys.executable, __file__, "--uvicorn-null-server", str(uvi_port)])
    t_start = time.perf_counter()
    agent = subprocess.Popen([exe, "serve", str(model), "--port", str(agent_port)])
    first = None
    body = json.dumps({"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": x.ravel().tolist()}]})
    while first is None and time.perf_counter() - t_start < 60:
        try:
            r = httpx.post(f"http://127.0.0.1:{agent_port}/v2/models/mlp/infer", content=body, timeout=1)
            if r.status_code == 200:
                first = time.perf_counter() - t_start
            else:  # listening, the model still loading (503): poll as gently as while refused
                time.sleep(0.005)
        except httpx.HTTPError:
            time.sleep(0.005)
    _wait_ready(f"127.0.0.1:{null_port}")
    _wait_ready(f"127.0.0.1:{uvi_port}")
    try:
        rows = []
        for conc in (1, 8):
            for binary in (False, True):
                mode = "binary" if binary else "json"
                _same_answer(
                    ("127.0.0.1", null_port), ("127.0.0.1", agent_port), "/v2/models/mlp/infer", *_tc_request(x, binary)
                )
                nul = run_client(f"127.0.0.1:{null_port}", "null", x, binary, conc, a.requests)
                agt = run_client(f"127.0.0.1:{agent_port}", "mlp", x, binary, conc, a.requests)
                rows.append((conc, mode, nul, agt))
        uvi_rows = [(conc, run_client(f"127.0.0.1:{uvi_port}", "null", x, False, conc, a.requests)) for conc in (1, 8)]
        time.sleep(1.0)
        ap_ = psutil.Process(agent.pid)
        agent_rss = ap_.memory_info().rss / 2**20
        worker_rss = sum(c.memory_info().rss for c in ap_.children(recursive=True)) / 2**20
        # RSS also counts the shared libraries' file pages the kernel mapped around each fault, which depends on
        # what the page cache holds; USS (pages only this process has) is what a second model would add
        agent_uss = ap_.memory_full_info().uss / 2**20
        worker_uss = sum(c.memory_full_info().uss for c in ap_.children(recursive=True)) / 2**20
        bare = subprocess.Popen([sys.executable, "-c", "import numpy, onnxruntime, time; time.sleep(5)"])
        time.sleep(2.5)
        bare_rss = psutil.Process(bare.pid).memory_info().rss / 2**20
        bare.kill()
    finally:
        for p in (agent, null, uvi):
            p.terminate()
        for p in (agent, null, uvi):
            p.wait()

    print(
        f"host: {os.cpu_count()} CPUs; model: digits MLP 64 hidden, {model.stat().st_size / 1024:.1f} KiB; "
        f"{a.requests} requests per row (concurrency 8: 8 client threads, one connection each)"
    )
    print(f"raw session.run           p50 {rp50:7.3f} ms  p99 {rp99:7.3f} ms  {a.requests / raw_wall:8.0f} calls/s")
    print(
        f"{'conc':>4} {'mode':>6} | {'null p50':>9} {'p99':>7} {'req/s':>7} | {'agent p50':>9} {'p99':>7} "
        f"{'req/s':>7} | {'Δp50 ms':>8} {'req/s ratio':>11}"
    )
    for conc, mode, nul, agt in rows:
        print(
            f"{conc:>4} {mode:>6} | {nul['p50_ms']:9.3f} {nul['p99_ms']:7.3f} {nul['req_s']:7.0f} | "
            f"{agt['p50_ms']:9.3f} {agt['p99_ms']:7.3f} {agt['req_s']:7.0f} | "
            f"{agt['p50_ms'] - nul['p50_ms']:8.3f} {agt['req_s'] / nul['req_s']:11.2f}"
        )
    for conc, u in uvi_rows:
        print(
            f"reference: null ASGI app on uvicorn, conc {conc} json: p50 {u['p50_ms']:.3f} ms  p99 {u['p99_ms']:.3f} ms"
            f"  {u['req_s']:.0f} req/s"
        )
    print(f"cold start to first inference: {first * 1000:.0f} ms" if first else "cold start: no answer in 60 s")
    print(
        f"idle RSS ({exe}): agent {agent_rss:.1f} MB, worker {worker_rss:.1f} MB; "
        f"bare python+onnxruntime {bare_rss:.1f} MB "
        f"(worker budget = bare + model + 15 MB = {bare_rss + model.stat().st_size / 2**20 + 15:.1f} MB)"
    )
    print(f"idle USS (private memory): agent {agent_uss:.1f} MB, worker {worker_uss:.1f} MB")
    run_paths(exe, tmp, model, x, a.path_requests)


if __name__ == "__main__":
    main()
