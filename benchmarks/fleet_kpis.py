"""KPI cost: ``GET /api/v1/fleet`` with a day of telemetry from N devices, before and after rollups — same database,
same data, same app, one run, figures side by side.

* before: the KPI code as it was before rollups (``src/edgefleet/controlplane/kpi.py`` at commit ``BEFORE``, read
  with ``git show``): every raw window of the last 24 h read and its sketch merged in Python, a query per device a
  rollout moved. It is swapped into the running app for its half of the requests.
* after: the KPI code of this checkout, reading the 5-minute rollups (docs/adr/0042).

The raw windows are written straight into the database (storing them one report at a time would measure report
ingestion); the rollups and the devices' latest window times are then built from them by ``rollups.backfill``, the
code the upgrade to revision 0008 runs. Each window carries one of a few dozen pre-built latency sketches.

    .venv/bin/python benchmarks/fleet_kpis.py [--devices 2000] [--windows 48] [--requests 5] [--db URL]

The issue's figure is 100,000 devices with a window a minute (1,440 a day): 144 million rows, beyond a laptop's
SQLite; ``--devices`` and ``--windows`` (windows per device per day) scale it down, and the output says what ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from datetime import timedelta
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
    with db.session() as s:
        batch: list[dict[str, Any]] = []
        for i in range(devices):
            for k in range(windows):
                at = now - timedelta(seconds=82_800.0 - k * step - float(rng.uniform(0, step / 2)))
                sk = sketches[int(rng.integers(len(sketches)))]
                batch.append(
                    {
                        "device_id": f"d{i:06d}",
                        "window_id": f"w{k}",
                        "start": at - timedelta(seconds=60),
                        "end": at,
                        "model": "digits",
                        "version": versions[i % 2],
                        "tier": tiers[i % len(tiers)],
                        "requests": int(sk["count"]),
                        "errors": int(rng.random() < 0.05),
                        "worker_crashes": int(rng.random() < 0.001),
                        "worker_restarts": 0,
                        "latency": sk,
                        "drift": [],
                        "received_at": at,
                    }
                )
                if len(batch) >= 20_000:
                    s.execute(insert(TelemetryRow), batch)
                    rows += len(batch)
                    batch = []
        if batch:
            s.execute(insert(TelemetryRow), batch)
            rows += len(batch)
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


def measure(client: Any, engine: Any, token: str, n: int) -> dict[str, Any]:
    from sqlalchemy import event

    statements: list[str] = []

    def count(*_a: Any) -> None:
        statements.append("x")

    times = []
    body: dict[str, Any] = {}
    for i in range(n + 1):
        statements.clear()
        event.listen(engine, "before_cursor_execute", count)
        t = time.perf_counter()
        r = client.get("/api/v1/fleet", headers={"Authorization": f"Bearer {token}"})
        dt = time.perf_counter() - t
        event.remove(engine, "before_cursor_execute", count)
        assert r.status_code == 200, r.text
        body = r.json()
        if i:  # the first request warms caches and is left out
            times.append(dt * 1000)
    return {
        "p50_ms": round(statistics.median(times), 1),
        "max_ms": round(max(times), 1),
        "queries": len(statements),
        "latency_rows": [(x["version"], x["tier"], x["requests"], x["p95_ms"]) for x in body["latency"]],
        "crash_free_rate": body["crash_free_rate"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--windows", type=int, default=48, help="windows per device over the day")
    ap.add_argument("--requests", type=int, default=5, help="timed requests each way")
    ap.add_argument("--db", default=None, help="SQLAlchemy URL of an empty database [a temporary SQLite file]")
    a = ap.parse_args()
    old = old_kpi_module()
    with tempfile.TemporaryDirectory() as tmp:
        db_url = a.db or f"sqlite:///{Path(tmp) / 'cp.db'}"
        print(
            f"seeding {a.devices} devices × {a.windows} windows over 24 h into {db_url.split('://')[0]} ...", flush=True
        )
        info = seed(db_url, a.devices, a.windows, np.random.default_rng(0))
        print(f"seeded {info['raw_windows']} raw windows in {info['seed_s']} s; rollups built in {info['rollup_s']} s")

        with warnings.catch_warnings():  # starlette's notice about its httpx-based client, not about this run
            warnings.simplefilter("ignore")
            from fastapi.testclient import TestClient

        from edgefleet.config import ServerSettings
        from edgefleet.controlplane import kpi
        from edgefleet.controlplane.app import create_app

        app = create_app(ServerSettings(db=db_url, repo=Path(tmp) / "repo", overdue_after_s=3600))
        token = (Path(tmp) / "admin-token").read_text().strip()
        engine = app.state.context.store.db.engine
        client = TestClient(app)  # no lifespan: no background loop runs during the measurement
        after = measure(client, engine, token, a.requests)
        new = kpi.fleet_kpis
        kpi.fleet_kpis = old.fleet_kpis  # the route calls kpi.fleet_kpis: it now runs the code before rollups
        try:
            before = measure(client, engine, token, a.requests)
        finally:
            kpi.fleet_kpis = new
        app.state.context.store.db.dispose()

    same = before["latency_rows"] == after["latency_rows"] and before["crash_free_rate"] == after["crash_free_rate"]
    print()
    print(
        f"GET /api/v1/fleet, {a.devices} devices, {info['raw_windows']} raw windows, {info['rollup_rows']} rollup rows"
    )
    print(f"{'':26s} {'before rollups':>16s} {'after rollups':>16s}")
    print(f"{'median latency (ms)':26s} {before['p50_ms']:>16} {after['p50_ms']:>16}")
    print(f"{'slowest (ms)':26s} {before['max_ms']:>16} {after['max_ms']:>16}")
    print(f"{'SQL statements':26s} {before['queries']:>16} {after['queries']:>16}")
    print(f"{'same figures':26s} {'':>16s} {same!s:>16s}")
    print(
        json.dumps(
            {
                "devices": a.devices,
                "windows_per_device": a.windows,
                "requests": a.requests,
                "backend": (a.db or "sqlite").split(":")[0],
                "cpus": os.cpu_count(),
                **info,
                "before": {k: v for k, v in before.items() if k != "latency_rows"},
                "after": {k: v for k, v in after.items() if k != "latency_rows"},
                "speedup": round(before["p50_ms"] / after["p50_ms"], 1) if after["p50_ms"] else None,
                "same_figures": same,
                "before_is": f"src/edgefleet/controlplane/kpi.py at {BEFORE}",
            },
            indent=2,
        )
    )
    if not same:
        print("latency rows differ:", before["latency_rows"], after["latency_rows"], file=sys.stderr)


if __name__ == "__main__":
    main()
