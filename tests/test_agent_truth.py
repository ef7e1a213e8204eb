"""The device agent reports the truth: drift leaves the device in every window (from a real worker process, over
its control socket and its own HTTP serving, and from the in-process backend); deaths in probation are recorded
as a rollback with its refusal and event; a failure that may be transient is retried a bounded number of times,
counted across restarts; a download never writes past the signed length; a cancelled update is one ``cancelled``
event; a batch the control plane refuses (413, 422) is dropped and counted; each update step is logged.

Real objects throughout: the worker process; the REAL control plane and its TUF repository
(``tests/_fleet_support.py``), behind a faulty edge that flips a byte of a download, sends targets slowly or
turns reports away, as a bad link or an overloaded server would; what it stored is read from its database. The
agent runs as ``edgefleet agent`` (over HTTP on loopback), or in this process (for ``caplog`` and its state) with
the control plane's app behind the same edge as its transport. The misbehaving downloads have their own real
HTTP server, as no control plane would misbehave that way.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import threading
import time
import timeit
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from _fleet_support import (
    AgentProc,
    Fleet,
    buffered,
    committed_version,
    install,
    make_packages,
    running,
    settings,
    state_of,
    until,
)
from conftest import free_port, starts_processes
from edgefleet import __version__
from edgefleet.agent.backend import InProcessBackend
from edgefleet.agent.buffer import TelemetryBuffer
from edgefleet.agent.metrics import AgentMetrics
from edgefleet.agent.pipeline import MAX_UPDATE_ATTEMPTS
from edgefleet.agent.state import Pending, PersistedState, SlotInfo, recover, refusal_key
from edgefleet.agent.supervisor import Supervisor
from edgefleet.agent.updater import MAX_RESTARTS, download_resumable, should_update
from edgefleet.agent.worker.driftcount import DriftCounter
from edgefleet.agent.worker.spec import WorkerSpec
from edgefleet.errors import VerificationError
from edgefleet.protocol import AgentState, DesiredState, Report
from edgefleet.telemetry.drift import DriftAccumulator, build_reference

FAST: dict[str, Any] = {"probation_seconds": 0.2, "probation_requests": 1000}
FAILURES = ("refused", "rolled_back", "health_check_failed")


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory: pytest.TempPathFactory, mlp_path: Path, digits: Any) -> dict[str, Path]:
    return make_packages(mlp_path, digits.x_test, tmp_path_factory.mktemp("pkgs"), ["1.0.0", "2.0.0", "3.0.0"])


@pytest.fixture
@starts_processes
def cp(tmp_path: Path, pkgs: dict[str, Path]) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "cp")
    f.publish(*pkgs.values())
    yield f
    f.close()


IN_PROCESS = "http://control-plane.test"  # never resolved: an in-process agent's transport is the app itself


def _x(digits: Any) -> np.ndarray:
    return np.asarray(digits.x_test, dtype=np.float32)


def _events(cp: Fleet, version: str | None = None) -> list[tuple[str, str | None, str | None]]:
    """(kind, version, reason) of the update events the control plane stored (of ``version``)."""
    return [e for e in cp.events() if version is None or e[1] == version]


def _kinds(cp: Fleet, version: str | None = None) -> list[str]:
    return [k for k, _, _ in _events(cp, version)]


def _target_stat(cp: Fleet, key: str, version: str) -> int:
    """Target GETs (``gets``) or bytes (``bytes``) of ``version`` that crossed the edge."""
    counts = cp.faults.gets if key == "gets" else cp.faults.bytes
    return sum(v for k, v in counts.items() if k.endswith(f"digits-{version}.efpkg"))


def _in_process(cp: Fleet, data: Path, **kw: Any) -> Any:
    """Settings of an agent in this process that enrolls with ``cp`` through its transport."""
    return settings(data, IN_PROCESS, cp.enrollment_token(), **kw)


async def _enrolled(a: Any) -> None:
    """The in-process agent ``a`` has its identity: the control plane knows the device, and can pin it."""
    await until(lambda: a.identity.get("device_id"), what="enrollment")


async def _admin(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """An operator's call (over loopback HTTP) off the agent's event loop, which goes on checking in meanwhile."""
    return await asyncio.to_thread(fn, *args, **kw)


def _device(cp: Fleet, tmp_path: Path) -> AgentProc:
    """``edgefleet agent`` that enrolls with ``cp`` over HTTP once started."""
    return AgentProc(cp.url, cp.enrollment_token(), tmp_path / "dev", free_port())


# ---------------------------------------------------------------- 1. drift leaves the device


def test_drift_counter_counts_what_the_accumulator_counts_at_a_fraction_of_the_cost(
    mlp_path: Path, digits: Any
) -> None:
    from edgefleet.runtime import load_model

    model = load_model(mlp_path)
    x = _x(digits)
    calls = [({"X": x[i : i + 1]}, model.run({"X": x[i : i + 1]})) for i in range(200)]
    ref = build_reference(calls)
    edges = next(f for f in ref.features if f.name == "in.X[10]").edges
    rng = np.random.default_rng(7)
    live = []
    for i in range(300):
        xi = x[i : i + 1] + rng.normal(0, 2, (1, 64)).astype(np.float32)  # drifted live traffic
        if i % 5 == 0:
            xi[0, 10] = edges[i % len(edges)]  # exactly on an edge: the bin to its right
        if i % 7 == 0:
            xi[0, 3] = np.nan
        live.append(({"X": xi}, model.run({"X": xi})))
    live.append(({"X": x[:3]}, model.run({"X": x[:3]})))  # a batch of 3: its statistics, no per-element features
    for extreme in (np.inf, -np.inf, 3.4e38):  # infinite values, and the largest float32
        xi = x[:1].copy()
        xi[0, 5] = extreme
        live.append(({"X": xi}, model.run({"X": xi})))
    slow, fast = DriftAccumulator(ref), DriftCounter(ref)
    with np.errstate(all="ignore"):  # numpy's overflow warnings, raised as errors under pytest
        for feeds, outputs in live:
            slow.add(feeds, outputs)
            fast.add(feeds, outputs)
    assert fast.skipped == 0
    assert [s.model_dump() for s in fast.summaries()] == [s.model_dump() for s in slow.summaries()]

    feeds, outputs = calls[0]

    def per_call(acc: Any) -> float:
        return min(timeit.repeat(lambda: acc.add(feeds, outputs), number=100, repeat=5)) / 100

    assert per_call(fast) * 4 < per_call(slow)


@pytest.mark.process
def test_worker_process_drift_over_its_control_socket_resets_per_window(pkgs: dict[str, Path], digits: Any) -> None:
    x = _x(digits)

    async def go() -> tuple[Any, ...]:
        sup = Supervisor(WorkerSpec(pkgs["1.0.0"]))
        await sup.start()
        try:
            served = [(x[i : i + 1], (await sup.infer({"X": x[i : i + 1]}, None))[0]) for i in range(7)]
            first = await sup.drift()
            empty = await sup.drift()
            for i in range(3):
                await sup.infer({"X": x[i : i + 1]}, None)
            third = await sup.drift()
        finally:
            await sup.stop()
        return served, first, empty, third

    served, first, empty, third = asyncio.run(go())
    from edgefleet.package import open_package

    reference = open_package(pkgs["1.0.0"]).reference
    assert reference is not None
    here = DriftAccumulator(reference)
    for xi, outputs in served:
        here.add({"X": xi}, outputs)
    # Only histograms come out of the worker, and they are the ones these inputs give.
    assert [s.model_dump() for s in first] == [s.model_dump() for s in here.summaries()]
    assert len(first) == len(reference.features) and all(s.n == 7 for s in first)
    assert empty == []  # reset with each window
    assert len(third) == len(reference.features) and all(s.n == 3 for s in third)


def test_a_real_agent_reports_drift_in_every_window(cp: Fleet, tmp_path: Path, digits: Any) -> None:
    """The worker serves HTTP itself (ADR 0032): drift is counted there, after each answer."""
    agent = _device(cp, tmp_path)
    agent.start()
    n = 12
    try:
        agent.wait_until(lambda: cp.device_ids(), what="enrollment")
        cp.pin("1.0.0", **FAST)
        agent.wait_until(lambda: agent.serving() == "1.0.0", what="v1 serving")
        x = _x(digits)
        with httpx.Client() as client:
            for i in range(n):
                body = {"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": x[i].tolist()}]}
                client.post(f"{agent.url}/v2/models/digits/infer", json=body).raise_for_status()
        agent.wait_until(
            lambda: sum(w["requests"] for w in cp.windows()) == n and len(cp.windows()) >= 4,
            what="the windows of those requests (as the control plane stored them)",
        )
    finally:
        agent.stop()
    windows = cp.windows()
    assert sum(w["requests"] for w in windows) == n
    for w in windows:
        drift = {d["feature"]: d for d in w["drift"]}
        if not w["requests"]:
            assert drift == {}
            continue
        assert len(drift) == 70  # 4 statistics and 64 pixels of X, the label and the arg-max class
        for d in drift.values():
            assert d["n"] == w["requests"] and sum(d["counts"]) == d["n"]


def test_in_process_backend_windows_carry_drift(tmp_path: Path, pkgs: dict[str, Path], digits: Any) -> None:
    data = tmp_path / "dev"
    install(data, pkgs["1.0.0"])
    x = _x(digits)
    n = 5

    async def go() -> None:
        async with running(settings(data, telemetry_interval_s=0.2), backend_factory=InProcessBackend) as a:
            # Through the agent's own OIP app (ASGI), as an embedding application would call it.
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=a.app), base_url="http://agent") as client:
                for i in range(n):
                    body = {"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": x[i].tolist()}]}
                    (await client.post("/v2/models/digits/infer", json=body)).raise_for_status()
            await until(
                lambda: sum(w["requests"] for w in buffered(data, "window")) == n and len(buffered(data, "window")) > 2,
                what="windows",
            )

    asyncio.run(go())
    windows = buffered(data, "window")
    assert sum(w["requests"] for w in windows) == n
    for w in windows:
        assert len(w["drift"]) == (70 if w["requests"] else 0)
        assert all(d["n"] == w["requests"] for d in w["drift"])


# ---------------------------------------------------------------- 2. deaths in probation


def test_recover_after_repeated_deaths_in_probation_records_the_refusal() -> None:
    v1 = SlotInfo(slot="A", model="m", version="1", target="m-1.efpkg")
    v2 = SlotInfo(slot="B", model="m", version="2", target="m-2.efpkg", rollout_id="r2")
    pending = Pending(model="m", version="2", target="m-2.efpkg", rollout_id="r2", slot="B")
    s = PersistedState(state=AgentState.probation, committed=v1, active=v2, pending=pending)
    for _ in range(3):
        s = recover(s)
    assert s.state is AgentState.rolled_back and s.active == v1 and s.pending is None
    assert "restarted repeatedly during probation" in (s.reason or "")
    assert refusal_key("r2", "m-2.efpkg") in s.refused
    desired = DesiredState(device_id="d", model="m", version="2", target="m-2.efpkg", rollout_id="r2")
    assert not should_update(s, desired, busy=False)  # the same version is not installed again


def test_agent_deaths_in_probation_roll_back_with_refusal_and_event(cp: Fleet, tmp_path: Path) -> None:
    agent = _device(cp, tmp_path)
    agent.start()
    try:
        agent.wait_until(lambda: cp.device_ids(), what="enrollment")
        cp.pin("1.0.0", **FAST)
        agent.wait_until(lambda: committed_version(agent.data_dir) == "1.0.0", what="v1 committed")
        r2 = cp.rollout("2.0.0", probation_seconds=600, probation_requests=10**6)
        for resumes in (0, 1, 2):

            def in_probation(r: int = resumes) -> bool:
                s = state_of(agent.data_dir)
                return s.get("state") == "probation" and s.get("probation_resumes") == r and agent.serving() == "2.0.0"

            agent.wait_until(in_probation, what=f"v2 in probation, resumed {resumes} times")
            agent.kill()  # a death in probation
            agent.start()
        agent.wait_until(lambda: state_of(agent.data_dir).get("state") == "rolled_back", what="the rollback")
        agent.wait_until(lambda: agent.serving() == "1.0.0", what="v1 back")
        agent.wait_until(lambda: "rolled_back" in _kinds(cp, "2.0.0"), what="the event")
        # Still asked for, now with a probation it would pass (no reconcile runs: the rollout has not judged the
        # rollback): it must not come back.
        cp.configure_group(**FAST)
        desired = cp.record()["desired_state"]
        assert (desired["version"], desired["rollout_id"]) == ("2.0.0", r2), desired
        time.sleep(1.5)
        assert agent.serving() == "1.0.0"
    finally:
        agent.stop()
    s = state_of(agent.data_dir)
    assert s["state"] == "rolled_back" and refusal_key(r2, "digits-2.0.0.efpkg") in s["refused"]
    events = _events(cp, "2.0.0")
    failures = [e for e in events if e[0] in FAILURES]
    assert len(failures) == 1 and failures[0][0] == "rolled_back"
    assert "restarted repeatedly during probation" in (failures[0][2] or "")
    assert _kinds(cp, "2.0.0").count("download_started") == 1


# ---------------------------------------------------------------- 3. bounded retries, counted across restarts


def _corrupt_target(cp: Fleet, version: str) -> None:
    """The repository's copy altered after signing, on the control plane's disk: every download of it fails."""
    target = next((cp.settings.repo / "targets").glob(f"*.digits-{version}.efpkg"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))


def test_one_corrupted_download_is_retried_and_every_step_logged(
    cp: Fleet, tmp_path: Path, pkgs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgefleet.agent")
    cp.faults.corrupt = 1  # a byte flipped on the link in the next target download
    data = tmp_path / "dev"

    async def go() -> None:
        async with running(_in_process(cp, data), transport=cp.transport(), backend_factory=InProcessBackend) as a:
            await _enrolled(a)
            await _admin(cp.pin, "1.0.0", **FAST)
            await until(lambda: committed_version(data) == "1.0.0", what="v1 committed")
            await until(lambda: "committed" in _kinds(cp), what="the report")

    asyncio.run(go())
    kinds = _kinds(cp, "1.0.0")
    assert kinds.count("download_started") == 2
    assert not [k for k in kinds if k in FAILURES]
    assert cp.faults.corrupt == 0 and _target_stat(cp, "gets", "1.0.0") == 2
    reports = cp.faults.reports
    assert reports and all(r.sent_at for r in reports)  # the agent's clock at send, on every report
    size = pkgs["1.0.0"].stat().st_size
    t = "digits-1.0.0.efpkg"
    for step in (
        f"downloading {t}: {size} bytes",
        f"update to {t} failed (attempt 1 of {MAX_UPDATE_ATTEMPTS})",
        "does not match the signed metadata",
        f"downloaded {t}: {size} bytes",
        f"verified {t}",
        f"staged {t} in slot A",
        f"health check of {t} passed",
        f"switched to {t}; probation",
        f"committed {t}",
    ):
        assert step in caplog.text, step


def test_hash_mismatch_is_retried_a_bounded_number_of_times_across_a_restart(cp: Fleet, tmp_path: Path) -> None:
    _corrupt_target(cp, "1.0.0")
    data = tmp_path / "dev"
    rollout: list[str] = []

    async def first() -> None:
        async with running(_in_process(cp, data), transport=cp.transport(), backend_factory=InProcessBackend) as a:
            await _enrolled(a)
            # A slow check-in (and so a slow retry) first: the second attempt must not start before this agent
            # stops.
            rollout.append(await _admin(cp.rollout, "1.0.0", checkin_interval_s=5.0))
            await until(lambda: (state_of(data).get("pending") or {}).get("failures") == 1, what="attempt 1 failed")

    asyncio.run(first())
    s = state_of(data)
    assert s["pending"]["failures"] == 1 and s["state"] == "idle" and "attempt 1 of" in s["reason"]
    assert _target_stat(cp, "gets", "1.0.0") == 1
    cp.configure_group()  # the fast loops again; the same rollout is still desired

    async def second() -> None:
        # the same device (its identity is on disk): the token is not used again
        async with running(_in_process(cp, data), transport=cp.transport(), backend_factory=InProcessBackend):
            await until(lambda: state_of(data).get("state") == "rolled_back", what="the refusal")
            await until(lambda: "refused" in _kinds(cp), what="the report")
            await asyncio.sleep(1.0)  # check-ins go on: no fourth attempt

    asyncio.run(second())
    assert len(cp.device_ids()) == 1
    s = state_of(data)
    assert f"attempt {MAX_UPDATE_ATTEMPTS} of {MAX_UPDATE_ATTEMPTS}" in s["reason"]
    assert refusal_key(rollout[0], "digits-1.0.0.efpkg") in s["refused"]
    assert _target_stat(cp, "gets", "1.0.0") == MAX_UPDATE_ATTEMPTS  # the count survived the restart
    assert [k for k in _kinds(cp) if k in FAILURES] == ["refused"]


def test_metadata_expired_by_a_skewed_clock_is_retried_not_refused(cp: Fleet, tmp_path: Path) -> None:
    """The device's clock is ahead of the repository's (here: the control plane's timestamp is signed to have
    expired an hour ago, which is what such a device sees); then the two agree again."""
    from edgefleet.repository import Repository

    repo = cp.settings.repo  # the control plane's own repository, on its disk
    Repository(repo).resign("timestamp", expires=datetime.now(UTC) - timedelta(hours=1))
    data = tmp_path / "dev"

    async def go() -> None:
        async with running(_in_process(cp, data), transport=cp.transport(), backend_factory=InProcessBackend) as a:
            await _enrolled(a)
            await _admin(cp.pin, "1.0.0", checkin_interval_s=0.5, **FAST)
            await until(lambda: (state_of(data).get("pending") or {}).get("failures") == 1, what="attempt 1 failed")
            assert "expired" in state_of(data)["reason"]
            await _admin(Repository(repo).resign, "timestamp")  # the clock (here: the repository) is right again
            await until(lambda: committed_version(data) == "1.0.0", what="v1 committed")

    asyncio.run(go())
    assert not state_of(data)["refused"]
    assert not [k for k in _kinds(cp) if k in FAILURES]


# ---------------------------------------------------------------- 4. downloads bounded by the signed length


class _Misbehaving(http.server.BaseHTTPRequestHandler):
    """``endless``: 200 and bytes until the client hangs up; ``announce``: a Content-Length over the signed one;
    ``416``: every request answered 416."""

    protocol_version = "HTTP/1.0"
    mode = "endless"
    gets = 0
    sent = 0

    def do_GET(self) -> None:
        cls = type(self)
        cls.gets += 1
        if cls.mode == "416":
            self.send_response(416)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        if cls.mode == "announce":
            self.send_header("Content-Length", "5000")
        self.end_headers()
        try:
            while cls.mode == "endless" or cls.sent < 5000:
                self.wfile.write(b"x" * 4096)
                cls.sent += 4096
        except OSError:
            return  # the client hung up

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def misbehaving() -> Iterator[str]:
    _Misbehaving.gets = _Misbehaving.sent = 0
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Misbehaving)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/pkg"
    srv.shutdown()
    srv.server_close()


async def _download(url: str, partial: Path, length: int) -> Path:
    async with httpx.AsyncClient() as client:
        return await asyncio.wait_for(download_resumable(client, url, partial, length=length, backoff_s=0.01), 30)


@pytest.mark.parametrize("mode", ["endless", "announce"])
def test_download_stops_at_the_signed_length(misbehaving: str, tmp_path: Path, mode: str) -> None:
    _Misbehaving.mode = mode
    partial = tmp_path / "pkg.partial"
    with pytest.raises(VerificationError, match="signed length"):
        asyncio.run(_download(misbehaving, partial, 1000))
    assert _Misbehaving.gets == 1
    assert not partial.exists()  # nothing of it kept, and nothing past 1,000 bytes ever written


def test_download_starts_over_a_bounded_number_of_times(misbehaving: str, tmp_path: Path) -> None:
    _Misbehaving.mode = "416"
    partial = tmp_path / "pkg.partial"
    partial.write_bytes(b"y" * 500)  # a partial download to resume: the server keeps refusing the range
    with pytest.raises(VerificationError, match="start over"):
        asyncio.run(_download(misbehaving, partial, 1000))
    assert _Misbehaving.gets == MAX_RESTARTS + 1


# ---------------------------------------------------------------- 5. cancelled is not failed


def test_desired_state_changed_during_the_download_is_one_cancelled_event(cp: Fleet, tmp_path: Path) -> None:
    data = tmp_path / "dev"

    async def go() -> None:
        async with running(_in_process(cp, data), transport=cp.transport(), backend_factory=InProcessBackend) as a:
            await _enrolled(a)
            await _admin(cp.pin, "1.0.0", **FAST)
            await until(lambda: committed_version(data) == "1.0.0", what="v1 committed")
            # v2 comes slowly (9 s for its ~70 KB, until lifted): the desired state moves on to v3 while it downloads.
            cp.faults.throttle = 0.5
            await _admin(cp.rollout, "2.0.0", **FAST)
            await until(lambda: _target_stat(cp, "bytes", "2.0.0") > 0, what="v2 downloading")
            await _admin(cp.rollout, "3.0.0", **FAST)
            # Slow until the agent has heard of v3 (its transport hands it v2's bytes only once all are sent).
            await until(lambda: a.desired is not None and a.desired.version == "3.0.0", what="v3 desired")
            cp.faults.throttle = 0.0
            await until(lambda: committed_version(data) == "3.0.0", what="v3 committed")
            await until(lambda: "committed" in _kinds(cp, "3.0.0"), what="the report")

    asyncio.run(go())
    assert _kinds(cp, "2.0.0") == ["download_started", "cancelled"]
    assert "changed during the download" in (_events(cp, "2.0.0")[-1][2] or "")
    assert not [k for k in _kinds(cp) if k in FAILURES]
    s = state_of(data)
    assert s["refused"] == [] and s["state"] == "committed"


# ---------------------------------------------------------------- 7. reports the server refuses, metrics


class _Sent(httpx.AsyncBaseTransport):
    """Keeps the body of every report the agent sends (by batch id), the ones the edge turns away too, before
    passing it on."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.reports: dict[str, dict[str, Any]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.endswith("/report"):
            body = json.loads(await request.aread())
            self.reports[body["batch_id"]] = body
        return await self.inner.handle_async_request(request)


