"""Scale-out: N devices on PostgreSQL, two ``edgefleet server`` replicas behind HAProxy, real check-ins from a
separate load-generator process — the fleet's own rate first, then each topology's ceiling, side by side in one run.

    .venv/bin/python benchmarks/fleet_scale.py [--devices 1000000] [--duration 60] [--cap-seconds 10]

1. Setup (timed): a database of its own (``CREATE DATABASE edgefleet_bench``, dropped at the end; the tests'
   ``test`` database is not touched), the product's migrations, one model version row, and N device rows written
   with ``COPY`` — each with a credential of the enrolled shape (``efd_`` + 43 URL-safe characters) stored as
   ``credentials.hash_secret`` of it, exactly what enrollment stores and what the check-in path compares. Then two
   real ``edgefleet server`` replicas (each loads all N devices into its check-in cache before it listens) and
   HAProxy with the shipped ``deploy/haproxy/haproxy.cfg`` (ports replaced), plus a second frontend that reaches
   replica 1 only.
2. The fleet's rate: every device polls every 15 minutes, so the fleet sends N/900 check-ins per second. A
   ``--duration`` sample of that period is replayed open-loop (each device at its own moment, latency counted from
   that moment, so a queue shows in p99) through both replicas, then through replica 1 alone. Each device holds the
   ETag of its last check-in, as agents do (the 304 path); the ETag is rendered with the server's own code and
   checked against one real answer first.
3. Ceilings: closed-loop check-ins as fast as ``--connections`` keep-alive connections go, through HAProxy to two
   replicas, to one replica, straight to replica 1, and to the bare endpoint of benchmarks/checkin.py (a token
   lookup and an ETag compare, nothing else). CPU per process is printed beside each, so what bounds the figure —
   on a 2-core machine the load generator and HAProxy take cores the replicas would use — is visible.

Also printed: database connections per replica (``pg_stat_activity`` by ``application_name``, the peak while
loaded) and each replica's RSS (and RSS per 100,000 devices).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
EDGEFLEET = str(Path(sys.executable).with_name("edgefleet"))
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"  # only to create and drop the bench database
POLL_S = 900.0  # the fleet's poll interval: 15 minutes
TIERS = ("rpi4", "jetson-orin", "x86-avx2")
MODEL, VERSION = "digits", "1.0.0"
SECRET = b"edgefleet-bench"  # the credentials are derived from it, so the load generator needs no list of them


# ----------------------------------------------------------------------------------------------------- the fleet


def device_id(i: int) -> str:
    return f"dev-{i:016x}"  # the shape enrollment gives ("dev-" + 8 random bytes in hex)


def credential(i: int, key: bytes = SECRET) -> str:
    """Device ``i``'s credential: the shape ``credentials.new_secret("efd")`` issues (32 bytes, URL-safe)."""
    raw = hmac.new(key, str(i).encode(), hashlib.sha256).digest()
    return "efd_" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@contextlib.contextmanager
