"""The scale-out benchmarks (benchmarks/fleet_scale.py, nudge_latency.py, fleet_kpis.py) run end to end at a tiny
scale: each prints its figures side by side and cleans up the database it created. The figures themselves are
docs/scaling.md's, measured at full scale; here only that every path runs and answers sensibly."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from _cp_support import pg_reachable

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(script: str, *args: str, timeout: float = 120) -> tuple[dict[str, Any], str]:
    """Run a benchmark; its summary is the JSON object printed last."""
    r = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    start = r.stdout.rindex("\n{\n") + 1 if "\n{\n" in r.stdout else r.stdout.index("{")
    return json.loads(r.stdout[start:]), r.stdout


def _databases() -> set[str]:
    import psycopg

    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test") as c:
        return {row[0] for row in c.execute("SELECT datname FROM pg_database")}


def _need_pg() -> None:
    if why := pg_reachable():
        pytest.skip(why)


def _db_name(what: str) -> str:
    return f"edgefleet_bench_{what}_t{os.getpid()}"


@pytest.mark.postgres
def test_fleet_scale_drives_two_replicas_behind_haproxy_and_drops_its_database() -> None:
    _need_pg()
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (`make system-deps` installs Debian's)")
    name = _db_name("scale")
    out, _ = _run(
        "fleet_scale.py",
        *("--devices", "300", "--duration", "2", "--cap-seconds", "0.5", "--cap-repeats", "1", "--pool", "300"),
        *("--connections", "8", "--db-name", name, "--json"),
    )
    res = out["results"]
    assert set(res) == {
        "fleet rate, 2 replicas via HAProxy",
        "fleet rate, replica 1 via HAProxy",
        "ceiling, 2 replicas via HAProxy",
        "ceiling, replica 1 via HAProxy",
        "ceiling, replica 1 direct",
        "ceiling, bare endpoint (checkin.py)",
    }
    for r in res.values():
        # every device holds its current ETag: real credentials accepted, answered from memory as unchanged
        assert r["errors"] == 0 and set(r["statuses"]) == {"304"} and r["requests"] > 0, r
    both = res["fleet rate, 2 replicas via HAProxy"]
    # 300 devices polling every 15 minutes: a 2-second sample holds one check-in; the replicas' pools show up
    assert both["requests"] == 1
    assert {"efbench-replica1", "efbench-replica2"} <= set(both["db_connections_peak"])
    assert out["rss"]["replica1"]["rss_mb"] > 0 and out["ratios"]["ceiling_2_vs_1_replica_via_haproxy"] > 0
    assert name not in _databases()


def _broker_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 1883), timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.process
def test_nudge_latency_times_a_rollback_with_and_without_nudges() -> None:
    if not _broker_up():
        pytest.skip("no MQTT broker at 127.0.0.1:1883")
    out, text = _run(
        "nudge_latency.py",
        *("--agents", "60", "--processes", "1", "--connections", "4", "--off-seconds", "1", "--backend", "sqlite"),
    )
    on, off = out["runs"]["nudges on"], out["runs"]["nudges off"]
    assert on["rollback_state"] == off["rollback_state"] == "rolled_back"
    assert on["knew"] == on["agents"] == 60 and on["all_s"] is not None and on["first_nudge_s"] is not None
    assert on["checkins"]["errors"] == 0 and on["checkins"]["nudges"] >= 1
    # without nudges a device learns at its next poll: almost none within a second of a 15-minute period
    assert off["first_nudge_s"] is None and off["fraction_knew"] < 0.5
    assert 0 < out["without_nudges_expected"]["fraction_by_watched_s"] < 0.01
    assert "analytic, not waited for" in text


@pytest.mark.postgres
def test_fleet_kpis_compares_the_code_before_rollups_on_postgresql() -> None:
    _need_pg()
    name = _db_name("kpi")
    out, _ = _run("fleet_kpis.py", "--devices", "60", "--windows", "6", "--requests", "1", "--db-name", name)
    assert out["backend"] == "postgresql" and out["raw_windows"] == 360 and out["rollup_rows"] > 0
    assert out["same_figures"] is True
    assert out["prune"]["deleted"]["telemetry"] == 0  # a day of windows is inside the default retention
    assert name not in _databases()


def test_the_expected_time_without_nudges_follows_the_jittered_poll() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import nudge_latency as nl
    finally:
        sys.path.remove(str(BENCH))
    assert nl.residual_cdf(0, 900) == 0 and nl.residual_cdf(450, 900) == pytest.approx(0.5)
    assert nl.residual_cdf(1080, 900) == pytest.approx(1.0) and nl.residual_cdf(5000, 900) == pytest.approx(1.0)
    assert nl.residual_cdf(900, 900) == pytest.approx((720 + 135) / 900)  # 135 = ∫₇₂₀⁹⁰⁰ (1080 − s)/360 ds
    one = nl.expected_all_s(1, 900)
    assert one == pytest.approx(nl.expected_all_s(1, 900, steps=100_000), rel=1e-3)
    assert 450 < one < 500  # one device: E[residual] = E[X²] / 2E[X] = (900² + 360²/12) / 1800 ≈ 456
    assert 1000 < nl.expected_all_s(10_000, 900) < 1080