def _metric(text: str, name: str) -> Any:
    return next(f for f in text_string_to_metric_families(text) if f.name == name)


def test_refused_batches_are_dropped_and_counted(cp: Fleet, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "dev"
    # The first two reports are turned away, as too large (413) and invalid (422), before the app sees them.
    cp.faults.reject_reports = [413, 422]
    cp.configure_group(checkin_interval_s=0.1, telemetry_interval_s=0.05)  # windows to report, quickly
    sent = _Sent(cp.transport())

    def accepted() -> list[Report]:
        return cp.faults.reports  # the reports that reached the control plane

    async def go() -> str:
        async with running(_in_process(cp, data), transport=sent) as a:
            await until(lambda: len(accepted()) >= 2, what="accepted reports after the refused ones")
            return a.service.metrics.render().decode()

    metrics = asyncio.run(go())
    assert [r["status"] for r in cp.faults.rejected] == [413, 422] and not cp.faults.reject_reports
    rejected = [sent.reports[r["batch_id"]] for r in cp.faults.rejected]
    lost = sum(len(r["telemetry"]) + len(r["events"]) for r in rejected)
    assert lost >= 2
    resent = {r["batch_id"] for r in rejected} & {a.batch_id for a in accepted()}
    assert not resent  # never sent again
    assert accepted()[-1].dropped_records == lost
    assert cp.record()["dropped_records"] == lost  # as the control plane stored it
    assert all(a.sent_at for a in accepted())
    dropped = _metric(metrics, "edgefleet_agent_telemetry_dropped_records")
    assert dropped.type == "counter" and dropped.samples[0].value == lost
    assert caplog.text.count("dropped") >= 2 and "413" in caplog.text and "422" in caplog.text


def test_batches_stay_well_below_the_report_limit(tmp_path: Path) -> None:
    buf = TelemetryBuffer(tmp_path / "t.db", batch_size=200)
    big = "w" * 300_000
    for _ in range(7):
        buf.add("window", big)
    buf.add("window", "x" * 2_000_000)  # alone larger than a batch: it goes alone
    sizes = []
    while (batch := buf.next_batch()) is not None:
        sizes.append(sum(len(b) for _, _, b in batch[1]))
        buf.ack(batch[0])
    assert sizes == [900_000, 900_000, 300_000, 2_000_000]


def test_agent_metrics_counter_build_info_process_and_no_created() -> None:
    m = AgentMetrics()
    m.count("digits", "1.0.0", "ok")
    m.observe("digits", "1.0.0", 0.01, 0.001, 0.005)
    m.dropped.inc(3)
    text = m.render().decode()
    assert _metric(text, "edgefleet_agent_telemetry_dropped_records").type == "counter"
    assert not [line for line in text.splitlines() if "_created" in line]
    build = _metric(text, "edgefleet_agent_build_info")
    assert [(s.labels, s.value) for s in build.samples] == [({"version": __version__}, 1.0)]
    assert _metric(text, "process_resident_memory_bytes").samples[0].value > 0
    assert _metric(text, "process_cpu_seconds").type == "counter"