def bench_database(name: str, admin_dsn: str = PG_ADMIN) -> Iterator[str]:
    """A PostgreSQL database of its own for the run, dropped afterwards (a leftover of a killed run first)."""
    import psycopg

    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise SystemExit(f"--db-name {name!r}: use lower-case letters, digits and _")
    with psycopg.connect(admin_dsn, autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def libpq_dsn(url: str) -> str:
    """``postgresql+psycopg://user@host:port/db`` → the libpq form psycopg takes."""
    m = re.fullmatch(r"postgresql(?:\+psycopg)?://(\w+)@([\w.]+):(\d+)/(\w+)", url.split("?")[0])
    if not m:
        raise SystemExit(f"unexpected database URL {url}")
    return f"user={m[1]} host={m[2]} port={m[3]} dbname={m[4]}"


def model_version_row(version: str = VERSION) -> dict[str, Any]:
    """A published version as the registry stores it (the check-in renders its target and hashes)."""
    return {
        "model": MODEL,
        "version": version,
        "target": f"{MODEL}/{version}/{MODEL}-{version}.efpkg",
        "package_sha256": hashlib.sha256(f"package {version}".encode()).hexdigest(),
        "model_sha256": hashlib.sha256(f"model {version}".encode()).hexdigest(),
        "length": 120_000,
        "channel": "stable",
        "requirements": {},
        "lineage": {},
        "manifest": {},
    }


def seed_fleet(url: str, n: int, *, key: bytes = SECRET) -> dict[str, float]:
    """Migrate, then COPY N devices serving and wanting digits 1.0.0; returns the seconds each step took."""
    import psycopg
    from sqlalchemy import insert

    from edgefleet.controlplane.credentials import hash_secret
    from edgefleet.controlplane.db import Database, ModelVersion

    t0 = time.perf_counter()
    db = Database(url)
    db.migrate()
    with db.session() as s:
        s.execute(insert(ModelVersion), [model_version_row()])
    db.dispose()
    migrated = time.perf_counter()
    now = datetime.now(UTC)
    enrolled = (now - timedelta(days=30)).isoformat()
    seen = (now - timedelta(minutes=5)).isoformat()
    changed = (now - timedelta(minutes=1)).isoformat()
    cols = (
        "id, tier, credential_hash, hardware, runtime, runtime_version, agent_version, public_key, enrolled_at, "
        "last_seen, changed_at, state, served_model, served_version, desired_model, desired_version, "
        "dropped_records, invalid_reports"
    )
    with psycopg.connect(libpq_dsn(url)) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY devices ({cols}) FROM STDIN") as cp:
            buf = io.StringIO()
            for i in range(n):
                buf.write(
                    f"{device_id(i)}\t{TIERS[i % len(TIERS)]}\t{hash_secret(credential(i, key))}\t{{}}\tonnxruntime\t"
                    f"1.20.1\t0.1.0\t{hashlib.sha256(b'%d' % i).hexdigest()[:64]}\t{enrolled}\t{seen}\t{changed}\t"
                    f"committed\t{MODEL}\t{VERSION}\t{MODEL}\t{VERSION}\t0\t0\n"
                )
                if i % 50_000 == 49_999:
                    cp.write(buf.getvalue())
                    buf = io.StringIO()
            cp.write(buf.getvalue())
        conn.commit()
        cur.execute("ANALYZE devices")
        conn.commit()
    return {"migrate_s": migrated - t0, "copy_s": time.perf_counter() - migrated}


def expected_etags(indices: Sequence[int]) -> dict[int, str]:
    """The ETag each device holds after its last check-in, rendered by the server's own code from the row seeded."""
    from edgefleet.controlplane import devices
    from edgefleet.controlplane.db import Device, ModelVersion

    mv = ModelVersion(**model_version_row())
    versions = {(MODEL, VERSION): mv}
    out = {}
    for i in indices:
        d = Device(
            id=device_id(i),
            tier=TIERS[i % len(TIERS)],
            desired_model=MODEL,
            desired_version=VERSION,
            served_model=MODEL,
            served_version=VERSION,
        )
        out[i] = devices.etag_of(devices.render(devices.desired_state(d, None, versions)))
    return out


# ----------------------------------------------------------------------------------------- the load generator


@dataclass
class Job:
    """One generator process's share: open-loop (``schedule``: seconds from the start → device) or closed-loop
    (``pool`` of devices, for ``seconds``)."""

    port: int
    connections: int
    kind: str = "edgefleet"  # or "bare": benchmarks/checkin.py's endpoint, its ids and tokens
    schedule: list[tuple[float, int]] = field(default_factory=list)
    pool: list[int] = field(default_factory=list)
    seconds: float = 0.0


def _request(kind: str, i: int, etag: str) -> bytes:
    if kind == "bare":
        return (
            f"GET /api/v1/devices/d{i}/desired HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer cred-{i}\r\n"
            f'If-None-Match: "e"\r\n\r\n'
        ).encode()
    return (
        f"GET /api/v1/devices/{device_id(i)}/desired HTTP/1.1\r\nHost: edgefleet\r\n"
        f"Authorization: Bearer {credential(i)}\r\nIf-None-Match: {etag}\r\n\r\n"
    ).encode()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> int:
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    if length:
        await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def _run_job(job: Job, reqs: dict[int, bytes]) -> dict[str, Any]:
    lat: list[float] = []
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    t0 = time.perf_counter()
    queue: asyncio.Queue[tuple[float, int] | None] = asyncio.Queue()

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", job.port)

    async def one(conn: list[Any], i: int, due: float) -> None:
        try:
            code = None
            if conn[0] is not None:
                try:
                    code = await _exchange(conn[0], conn[1], reqs[i])
                except (ConnectionError, asyncio.IncompleteReadError):
                    # closed while idle (a keep-alive timeout): reopened and sent again, as HTTP clients do
                    conn[1].close()
            if code is None:
                conn[0], conn[1] = await connect()
                code = await _exchange(conn[0], conn[1], reqs[i])
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            if conn[1] is not None:
                conn[1].close()
            conn[0] = conn[1] = None
            return
        statuses[code] = statuses.get(code, 0) + 1
        lat.append(time.perf_counter() - due)

    async def open_worker() -> None:
        conn: list[Any] = [None, None]
        while (item := await queue.get()) is not None:
            await one(conn, item[1], item[0])
        if conn[1] is not None:
            conn[1].close()

    async def closed_worker(end: float, rng: random.Random) -> None:
        conn: list[Any] = [None, None]
        while (now := time.perf_counter()) < end:
            await one(conn, job.pool[rng.randrange(len(job.pool))], now)
        if conn[1] is not None:
            conn[1].close()

    if job.schedule:
        workers = [asyncio.create_task(open_worker()) for _ in range(job.connections)]
        for at, i in job.schedule:
            due = t0 + at
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            queue.put_nowait((due, i))
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)
    else:
        end = t0 + job.seconds
        rng = random.Random(os.getpid())
        await asyncio.gather(*(closed_worker(end, random.Random(rng.random())) for _ in range(job.connections)))
    return {"lat": lat, "statuses": statuses, "errors": errors, "elapsed": time.perf_counter() - t0}


