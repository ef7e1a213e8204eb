"""KPI cost: ``GET /api/v1/fleet`` with a day of telemetry from N devices, before and after rollups — same database,
same data, same app, one run, figures side by side.

* before: the KPI code as it was before rollups (``src/edgefleet/controlplane/kpi.py`` at commit ``BEFORE``, read
  with ``git show``): every raw window of the last 24 h read and its sketch merged in Python, a query per device a
  rollout moved. It is swapped into the running app for its half of the requests. Answer fields that code did not
  have yet are answered empty, so the response validates; they are not compared.
* after: the KPI code of this checkout, reading the 5-minute rollups (docs/adr/0042).
* after the retention prune: ``retention.prune`` with the server's default retention, then the same requests.

The raw windows are written straight into the database — ``COPY`` on PostgreSQL (the default: a database of its
own, ``edgefleet_bench_kpi``, created and dropped by the run; the tests' ``test`` database is not touched), batched
inserts on SQLite (``--backend sqlite``) — storing them one report at a time would measure report ingestion. The
rollups and the devices' latest window times are then built from them by ``rollups.backfill``, the code the
upgrade to revision 0008 runs. Each window carries one of a few dozen pre-built latency sketches.

    .venv/bin/python benchmarks/fleet_kpis.py [--devices 100000] [--windows 1440] [--requests 5] [--backend postgresql]

The defaults are the target: 100,000 devices with the agent's default window a minute (1,440 a day), 144 million
raw rows — an estimated 100 GB of sketches, more than this machine's disk. ``--windows`` (windows per device over the
day) scales it down; the output says what ran.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

BEFORE = "7410de7"
ROOT = Path(__file__).resolve().parent.parent


def old_kpi_module() -> types.ModuleType:
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{BEFORE}:src/edgefleet/controlplane/kpi.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    mod = types.ModuleType("kpi_before_rollups")
    exec(compile(src, "kpi_before_rollups.py", "exec"), mod.__dict__)
    return mod


def seed(db_url: str, devices: int, windows: int, rng: np.random.Generator) -> dict[str, Any]:
    from sqlalchemy import insert

    from edgefleet.controlplane import rollups
    from edgefleet.controlplane.db import Database, Device, Rollout, RolloutDevice, TelemetryRow, utcnow
    from edgefleet.telemetry.sketch import LatencySketch

    db = Database(db_url)
    db.migrate()
    now = utcnow()
    sketches = []
    for _ in range(32):
        sk = LatencySketch()
        sk.extend(rng.lognormal(np.log(0.004), 0.5, int(rng.integers(20, 200))).tolist())
        sketches.append(sk.to_data().model_dump(mode="json"))
    tiers = ("rpi4", "jetson", "x86")
    versions = ("1.0.0", "2.0.0")
    t0 = time.perf_counter()
    with db.session() as s:
        s.execute(
            insert(Device),
            [
                {
                    "id": f"d{i:06d}",
                    "tier": tiers[i % len(tiers)],
                    "credential_hash": f"{i:064x}",
                    "hardware": {},
                    "runtime": "onnxruntime",
                    "runtime_version": "1.32.0",
                    "agent_version": "bench",
                    "public_key": "",
                    "dropped_records": 0,
                    "invalid_reports": 0,
                    "enrolled_at": now - timedelta(days=2),
                    "changed_at": now,
                    "last_seen": now,
                    "served_model": "digits",
                    "served_version": versions[i % 2],
                }
                for i in range(devices)
            ],
        )
        s.add(Rollout(id="r1", model="digits", version="2.0.0"))
        s.flush()
        s.execute(
            insert(RolloutDevice),
            [{"rollout_id": "r1", "device_id": f"d{i:06d}", "wave": 0, "moved_at": now} for i in range(1, devices, 2)],
        )
    # spread over the last 23 hours: inside the 24-hour period for both reads however long the run takes (the
    # rollups read whole 5-minute buckets, so a window within 5 minutes of the period's start would count for one
    # and not the other)
    step = 82_800.0 / windows
    rows = 0
    if db.is_sqlite:
        with db.session() as s:
            batch: list[dict[str, Any]] = []
            for row in _windows(devices, windows, step, now, sketches, tiers, versions, rng):
                batch.append(row)
                if len(batch) >= 20_000:
                    s.execute(insert(TelemetryRow), batch)
                    rows += len(batch)
                    batch = []
            if batch:
                s.execute(insert(TelemetryRow), batch)
                rows += len(batch)
    else:
        rows = _copy_windows(db, _windows(devices, windows, step, now, sketches, tiers, versions, rng))
    seeded_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    with db.engine.begin() as conn:
        rollups.backfill(conn)
    rolled_s = time.perf_counter() - t1
    from sqlalchemy import func, select

    from edgefleet.controlplane.db import TelemetryRollup

    with db.session() as s:
        n_rollups = s.scalar(select(func.count()).select_from(TelemetryRollup))
    db.dispose()
    return {"raw_windows": rows, "rollup_rows": n_rollups, "seed_s": round(seeded_s, 1), "rollup_s": round(rolled_s, 1)}


_COLUMNS = (
    "device_id", "window_id", "start", "end", "model", "version", "tier", "requests", "errors", "worker_crashes",
    "worker_restarts", "latency", "drift", "received_at",
)  # fmt: skip


def _windows(
    devices: int,
    windows: int,
    step: float,
    now: Any,
    sketches: list[dict[str, Any]],
    tiers: tuple[str, ...],
    versions: tuple[str, ...],
    rng: np.random.Generator,
) -> Any:
    """Every device's windows over the day, as telemetry rows (one of the pre-built sketches each)."""
    for i in range(devices):
        offsets = rng.uniform(0, step / 2, windows)
        picks = rng.integers(len(sketches), size=windows)
        errs = rng.random(windows) < 0.05
        crashes = rng.random(windows) < 0.001
        for k in range(windows):
            at = now - timedelta(seconds=82_800.0 - k * step - float(offsets[k]))
            sk = sketches[int(picks[k])]
            yield {
                "device_id": f"d{i:06d}",
                "window_id": f"w{k}",
                "start": at - timedelta(seconds=60),
                "end": at,
                "model": "digits",
                "version": versions[i % 2],
                "tier": tiers[i % len(tiers)],
                "requests": int(sk["count"]),
                "errors": int(errs[k]),
                "worker_crashes": int(crashes[k]),
                "worker_restarts": 0,
                "latency": sk,
                "drift": [],
                "received_at": at,
            }


