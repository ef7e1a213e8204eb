"""The control plane's own health at ``/metrics``, which deploy/prometheus/ alerts on: check-ins counted under the
status each was answered with (answered, refused, failed: an error rate needs all three), and the reconciler's
rounds (when one last succeeded, how long each took, the interval it runs at).

The faults are real: wrong and foreign credentials, a revoked device, and a database whose tables are renamed
away under the running server (SQLite answers "no such table", the driver's OperationalError)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from _cp_support import CP
from conftest import starts_processes
from edgefleet import errors as e
from edgefleet.controlplane import loops
from edgefleet.controlplane.errors import STATUS
from edgefleet.controlplane.metrics import CHECKIN_ANSWERS, ServerMetrics, checkin_answer
from edgefleet.sim.server import ServerProcess

DEADLINE_S = 60.0


@pytest.fixture
@starts_processes
def cp(tmp_path: Path) -> Iterator[CP]:
    c = CP(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}")
    yield c
    c.close()


def _scrape(text_: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text_)
        for s in fam.samples
    }


def _checkins(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    return {dict(labels)["answer"]: v for (name, labels), v in samples.items() if name == "edgefleet_checkins_total"}


def _get(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return samples[(name, ())]


def _own_sample(metric: MetricWrapperBase, name: str) -> float:
    return next(s.value for m in metric.collect() for s in m.samples if s.name == name)


@contextlib.contextmanager
def _table_away(cp: CP, table: str) -> Iterator[None]:
    """The table renamed away while the block runs: every query on it fails as against a broken database."""
    with cp.store.db.engine.begin() as c:
        c.execute(text(f"ALTER TABLE {table} RENAME TO {table}_away"))
    try:
        yield
    finally:
        with cp.store.db.engine.begin() as c:
            c.execute(text(f"ALTER TABLE {table}_away RENAME TO {table}"))


# ------------------------------------------------------------------------------------------------ check-ins


def test_every_error_the_app_answers_is_counted_under_its_status() -> None:
    for family, code in STATUS:
        assert checkin_answer(family("x")) == str(code), family
    assert checkin_answer(sa_exc.OperationalError("SELECT 1", {}, Exception("connection refused"))) == "503"
    assert checkin_answer(sa_exc.TimeoutError("pool exhausted")) == "503"
    assert checkin_answer(RuntimeError("a bug")) == "500"
    # what the check-in route can raise is among the answers exported from the start
    for err in (e.AuthError("x"), e.ForbiddenError("x"), RuntimeError("x")):
        assert checkin_answer(err) in CHECKIN_ANSWERS


def test_an_unforeseen_answer_gets_its_own_series(cp: CP) -> None:
    metrics: ServerMetrics = cp.app.state.context.metrics
    metrics.checkin_failed(e.NotFoundError("no such device"))
    counted = _checkins(_scrape(metrics.render().decode()))
    assert counted["404"] == 1.0


def test_checkins_are_counted_under_the_status_they_were_answered_with(cp: CP) -> None:
    # every answer is exported from the start, at 0: rate() sees the first refusal
    assert _checkins(_scrape(cp.http.get("/metrics", headers=cp.h()).text)) == {a: 0.0 for a in CHECKIN_ANSWERS}
    d, other = cp.device("rpi4"), cp.device("rpi4")
    url = f"/api/v1/devices/{d.id}/desired"
    own = {"Authorization": f"Bearer {d.credential}"}
    d.desired()  # 200
    etag = d.etag
    assert etag is not None
    for _ in range(3):
        assert cp.http.get(url, headers={**own, "If-None-Match": etag}).status_code == 304
    assert cp.http.get(url, headers={"Authorization": f"Bearer {secrets.token_hex(16)}"}).status_code == 401
    assert cp.http.get(url).status_code == 401  # no credential at all
    assert cp.http.get(url, headers={"Authorization": f"Bearer {other.credential}"}).status_code == 403
    cp.api("POST", f"/api/v1/devices/{d.id}/revoke")
    assert cp.http.get(url, headers={**own, "If-None-Match": etag}).status_code == 401
    # a device this replica does not hold in memory needs the database, which is gone: 503, counted as such
    with _table_away(cp, "devices"):
        stranger = {"Authorization": f"Bearer {secrets.token_hex(16)}"}
        r = cp.http.get(f"/api/v1/devices/{secrets.token_hex(8)}/desired", headers=stranger)
        assert r.status_code == 503, r.text
    counted = _checkins(_scrape(cp.http.get("/metrics", headers=cp.h()).text))
    assert counted == {"200": 1.0, "304": 3.0, "401": 3.0, "403": 1.0, "500": 0.0, "503": 1.0}


# ------------------------------------------------------------------------------------------------ reconciler


def test_the_reconciler_gauges_move_with_rounds_that_succeed_and_not_with_ones_that_fail(cp: CP) -> None:
    metrics: ServerMetrics = cp.app.state.context.metrics
    first = _scrape(cp.http.get("/metrics", headers=cp.h()).text)
    assert _get(first, "edgefleet_reconciler_last_success_timestamp_seconds") == 0.0  # no round yet
    assert _get(first, "edgefleet_reconciler_round_seconds_count") == 0.0
    assert _get(first, "edgefleet_reconciler_interval_seconds") == cp.settings.reconcile_interval_s

    # read from the metric objects: a whole scrape would query the rollouts table this test takes away
    def last_success() -> float:
        return _own_sample(metrics.reconcile_last_success, "edgefleet_reconciler_last_success_timestamp_seconds")

    def rounds() -> float:
        return _own_sample(metrics.reconcile_rounds, "edgefleet_reconciler_round_seconds_count")

    async def until(what: str, cond: Callable[[], bool]) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not cond():
            assert time.monotonic() < deadline, f"no {what} within {DEADLINE_S:.0f} s"
            await asyncio.sleep(0.02)

    async def drive() -> tuple[float, float, float]:
        # the loop the app's lifespan runs, on this test's event loop; wake() stands in for a report arriving
        cp.store.bind_loop()
        task = asyncio.create_task(loops.reconcile_loop(cp.store, metrics))
        try:
            before = time.time()
            cp.store.wake()
            await until("successful round", lambda: last_success() > 0)
            ok_at, n = last_success(), rounds()
            assert before <= ok_at <= time.time()
            with _table_away(cp, "rollouts"):
                cp.store.wake()
                await until("failed round", lambda: rounds() > n)
                assert last_success() == ok_at  # a failed round is timed, but is no success
            cp.store.wake()
            await until("successful round after the repair", lambda: last_success() > ok_at)
            return before, ok_at, last_success()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            cp.store._wake = None  # the loop this event belonged to is gone

    before, ok_at, again = asyncio.run(drive())
    assert before <= ok_at < again
    last = _scrape(cp.http.get("/metrics", headers=cp.h()).text)
    assert _get(last, "edgefleet_reconciler_last_success_timestamp_seconds") == again
    assert _get(last, "edgefleet_reconciler_round_seconds_count") >= 3


@pytest.mark.process
def test_a_running_server_exports_its_reconcilers_last_success(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server", reconcile_interval_s=0.5)
    started = time.time()
    url = server.start()
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            r = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {server.admin_token}"}, timeout=10)
            assert r.status_code == 200, r.text
            samples = _scrape(r.text)
            if _get(samples, "edgefleet_reconciler_last_success_timestamp_seconds") > 0:
                break
            assert time.monotonic() < deadline, f"no reconciler round within {DEADLINE_S:.0f} s"
            time.sleep(0.1)
        assert started <= _get(samples, "edgefleet_reconciler_last_success_timestamp_seconds") <= time.time()
        assert _get(samples, "edgefleet_reconciler_interval_seconds") == 0.5
        assert _get(samples, "edgefleet_reconciler_round_seconds_count") >= 1
        # the alert falls back on the process's start time before a first success: it must be exported
        assert _get(samples, "process_start_time_seconds") > 0
    finally:
        server.stop()