def _generator(job: Job, ready: Any, go: Any, out: Any) -> None:
    """A load-generator process: every request prepared before the start (ETags rendered), then the run."""
    devices = sorted({i for _, i in job.schedule} | set(job.pool))
    tags = expected_etags(devices) if job.kind == "edgefleet" else {}
    reqs = {i: _request(job.kind, i, tags.get(i, "")) for i in devices}
    ready.set()
    go.wait()
    cpu0 = time.process_time()
    res = asyncio.run(_run_job(job, reqs))
    res["cpu_s"] = time.process_time() - cpu0
    out.put(res)


@dataclass
class Procs:
    """The processes whose CPU is accounted per run."""

    named: dict[str, psutil.Process]

    def cpu(self) -> dict[str, float]:
        out = {}
        for k, p in self.named.items():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                out[k] = t.user + t.system
        return out


class ConnSampler:
    """Peak database connections per application_name while it runs (pg_stat_activity, every 0.5 s)."""

    def __init__(self, dsn: str, dbname: str) -> None:
        self.dsn, self.dbname = dsn, dbname
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as c:
            while not self._stop.is_set():
                rows = c.execute(
                    "SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = %s GROUP BY 1",
                    (self.dbname,),
                ).fetchall()
                for name, k in rows:
                    self.peak[name] = max(self.peak.get(name, 0), int(k))
                self._stop.wait(0.5)

    def __enter__(self) -> ConnSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(5)