def _copy_windows(db: Any, rows: Any) -> int:
    """PostgreSQL's COPY of the rows (text format: none of the values holds a tab, a newline or a backslash)."""
    import io

    conn = db.engine.raw_connection()
    n = 0
    dumped: dict[int, str] = {}  # a sketch's JSON, dumped once
    try:
        cur = conn.cursor()
        cols = ", ".join(f'"{c}"' for c in _COLUMNS)  # quoted: "start" and "end" are keywords
        with cur.copy(f"COPY telemetry ({cols}) FROM STDIN") as cp:
            buf = io.StringIO()
            for r in rows:
                lat = dumped.get(id(r["latency"]))
                if lat is None:
                    lat = dumped[id(r["latency"])] = json.dumps(r["latency"], separators=(",", ":"))
                buf.write(
                    f"{r['device_id']}\t{r['window_id']}\t{r['start'].isoformat()}\t{r['end'].isoformat()}\t"
                    f"{r['model']}\t{r['version']}\t{r['tier']}\t{r['requests']}\t{r['errors']}\t"
                    f"{r['worker_crashes']}\t{r['worker_restarts']}\t{lat}\t[]\t{r['received_at'].isoformat()}\n"
                )
                n += 1
                if n % 50_000 == 0:
                    cp.write(buf.getvalue())
                    buf = io.StringIO()
            cp.write(buf.getvalue())
        conn.commit()
        cur.execute("ANALYZE telemetry")
        conn.commit()
    finally:
        conn.close()
    return n


