"""Telemetry rollups and retention (docs/adr/0042): the KPIs read from rollups equal the ones computed from every
raw window, a retried report is counted once, concurrent reports lose no count, the prune deletes raw rows (never
the audit log) while the KPIs still read right, one replica prunes per interval, the upgrade rolls up windows
stored before it, and ``/api/v1/fleet`` costs the same queries for 10 devices as for 200."""

from __future__ import annotations

import secrets
import threading
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from sqlalchemy import func, insert, select

from _cp_support import CP, build_pkg, sql_statements
from edgefleet.config import ServerSettings
from edgefleet.controlplane import kpi, rollups
from edgefleet.controlplane.credentials import hash_secret
from edgefleet.controlplane.db import (
    AuditEntry,
    Database,
    Device,
    ReportBatch,
    Rollout,
    RolloutDevice,
    TelemetryRollup,
    TelemetryRow,
    UpdateEventRow,
    utcnow,
)
from edgefleet.controlplane.reports import store_report
from edgefleet.controlplane.retention import PRUNE_JOB, Retention, acquire_lease, prune, prune_once
from edgefleet.protocol import Report
from edgefleet.telemetry.drift import DriftReference, fleet_psi
from edgefleet.telemetry.sketch import LatencySketch, SketchData

DAY = 86_400.0


def _device(s: Any, tier: str, i: int | str) -> Device:
    d = Device(id=f"dev-{tier}-{i}", tier=tier, credential_hash=hash_secret(secrets.token_hex(16)))
    s.add(d)
    s.flush()
    return d


def _report(
    rng: np.random.Generator,
    *,
    version: str,
    crashes: int = 0,
    windows: int = 1,
    drift: list[dict[str, Any]] | None = None,
    batch_id: str | None = None,
    window_ids: list[str] | None = None,
    events: list[dict[str, Any]] | None = None,
) -> Report:
    now = utcnow()
    tel = []
    for i in range(windows):
        sk = LatencySketch()
        sk.extend(rng.lognormal(np.log(0.004), 0.4, int(rng.integers(5, 60))).tolist())
        tel.append(
            {
                "window_id": window_ids[i] if window_ids else secrets.token_hex(6),
                "start": now - timedelta(seconds=60),
                "end": now,
                "model": "digits",
                "version": version,
                "requests": int(sk.count),
                "errors": {"error": int(rng.integers(0, 3))},
                "latency": sk.to_data(),
                "worker_crashes": crashes,
                "drift": drift or [],
            }
        )
    return Report(
        batch_id=batch_id or secrets.token_hex(8),
        state="committed",
        served={"model": "digits", "version": version},
        telemetry=tel,
        events=events or [],
    )


def _raw_kpis(s: Any, since: datetime) -> dict[str, Any]:
    """What the KPIs were before rollups: every raw window since ``since`` read and merged in Python."""
    sketches: dict[tuple[str, str, str], LatencySketch] = defaultdict(LatencySketch)
    reqs: dict[tuple[str, str, str], int] = defaultdict(int)
    errs: dict[tuple[str, str, str], int] = defaultdict(int)
    reporting, crashed = set(), set()
    for w in s.scalars(select(TelemetryRow).where(TelemetryRow.received_at >= since)):
        key = (w.model or "-", w.version or "-", w.tier)
        if w.latency and w.latency.get("count"):
            sketches[key].merge(LatencySketch.from_data(SketchData.model_validate(w.latency)))
        reqs[key] += w.requests
        errs[key] += w.errors
        reporting.add(w.device_id)
        if w.worker_crashes:
            crashed.add(w.device_id)
    return {
        "latency": [
            {
                "model": m,
                "version": v,
                "tier": t,
                "p95_ms": None if (q := sketches[(m, v, t)].quantile(0.95)) is None else round(q * 1000, 3),
                "requests": reqs[(m, v, t)],
                "error_rate": round(errs[(m, v, t)] / reqs[(m, v, t)], 5) if reqs[(m, v, t)] else None,
            }
            for (m, v, t) in sorted(reqs)
        ],
        "crash_free_rate": round(1 - len(crashed) / len(reporting), 5) if reporting else None,
    }


@pytest.fixture
def db(db_url: str) -> Any:
    d = Database(db_url)
    d.migrate()
    yield d
    d.dispose()