def drive(jobs: list[Job], procs: Procs, sampler_dsn: tuple[str, str] | None = None) -> dict[str, Any]:
    """Run ``jobs`` in generator processes of their own, all started at once; merged results and CPU per process."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    go = ctx.Event()
    readies = [ctx.Event() for _ in jobs]
    ps = [ctx.Process(target=_generator, args=(j, r, go, q)) for j, r in zip(jobs, readies, strict=True)]
    for p in ps:
        p.start()
    for r in readies:
        if not r.wait(600):
            raise SystemExit("a load generator did not get ready")
    cpu0, wall0, busy0 = procs.cpu(), time.perf_counter(), psutil.cpu_times()
    sampler = ConnSampler(*sampler_dsn) if sampler_dsn else contextlib.nullcontext()
    with sampler:
        go.set()
        results = [q.get(timeout=3600) for _ in ps]
    wall = time.perf_counter() - wall0
    cpu1, busy1 = procs.cpu(), psutil.cpu_times()
    for p in ps:
        p.join(30)
    lat = sorted(x for r in results for x in r["lat"])
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
        for k2, v in r["errors"].items():
            errors[k2] = errors.get(k2, 0) + v
    seconds = max(r["elapsed"] for r in results)
    idle = (busy1.idle + getattr(busy1, "iowait", 0.0)) - (busy0.idle + getattr(busy0, "iowait", 0.0))
    ncpu = psutil.cpu_count() or 1
    cores = {k: round((cpu1[k] - cpu0[k]) / wall, 2) for k in cpu1 if k in cpu0}
    cores["load generator"] = round(sum(r["cpu_s"] for r in results) / wall, 2)
    # PostgreSQL, and whatever else the machine runs meanwhile
    cores["other"] = round(max(0.0, ncpu - idle / wall - sum(cores.values())), 2)
    bad = sum(v for k, v in statuses.items() if k not in (200, 304)) + sum(errors.values())
    return {
        "requests": len(lat),
        "rate_per_s": round(len(lat) / seconds, 1),
        "p50_ms": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2) if lat else None,
        "statuses": statuses,
        "errors": bad,
        "error_kinds": errors,
        "cores_used": cores,
        "machine_busy_cores": round(ncpu - idle / wall, 2),
        "db_connections_peak": dict(sampler.peak) if isinstance(sampler, ConnSampler) else None,
    }


def fleet_schedule(n: int, seconds: float, rng: random.Random) -> list[tuple[float, int]]:
    """The check-ins of a ``seconds`` sample of a 15-minute poll period: every device polls once per period at its
    own phase, so the devices whose phase falls in the sample each check in once, at that moment."""
    k = min(n, round(n * seconds / POLL_S))
    ids = rng.sample(range(n), k)
    return sorted((rng.uniform(0, seconds), i) for i in ids)


def split_schedule(sched: list[tuple[float, int]], parts: int) -> list[list[tuple[float, int]]]:
    return [sched[k::parts] for k in range(parts)]


# ------------------------------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    cond: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None
) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_replica(
    url: str, name: str, repo: Path, port: int, *, mqtt: str | None = None, log: Path | None = None
) -> tuple[subprocess.Popen[bytes], float, int]:
    """An ``edgefleet server`` on ``port`` whose database connections carry ``application_name=name``; returns it,
    the seconds until ``/health/ready`` answered (it loads every device before it listens) and its peak RSS."""
    args = [EDGEFLEET, "server", "--db", f"{url}?application_name={name}", "--repo", str(repo), "--port", str(port)]
    args += ["--log-level", "warning"] + (["--mqtt", mqtt] if mqtt else [])
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child holds it
    t0 = time.perf_counter()
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    ps = psutil.Process(p.pid)
    peak = 0
    end = time.monotonic() + 1800
    while not http_ok(f"http://127.0.0.1:{port}/health/ready"):
        if p.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log else ""
            raise SystemExit(f"replica {name} exited with {p.returncode}:\n{tail}")
        if time.monotonic() > end:
            raise SystemExit(f"replica {name} was not ready in 30 minutes")
        with contextlib.suppress(psutil.Error):
            peak = max(peak, ps.memory_info().rss)
        time.sleep(0.25)
    return p, time.perf_counter() - t0, peak


HAPROXY_ONE = """
# benchmarks/fleet_scale.py: the same balancer settings, one replica behind them
frontend edgefleet_one
    bind 127.0.0.1:{lb1}
    default_backend replica1_only

backend replica1_only
    balance roundrobin
    option httpchk GET /health/ready
    http-check expect status 200
    default-server inter 1s fall 2 rise 2
    server replica1 127.0.0.1:{p1} check