def measure(client: Any, engine: Any, token: str, n: int, *, warmup: bool = True) -> dict[str, Any]:
    """``n`` timed requests, after one untimed that warms caches (``warmup``)."""
    from sqlalchemy import event

    statements: list[str] = []

    def count(*_a: Any) -> None:
        statements.append("x")

    times = []
    body: dict[str, Any] = {}
    for i in range(n + 1 if warmup else n):
        statements.clear()
        event.listen(engine, "before_cursor_execute", count)
        t = time.perf_counter()
        r = client.get("/api/v1/fleet", headers={"Authorization": f"Bearer {token}"})
        dt = time.perf_counter() - t
        event.remove(engine, "before_cursor_execute", count)
        assert r.status_code == 200, r.text
        body = r.json()
        if i or not warmup:
            times.append(dt * 1000)
    return {
        "p50_ms": round(statistics.median(times), 1),
        "max_ms": round(max(times), 1),
        "queries": len(statements),
        "latency_rows": [(x["version"], x["tier"], x["requests"], x["p95_ms"]) for x in body["latency"]],
        "crash_free_rate": body["crash_free_rate"],
        "body": body,
    }


@contextlib.contextmanager
def database(a: argparse.Namespace, tmp: Path) -> Iterator[str]:
    """The database of the run: ``--db``, a SQLite file, or a PostgreSQL database created and dropped around it."""
    if a.db:
        yield a.db
    elif a.backend == "sqlite":
        yield f"sqlite:///{tmp / 'cp.db'}"
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from fleet_scale import bench_database

        with bench_database(a.db_name) as url:
            yield url


