"""Agent serving overhead, measured side by side in one run.

tritonclient → ``edgefleet serve`` (the agent's OIP server + worker process) for a small digits MLP, at
concurrency 1 and 8, JSON and binary tensors; next to raw ``session.run`` in process and a *null* OIP server
— the floor the client and HTTP stack alone allow. The null server runs the agent's own HTTP stack
(``edgefleet.agent.httpserver``: the same parser, connection handling and one write per response) with a
handler that answers a fixed response at once, without parsing the body or running inference; so the
difference between the two columns is exactly what the agent adds (OIP parsing, the worker hop, encoding,
metrics). For reference, one row also measures a null ASGI app on uvicorn (the stack the agent used before
ADR 0031; uvicorn picks httptools when it is installed). Plus cold start (``edgefleet serve`` process start →
first inference answered) and idle RSS of the agent and its worker, next to a bare Python + onnxruntime process.

    .venv/bin/python benchmarks/agent_overhead.py [--requests 2000]
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


async def null_app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
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


def serve_null(port: int) -> None:
    """The floor: the agent's HTTP stack answering a fixed response, no parsing, no inference."""
    import asyncio

    from edgefleet.agent.httpserver import JSON_HEADERS, Respond, serve_http

    def handle(method: str, path: str, headers: dict[bytes, bytes], body: bytes, respond: Respond) -> None:
        respond(200, NULL_BODY, JSON_HEADERS)

    async def main() -> None:
        await serve_http(handle, "127.0.0.1", port)
        await asyncio.Event().wait()

    asyncio.run(main())


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument(
        "--edgefleet",
        type=Path,
        help="the edgefleet executable to measure (default: this venv's); e.g. one of a device-only venv, "
        "`pip install -c constraints.txt .` (docs/install.md), to compare its idle RSS",
    )
    ap.add_argument("--null-server", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--uvicorn-null-server", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.null_server:
        serve_null(a.null_server)
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

    exe = str(a.edgefleet or Path(sys.executable).with_name("edgefleet"))
    null_port, agent_port, uvi_port = _free_port(), _free_port(), _free_port()
    null = subprocess.Popen([sys.executable, __file__, "--null-server", str(null_port)])
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
    for conc, r in uvi_rows:
        print(
            f"reference: null ASGI app on uvicorn, conc {conc} json: p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms"
            f"  {r['req_s']:.0f} req/s"
        )
    print(f"cold start to first inference: {first * 1000:.0f} ms" if first else "cold start: no answer in 60 s")
    print(
        f"idle RSS ({exe}): agent {agent_rss:.1f} MB, worker {worker_rss:.1f} MB; "
        f"bare python+onnxruntime {bare_rss:.1f} MB "
        f"(worker budget = bare + model + 15 MB = {bare_rss + model.stat().st_size / 2**20 + 15:.1f} MB)"
    )
    print(f"idle USS (private memory): agent {agent_uss:.1f} MB, worker {worker_uss:.1f} MB")


if __name__ == "__main__":
    main()