def test_kpis_from_rollups_equal_the_ones_from_every_raw_window(db: Database) -> None:
    rng = np.random.default_rng(7)
    with db.session() as s:
        for tier in ("rpi4", "jetson"):
            for i in range(12):
                d = _device(s, tier, i)
                for _ in range(3):
                    version = "1.0.0" if i % 3 else "2.0.0"
                    store_report(s, d, _report(rng, version=version, crashes=int(i == 5), windows=2))
    with db.session() as s:
        got = kpi.fleet_kpis(s, overdue_after_s=60)
        want = _raw_kpis(s, utcnow() - timedelta(days=1))
        assert got["latency"] == want["latency"] and len(got["latency"]) == 4
        assert got["crash_free_rate"] == want["crash_free_rate"] == round(1 - 2 / 24, 5)
        # a rollup row per bucket × version × tier × stripe, never per device
        assert (s.scalar(select(func.count()).select_from(TelemetryRollup)) or 0) <= 2 * 2 * rollups.STRIPES * 2


def test_drift_is_scored_on_rolled_up_counts(db: Database) -> None:
    ref = DriftReference.model_validate(
        {
            "features": [
                {
                    "name": "out.class",
                    "kind": "categorical",
                    "categories": [0, 1],
                    "counts": [50.0, 30.0, 20.0],
                    "n": 100,
                }
            ]
        }
    )
    from edgefleet.controlplane.db import ModelVersion

    with db.session() as s:
        s.add(
            ModelVersion(
                model="digits",
                version="1.0.0",
                target="t",
                package_sha256="0" * 64,
                model_sha256="0" * 64,
                drift_reference=ref.model_dump(mode="json"),
            )
        )
        rng = np.random.default_rng(1)
        for i in range(6):
            d = _device(s, "rpi4", i)
            drift = [
                {"feature": "out.class", "psi": 0.0, "n": 100, "counts": [10.0, 30.0, 60.0]},
                # another package's bins: left out, never guessed into place
                {"feature": "out.class", "psi": 0.0, "n": 5, "counts": [5.0, 0.0]},
            ]
            store_report(s, d, _report(rng, version="1.0.0", drift=drift))
    with db.session() as s:
        rows = kpi.fleet_kpis(s, overdue_after_s=60)["drift"]
    want = fleet_psi(ref, {"out.class": [60.0, 180.0, 360.0]})["out.class"]
    assert want is not None
    assert rows == [
        {
            "model": "digits",
            "version": "1.0.0",
            "feature": "out.class",
            "psi": round(want, 4),
            "n": 600,
            "status": "alert",
        }
    ]


def test_a_retried_report_and_a_resent_window_are_counted_once(db: Database) -> None:
    rng = np.random.default_rng(3)
    with db.session() as s:
        d = _device(s, "rpi4", 0)
        r = _report(rng, version="1.0.0", window_ids=["w1"], batch_id="b1")
        assert store_report(s, d, r) is True
        assert store_report(s, d, r) is False  # the same batch again
        again = _report(rng, version="1.0.0", window_ids=["w1"], batch_id="b2")  # the window in another batch
        store_report(s, d, again)
    with db.session() as s:
        (lat,) = kpi.fleet_kpis(s, overdue_after_s=60)["latency"]
        assert lat["requests"] == r.telemetry[0].requests
        assert s.scalar(select(func.sum(TelemetryRollup.windows))) == 1


def test_concurrent_reports_lose_no_count(db: Database) -> None:
    """Reports of one version and tier from many devices at once (one row lock per stripe): every window counted,
    every sketch merged, no deadlock."""
    with db.session() as s:
        ids = [_device(s, "rpi4", i).id for i in range(8)]
    errors: list[BaseException] = []
    sent = [0] * len(ids)

    def run(k: int) -> None:
        rng = np.random.default_rng(k)
        try:
            for _ in range(6):
                with db.session() as s:
                    d = s.get(Device, ids[k])
                    assert d is not None
                    r = _report(rng, version="1.0.0", windows=2)
                    store_report(s, d, r)
                sent[k] += sum(w.requests for w in r.telemetry)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    with db.session() as s:
        (lat,) = kpi.fleet_kpis(s, overdue_after_s=60)["latency"]
        assert lat["requests"] == sum(sent)
        assert lat == _raw_kpis(s, utcnow() - timedelta(days=1))["latency"][0]
        assert s.scalar(select(func.sum(TelemetryRollup.windows))) == 8 * 6 * 2