"""


def haproxy_config(lb: int, lb1: int, p1: int, p2: int) -> str:
    """The shipped configuration with free ports (as tests/test_scale_out.py does), plus a replica-1-only
    frontend so one replica is measured through the same balancer."""
    cfg = HAPROXY_CFG.read_text()
    for old, new in (("8700", lb), ("8701", p1), ("8702", p2)):
        if f"127.0.0.1:{old}" not in cfg:
            raise SystemExit(f"{HAPROXY_CFG} no longer binds 127.0.0.1:{old}: update the benchmark")
        cfg = cfg.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
    return cfg + HAPROXY_ONE.format(lb1=lb1, p1=p1)


def stop(procs: Sequence[subprocess.Popen[Any]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


# ------------------------------------------------------------------------------------------------------ main


def _row(name: str, r: dict[str, Any]) -> str:
    cores = ", ".join(f"{k} {v}" for k, v in r["cores_used"].items())
    return (
        f"{name:34s} {r['rate_per_s']:>9} /s  p50 {r['p50_ms']!s:>7} ms  p99 {r['p99_ms']!s:>8} ms  "
        f"errors {r['errors']:>4}  {r['statuses']}  cores: {cores} (machine {r['machine_busy_cores']})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1_000_000, help="devices registered [1000000]")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of the 15-minute period replayed [60]")
    ap.add_argument("--cap-seconds", type=float, default=10.0, help="seconds of each ceiling run [10]")
    ap.add_argument("--cap-repeats", type=int, default=2, help="interleaved rounds of ceiling runs; best kept [2]")
    ap.add_argument("--connections", type=int, default=64, help="keep-alive connections of the generator [64]")
    ap.add_argument("--generators", type=int, default=1, help="load-generator processes [1]")
    ap.add_argument("--pool", type=int, default=50_000, help="devices the ceiling runs draw from [50000]")
    ap.add_argument("--db-name", default="edgefleet_bench", help="database created and dropped [edgefleet_bench]")
    ap.add_argument("--json", action="store_true", help="print only the summary as JSON")
    a = ap.parse_args()
    if a.devices < 1 or a.duration <= 0 or a.cap_seconds <= 0 or a.connections < 1 or a.generators < 1:
        ap.error("--devices, --duration, --cap-seconds, --connections and --generators must be positive")
    if shutil.which("haproxy") is None:
        raise SystemExit("haproxy is not installed (`make system-deps` installs Debian's)")
    say: Callable[..., None] = (lambda *x, **k: None) if a.json else print
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from checkin import BARE_APP  # the bare endpoint: a token lookup and an ETag compare

    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp(prefix="ef-fleet-scale-"))
    procs: list[subprocess.Popen[Any]] = []
    started = time.perf_counter()
    summary: dict[str, Any] = {"devices": a.devices, "cpus": os.cpu_count(), "date": datetime.now(UTC).isoformat()}
    try:
        with bench_database(a.db_name) as url:
            say(f"registering {a.devices:,} devices in database {a.db_name} (COPY) ...", flush=True)
            setup = seed_fleet(url, a.devices)
            say(f"  migrations {setup['migrate_s']:.1f} s, COPY of the device rows {setup['copy_s']:.1f} s", flush=True)
            p1, p2, lb, lb1 = free_port(), free_port(), free_port(), free_port()
            replicas = []
            for name, port in (("efbench-replica1", p1), ("efbench-replica2", p2)):
                p, ready_s, peak = start_replica(url, name, tmp / "repo", port, log=tmp / f"{name}.log")
                procs.append(p)
                replicas.append(p)
                setup[f"{name}_ready_s"] = ready_s
                setup[f"{name}_startup_peak_rss_mb"] = peak / 2**20
                say(f"  {name}: ready in {ready_s:.1f} s with every device in memory (peak RSS {peak / 2**20:.0f} MB)")
            (tmp / "haproxy.cfg").write_text(haproxy_config(lb, lb1, p1, p2))
            proxy = subprocess.Popen(
                ["haproxy", "-f", str(tmp / "haproxy.cfg")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=open(tmp / "haproxy.log", "ab"),  # noqa: SIM115
            )
            procs.append(proxy)
            wait_until(lambda: http_ok(f"http://127.0.0.1:{lb}/health/ready"), 30, "HAProxy", proxy)
            wait_until(lambda: http_ok(f"http://127.0.0.1:{lb1}/health/ready"), 30, "HAProxy (one replica)", proxy)
            summary["setup_s"] = {k: round(v, 1) for k, v in setup.items()}

            # the ETag the load generator renders must be the one the server serves
            import httpx

            probe = rng.randrange(a.devices)
            r = httpx.get(
                f"http://127.0.0.1:{lb}/api/v1/devices/{device_id(probe)}/desired",
                headers={"Authorization": f"Bearer {credential(probe)}"},
            )
            if r.status_code != 200 or r.headers.get("etag") != expected_etags([probe])[probe]:
                raise SystemExit(f"check-in probe: {r.status_code} {r.headers.get('etag')} {r.text[:200]}")

            accounted = Procs(
                {
                    "replica1": psutil.Process(replicas[0].pid),
                    "replica2": psutil.Process(replicas[1].pid),
                    "haproxy": psutil.Process(proxy.pid),
                }
            )
            sampler = (PG_ADMIN, a.db_name)
            rate = a.devices / POLL_S
            say(
                f"\nthe fleet's rate: {a.devices:,} devices polling every 15 min = {rate:,.1f} check-ins/s; replaying "
                f"a {a.duration:g} s sample of the period (open loop, latency from each device's moment)"
            )
            results: dict[str, Any] = {}
            sched = fleet_schedule(a.devices, a.duration, rng)
            for name, port in (("fleet rate, 2 replicas via HAProxy", lb), ("fleet rate, replica 1 via HAProxy", lb1)):
                jobs = [Job(port, max(1, a.connections // a.generators), schedule=s) for s in
                        split_schedule(sched, a.generators)]  # fmt: skip
                results[name] = res = drive(jobs, accounted, sampler)
                say(_row(name, res), flush=True)
                say(f"{'':34s} database connections (peak): {res['db_connections_peak']}", flush=True)

            pool = rng.sample(range(a.devices), min(a.pool, a.devices))
            bare_port = free_port()
            bare = None
            say(f"\nceilings: closed loop, {a.connections} keep-alive connections, {a.cap_seconds:g} s each")
            for rnd in range(a.cap_repeats):
                for name, port, kind in (
                    ("ceiling, 2 replicas via HAProxy", lb, "edgefleet"),
                    ("ceiling, replica 1 via HAProxy", lb1, "edgefleet"),
                    ("ceiling, replica 1 direct", p1, "edgefleet"),
                    ("ceiling, bare endpoint (checkin.py)", bare_port, "bare"),
                ):
                    if kind == "bare" and bare is None:
                        code = BARE_APP + (
                            f"\nimport uvicorn\nuvicorn.run(app, host='127.0.0.1', port={bare_port}, "
                            "log_level='warning', access_log=False)\n"
                        )
                        bare = subprocess.Popen([sys.executable, "-c", code, str(a.devices)], stdin=subprocess.DEVNULL)
                        procs.append(bare)
                        wait_until(lambda: _listening(bare_port), 300, "the bare endpoint", bare)
                        accounted.named["bare"] = psutil.Process(bare.pid)
                    per = max(1, a.connections // a.generators)
                    # the bare endpoint knows the same N ids (as d{i}, with its own tokens): the same pool
                    jobs = [Job(port, per, kind=kind, pool=pool, seconds=a.cap_seconds) for _ in range(a.generators)]
                    res = drive(jobs, accounted, sampler)
                    say(_row(f"{name} #{rnd + 1}", res), flush=True)
                    best = results.get(name)
                    if best is None or res["rate_per_s"] > best["rate_per_s"]:
                        results[name] = res

            rss = {}
            for i, p in enumerate(replicas, 1):
                mb = psutil.Process(p.pid).memory_info().rss / 2**20
                rss[f"replica{i}"] = {
                    "rss_mb": round(mb),
                    "rss_mb_per_100k_devices": round(mb * 100_000 / a.devices, 1),
                }
            cap2 = results["ceiling, 2 replicas via HAProxy"]["rate_per_s"]
            cap1 = results["ceiling, replica 1 via HAProxy"]["rate_per_s"]
            direct = results["ceiling, replica 1 direct"]["rate_per_s"]
            bare_rate = results["ceiling, bare endpoint (checkin.py)"]["rate_per_s"]
            fleet2 = results["fleet rate, 2 replicas via HAProxy"]
            summary.update(
                {
                    "fleet_rate_target_per_s": round(rate, 1),
                    "sample_s": a.duration,
                    "results": results,
                    "rss": rss,
                    "ratios": {
                        "ceiling_2_vs_1_replica_via_haproxy": round(cap2 / cap1, 2),
                        "ceiling_1_replica_direct_vs_bare": round(direct / bare_rate, 2),
                        "ceiling_2_replicas_via_haproxy_vs_bare": round(cap2 / bare_rate, 2),
                        "fleet_rate_achieved_vs_target_2_replicas": round(fleet2["rate_per_s"] / rate, 3),
                    },
                    "total_s": round(time.perf_counter() - started, 1),
                }
            )
            say(f"\nreplica RSS after the runs: {rss}")
            say(
                f"ratios: 2 replicas / 1 replica (both via HAProxy) {cap2 / cap1:.2f}; replica direct / bare "
                f"{direct / bare_rate:.2f}; 2 replicas via HAProxy / bare {cap2 / bare_rate:.2f}"
            )
            say(
                f"on this {os.cpu_count()}-core machine every process above shares the cores: the ceilings are bounded "
                "by the CPU the load generator and HAProxy take from the replicas (see cores used per run)"
            )
            stop(procs)
            procs.clear()
    finally:
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)
    summary["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary, indent=2))


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