def as_before(old_fleet_kpis: Any, shape: dict[str, Any]) -> Any:
    """The code before rollups, answering the fields it did not have yet empty (shaped as ``shape`` has them), so
    the response model accepts it; only the fields it had are compared."""

    def fleet_kpis(s: Any, **kw: Any) -> dict[str, Any]:
        out = dict(old_fleet_kpis(s, **kw))
        for k, v in shape.items():
            if k not in out:
                out[k] = [] if isinstance(v, list) else {} if isinstance(v, dict) else None
        return dict(out)

    return fleet_kpis


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=100_000, help="devices reporting [100000]")
    ap.add_argument("--windows", type=int, default=1440, help="windows per device over the day [1440: one a minute]")
    ap.add_argument("--requests", type=int, default=5, help="timed requests after rollups, and after the prune [5]")
    ap.add_argument("--before-requests", type=int, default=1, help="timed requests of the code before rollups [1]")
    ap.add_argument("--backend", choices=("postgresql", "sqlite"), default="postgresql", help="[postgresql]")
    ap.add_argument("--db-name", default="edgefleet_bench_kpi", help="PostgreSQL database created and dropped")
    ap.add_argument("--db", default=None, help="SQLAlchemy URL of an empty database instead (left as it is after)")
    a = ap.parse_args()
    if min(a.devices, a.windows, a.requests, a.before_requests) < 1:
        ap.error("--devices, --windows, --requests and --before-requests must be at least 1")
    old = old_kpi_module()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, database(a, Path(tmp)) as db_url:
        backend = db_url.split(":")[0].split("+")[0]
        print(f"seeding {a.devices} devices × {a.windows} windows over 24 h into {backend} ...", flush=True)
        info = seed(db_url, a.devices, a.windows, np.random.default_rng(0))
        print(f"seeded {info['raw_windows']} raw windows in {info['seed_s']} s; rollups built in {info['rollup_s']} s")

        with warnings.catch_warnings():  # starlette's notice about its httpx-based client, not about this run
            warnings.simplefilter("ignore")
            from fastapi.testclient import TestClient

        from edgefleet.config import ServerSettings
        from edgefleet.controlplane import kpi, retention
        from edgefleet.controlplane.app import create_app

        settings = ServerSettings(db=db_url, repo=Path(tmp) / "repo", overdue_after_s=3600)
        app = create_app(settings)
        token = (Path(tmp) / "admin-token").read_text().strip()
        db = app.state.context.store.db
        client = TestClient(app)  # no lifespan: no background loop runs during the measurement
        after = measure(client, db.engine, token, a.requests)
        print(f"after rollups:  median {after['p50_ms']} ms", flush=True)
        new = kpi.fleet_kpis
        kpi.fleet_kpis = as_before(old.fleet_kpis, after["body"])  # the route calls kpi.fleet_kpis
        try:
            # no untimed request first: its seconds would dwarf whatever a warm cache saves
            before = measure(client, db.engine, token, a.before_requests, warmup=False)
        finally:
            kpi.fleet_kpis = new
        print(f"before rollups: median {before['p50_ms']} ms", flush=True)
        t = time.perf_counter()
        keep = retention.Retention(
            settings.telemetry_retention_s, settings.events_retention_s, settings.rollup_retention_s
        )
        deleted = retention.prune(db, keep)
        prune_s = time.perf_counter() - t
        pruned = measure(client, db.engine, token, a.requests)
        print(f"after the prune ({prune_s:.1f} s, deleted {deleted}): median {pruned['p50_ms']} ms", flush=True)
        db.dispose()

    def same(x: dict[str, Any]) -> bool:
        return x["latency_rows"] == after["latency_rows"] and x["crash_free_rate"] == after["crash_free_rate"]

    print()
    print(
        f"GET /api/v1/fleet, {a.devices} devices, {info['raw_windows']} raw windows, {info['rollup_rows']} rollup rows"
        f" ({backend})"
    )
    print(f"{'':26s} {'before rollups':>16s} {'after rollups':>16s} {'after the prune':>16s}")
    for label, k in (("median latency (ms)", "p50_ms"), ("slowest (ms)", "max_ms"), ("SQL statements", "queries")):
        print(f"{label:26s} {before[k]:>16} {after[k]:>16} {pruned[k]:>16}")
    print(f"{'same figures':26s} {same(before)!s:>16s} {'':>16s} {same(pruned)!s:>16s}")
    print(
        json.dumps(
            {
                "devices": a.devices,
                "windows_per_device": a.windows,
                "requests": a.requests,
                "before_requests": a.before_requests,
                "backend": backend,
                "cpus": os.cpu_count(),
                "date": datetime.now(UTC).isoformat(),
                **info,
                "before": {k: v for k, v in before.items() if k not in ("latency_rows", "body")},
                "after": {k: v for k, v in after.items() if k not in ("latency_rows", "body")},
                "after_prune": {k: v for k, v in pruned.items() if k not in ("latency_rows", "body")},
                "prune": {"seconds": round(prune_s, 2), "deleted": deleted},
                "speedup": round(before["p50_ms"] / after["p50_ms"], 1) if after["p50_ms"] else None,
                # the code before rollups reads every raw window of the day: its time grows with them, while the
                # rollups read at most versions × tiers × 288 buckets × stripes rows whatever the windows
                "before_ms_per_raw_window": round(before["p50_ms"] / info["raw_windows"], 4),
                "before_extrapolated_to_1440_windows_per_device_ms": round(
                    before["p50_ms"] / info["raw_windows"] * a.devices * 1440
                ),
                "same_figures": same(before),
                "before_is": f"src/edgefleet/controlplane/kpi.py at {BEFORE}",
                "total_s": round(time.perf_counter() - started, 1),
            },
            indent=2,
        )
    )
    if not same(before):
        print("latency rows differ:", before["latency_rows"], after["latency_rows"], file=sys.stderr)


if __name__ == "__main__":
    main()