def test_prune_deletes_raw_rows_past_retention_and_kpis_still_read_from_rollups(db: Database) -> None:
    rng = np.random.default_rng(5)
    now = utcnow()
    old = now - timedelta(days=20)
    with db.session() as s:
        d = _device(s, "rpi4", 0)
        ev = [{"event_id": "e-old", "at": old, "kind": "committed", "model": "digits", "version": "1.0.0"}]
        store_report(s, d, _report(rng, version="1.0.0", events=ev), now=old)
        store_report(s, d, _report(rng, version="2.0.0"), now=now)
        s.add(AuditEntry(actor="t", action="test.old", at=old))
    with db.session() as s:
        month = kpi.fleet_kpis(s, overdue_after_s=60, window_s=30 * DAY)
        day = kpi.fleet_kpis(s, overdue_after_s=60)
    deleted = prune(db, Retention(14 * DAY, 14 * DAY, 400 * DAY), now=now)
    assert deleted == {"telemetry": 1, "report_batches": 1, "update_events": 1, "telemetry_rollups": 0}
    with db.session() as s:
        assert list(s.scalars(select(TelemetryRow.version))) == ["2.0.0"]
        assert s.scalar(select(func.count()).select_from(ReportBatch)) == 1
        assert s.scalar(select(func.count()).select_from(UpdateEventRow)) == 0
        assert s.scalar(select(func.count()).select_from(AuditEntry).where(AuditEntry.action == "test.old")) == 1
        # the 20-day-old window is gone from the raw table, not from the figures
        assert kpi.fleet_kpis(s, overdue_after_s=60, window_s=30 * DAY)["latency"] == month["latency"]
        assert [x["version"] for x in month["latency"]] == ["1.0.0", "2.0.0"]
        assert kpi.fleet_kpis(s, overdue_after_s=60)["latency"] == day["latency"]
    # rollups go after their own, longer retention
    assert prune(db, Retention(14 * DAY, 14 * DAY, 10 * DAY), now=now)["telemetry_rollups"] >= 1
    with db.session() as s:
        assert [x["version"] for x in kpi.fleet_kpis(s, overdue_after_s=60, window_s=30 * DAY)["latency"]] == ["2.0.0"]


def test_one_replica_prunes_per_interval(db: Database) -> None:
    keep = Retention(14 * DAY, 14 * DAY, 400 * DAY)
    now = utcnow()
    with db.session() as s:
        assert acquire_lease(s, PRUNE_JOB, "a", now=now, every_s=3600) is True
    with db.session() as s:
        assert acquire_lease(s, PRUNE_JOB, "b", now=now, every_s=3600) is False  # a holds it
    # a died holding the lease: b takes it once it lapses
    with db.session() as s:
        assert acquire_lease(s, PRUNE_JOB, "b", now=now + timedelta(hours=1), every_s=3600) is True
    later = now + timedelta(hours=2)
    assert prune_once(db, keep, "b", every_s=3600, now=later) is not None
    # ran: nobody runs it again before the interval is over, whoever asks
    assert prune_once(db, keep, "a", every_s=3600, now=later + timedelta(minutes=5)) is None
    assert prune_once(db, keep, "b", every_s=3600, now=later + timedelta(minutes=5)) is None
    assert prune_once(db, keep, "a", every_s=3600, now=later + timedelta(hours=1)) is not None


def test_a_retention_shorter_than_a_day_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"shorter than 86400 s .* outlive the longest bake"):
        ServerSettings(telemetry_retention_s=3600)
    with pytest.raises(ValidationError, match="shorter than"):
        ServerSettings(events_retention_s=0)
    assert ServerSettings().telemetry_retention_s == 14 * DAY


def test_the_upgrade_rolls_up_windows_stored_before_it(db_url: str) -> None:
    from edgefleet.controlplane.migrations import upgrade

    d = Database(db_url)
    try:
        upgrade(d.engine, "0007")
        rng = np.random.default_rng(9)
        r = _report(rng, version="1.0.0", crashes=1)
        w = r.telemetry[0]
        with d.engine.begin() as c:
            c.exec_driver_sql(
                "INSERT INTO devices (id, tier, credential_hash, hardware, runtime, runtime_version, agent_version,"
                " public_key, enrolled_at, dropped_records, invalid_reports, changed_at) VALUES"
                " ('d1', 'rpi4', 'h', '{}', 'onnxruntime', '', '', '', '2026-01-01', 0, 0, '2026-01-01')"
            )
        with d.engine.begin() as c:
            c.execute(
                insert(TelemetryRow).values(
                    device_id="d1",
                    window_id="w1",
                    start=w.start,
                    end=w.end,
                    model="digits",
                    version="1.0.0",
                    tier="rpi4",
                    requests=w.requests,
                    errors=3,
                    worker_crashes=1,
                    worker_restarts=0,
                    latency=w.latency.model_dump(mode="json"),
                    drift=[],
                    received_at=utcnow(),
                )
            )
        d.migrate()
        with d.session() as s:
            k = kpi.fleet_kpis(s, overdue_after_s=60)
            assert k["latency"] == _raw_kpis(s, utcnow() - timedelta(days=1))["latency"]
            assert k["latency"][0]["requests"] == w.requests and k["crash_free_rate"] == 0.0
    finally:
        d.dispose()


def _fleet(cp: CP, n: int, rng: np.random.Generator) -> None:
    """``n`` devices over two tiers and two versions, each with telemetry and an update event, all moved by one
    rollout (half of them reverted, back on the version they had: restored)."""
    with cp.store.db.session() as s:
        r = Rollout(id=f"r{n}", model="digits", version="2.0.0")
        s.add(r)
        s.flush()
        for i in range(n):
            d = _device(s, ("rpi4", "jetson")[i % 2], f"{n}-{i}")
            version = ("1.0.0", "2.0.0")[i % 2]
            ev = [{"event_id": f"e{i}", "at": utcnow(), "kind": "committed", "model": "digits", "version": version}]
            store_report(s, d, _report(rng, version=version, crashes=int(i % 7 == 0), events=ev))
            s.add(RolloutDevice(rollout_id=r.id, device_id=d.id, wave=0, previous_version="1.0.0", reverted=i % 2 == 0))


def test_fleet_costs_the_same_queries_for_10_devices_as_for_200(cp: CP, mlp_path: Path, tmp_path: Path) -> None:
    cp.upload(build_pkg(mlp_path, tmp_path / "p", "1.0.0", reference_calls=200))
    rng = np.random.default_rng(11)
    counts = []
    for n in (10, 190):  # 10 devices, then 200
        _fleet(cp, n, rng)
        with sql_statements(cp) as statements:
            k = cp.api("GET", "/api/v1/fleet")
        counts.append(len([x for x in statements if not x.lstrip().upper().startswith(("SAVEPOINT", "RELEASE"))]))
        assert k["devices"]["total"] == n + (10 if n == 190 else 0)
    assert counts[0] == counts[1], counts
    assert k["rollouts"][-1]["devices_moved"] == 190 and k["rollouts"][-1]["devices_restored"] == 95


def test_the_server_loop_prunes(db: Database, db_url: str) -> None:
    """``loops.prune_loop`` as the server runs it: a window past retention disappears, the lease records the run."""
    import asyncio

    from edgefleet.controlplane import loops
    from edgefleet.controlplane.db import JobLease
    from edgefleet.controlplane.store import Store

    rng = np.random.default_rng(13)
    with db.session() as s:
        store_report(s, _device(s, "rpi4", 0), _report(rng, version="1.0.0"), now=utcnow() - timedelta(days=20))
    store = Store(ServerSettings(db=db_url, prune_interval_s=0.05), db, None)  # type: ignore[arg-type]  # no repo

    async def run() -> None:
        task = asyncio.create_task(loops.prune_loop(store))
        try:
            for _ in range(600):  # a generous deadline; returns as soon as the prune ran
                with db.session() as s:
                    lease = s.get(JobLease, PRUNE_JOB)
                    if lease is not None and lease.last_run_at is not None:
                        assert lease.last_result["telemetry"] == 1
                        return
                await asyncio.sleep(0.05)
            raise AssertionError("the prune loop never ran")
        finally:
            task.cancel()

    asyncio.run(run())
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(TelemetryRow)) == 0
