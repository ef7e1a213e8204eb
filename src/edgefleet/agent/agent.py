"""The device agent: ties the state machine, slots, updater, worker supervisor, OIP server and telemetry together.

One asyncio task per loop (check-in, telemetry, upload, probation), all thin: the decisions they act on are pure
functions in ``state.py``, ``updater.py`` and ``probation.py``, and an update runs state by state in ``pipeline.py``.
:class:`Agent` runs in-process too, without the HTTP server and with another backend (``backend_factory``), which
is how a fleet simulator hosts many agents.

What the control plane hears: every telemetry window carries the drift histograms of the inputs served in it
(taken from the backend as the window closes; a window also closes at each switch of the serving model, so its
counts and drift belong to one version); each update ends in exactly one of ``committed``, ``refused``,
``health_check_failed``, ``rolled_back`` (failures) or ``cancelled`` (the desired state moved on: not a failure).
A verification failure that may be transient (a corrupted download, metadata that looks expired to a skewed
clock) is retried :data:`MAX_UPDATE_ATTEMPTS` times, counted in the state file, before it becomes a refusal.

Lifecycle (docs/adr/0103-device-lifecycle-and-pinned-enrollment.md; files in ``identity.py``): enrollment accepts
only the TUF root its token pins (or ``--root``); the desired state may order a credential or key rotation, or a
wipe (decommission: the agent wipes itself and exits with :data:`EXIT_DECOMMISSIONED`); a credential the control
plane refuses :data:`REFUSALS_BEFORE_EXIT` check-ins in a row ends the agent (:data:`EXIT_CREDENTIAL_REFUSED`),
unless a new ``--token`` re-enrolls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import platform
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from edgefleet import __version__
from edgefleet.agent import identity
from edgefleet.agent.backend import Backend, BackendFactory
from edgefleet.agent.buffer import TelemetryBuffer
from edgefleet.agent.crashes import CrashStore, WorkerExit, build_report
from edgefleet.agent.durable import crashpoint
from edgefleet.agent.edges import Clock, HealthCheck, SystemClock
from edgefleet.agent.healthcheck import run_health_check
from edgefleet.agent.httpserver import HTTPLimits, serve_http
from edgefleet.agent.logring import LogRing
from edgefleet.agent.modelunit import ModelUnit, folder_name_ok, unit_folders
from edgefleet.agent.nudge import NudgeListener, require_paho, sleep_or_nudge
from edgefleet.agent.oip import OIPApp
from edgefleet.agent.pipeline import MAX_UPDATE_ATTEMPTS, UpdatePipeline
from edgefleet.agent.probation import ProbationStats, decide, latency_budget_ms
from edgefleet.agent.routing import Policy
from edgefleet.agent.sampling import ArrivalCap, SampleSpool, keep_samples, sampling_rate
from edgefleet.agent.selfupdate import SelfUpdater
from edgefleet.agent.service import InferenceService
from edgefleet.agent.shadow import ShadowEvaluator
from edgefleet.agent.shadow import install as install_shadow
from edgefleet.agent.slots import SlotStore
from edgefleet.agent.standalone import serve_standalone
from edgefleet.agent.state import (
    PersistedState,
    SlotInfo,
    StateStore,
    committed,
    recover,
    rolled_back,
    rolled_back_in_recovery,
)
from edgefleet.agent.supervisor import Supervisor
from edgefleet.agent.telemetry import WindowAccumulator, cut_with_drift
from edgefleet.agent.updater import (
    ControlPlaneClient,
    Offline,
    ReportRejected,
    jittered,
    should_update,
)
from edgefleet.agent.worker.spec import ModelInfo, WorkerSpec
from edgefleet.config import AgentSettings
from edgefleet.errors import (
    AuthError,
    ConfigError,
    EdgefleetError,
    RegistryError,
    UsageError,
    VerificationError,
    WorkerUnavailable,
)
from edgefleet.protocol import (
    MAX_CRASH_REPORTS,
    MAX_SAMPLE_UPLOAD_BYTES,
    MAX_SAMPLES_PER_UPLOAD,
    AgentState,
    CrashUpload,
    DesiredState,
    DeviceConfig,
    EnrollRequest,
    EventKind,
    Hardware,
    LogUpload,
    RemoteRouting,
    Report,
    SampleUpload,
    ServedModel,
    ShadowOrder,
    TelemetryWindow,
    UpdateEvent,
)
from edgefleet.runtime import available_providers, available_runtimes, runtime_version
from edgefleet.telemetry.drift import DriftSummary

__all__ = [
    "EXIT_CREDENTIAL_REFUSED",
    "EXIT_DECOMMISSIONED",
    "MAX_UPDATE_ATTEMPTS",
    "REFUSALS_BEFORE_EXIT",
    "Agent",
    "serve_http",
    "serve_standalone",
]

log = logging.getLogger("edgefleet.agent")

SHADOW_RETRY_S = 60.0  # a shadow phase that could not start (offline, the candidate does not load) is tried again
EXIT_DECOMMISSIONED = 10  # the control plane decommissioned this device and it wiped itself
EXIT_CREDENTIAL_REFUSED = 11  # revoked or decommissioned, and no new token to enroll again with
# One refused check-in may be a replica that has not seen a rotation yet; three in a row is a verdict.
REFUSALS_BEFORE_EXIT = 3
REFUSED = "this device's credential was refused: revoked or decommissioned; re-enroll with --token NEW_TOKEN"
DECOMMISSIONED = (
    "this device was decommissioned by the control plane: its identity, credential, keys and packages are wiped; "
    "to use it again, enroll it with --token NEW_TOKEN"
)


class Agent:
    """One device agent. Its edges are keyword-only, each defaulting to what a device runs:

    - ``backend_factory(spec, on_crash)`` creates what runs a model (default: a supervised worker process);
    - ``transport`` carries every request to the control plane and the TUF repository (default: the network,
      under the TLS policy of the settings; an injected transport brings its own);
    - ``health_check(spec, budget_ms_for)`` judges a staged package before the switch (default: golden vectors
      and latency in a fresh worker process, :func:`~edgefleet.agent.healthcheck.run_health_check`);
    - ``clock`` is read for every time-based decision and every reported time, and paces the check-in,
      telemetry and probation loops (default: :class:`~edgefleet.agent.edges.SystemClock`); the upload loop's
      timeout is only a wake-up (events wake it at once) and stays on the event loop's time.

    ``serve_http=False`` leaves out the local inference API; ``config`` is the device configuration to start with;
    ``hardware`` is what enrollment reports (default: this machine's, with the settings' chipset, memory and tier);
    ``keep_logs`` keeps the process's ``edgefleet`` log lines for an operator who asks (default: when the agent
    serves HTTP, i.e. is the device's own agent — agents embedded many to a process, as in the simulator, would
    each keep every agent's lines).
    """

    def __init__(
        self,
        settings: AgentSettings,
        *,
        backend_factory: BackendFactory | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        health_check: HealthCheck | None = None,
        clock: Clock | None = None,
        serve_http: bool = True,
        config: DeviceConfig | None = None,
        hardware: Hardware | None = None,
        keep_logs: bool | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.health_check: HealthCheck = health_check or run_health_check
        self.hardware = hardware
        self.data_dir = Path(settings.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if identity.wipe_pending(self.data_dir):  # a decommission wipe cut short (power cut): finish it first
            identity.finish_wipe(self.data_dir)
            log.warning("finished wiping %s, as the control plane ordered before the restart", self.data_dir)
        self.backend_factory = backend_factory or self._supervised
        self.with_http = serve_http
        self.transport = transport  # the control plane's and the repository's; None: the network
        self.config = config or DeviceConfig(
            checkin_interval_s=settings.checkin_interval_s, telemetry_interval_s=settings.telemetry_interval_s
        )
        self.store = StateStore(self.data_dir)
        self.slots = SlotStore(self.data_dir)
        self.buffer = TelemetryBuffer(self.data_dir / "telemetry.db", settings.buffer_max_records)
        self.service = InferenceService(queue_size=settings.queue_size)
        self.service.window = WindowAccumulator(now=self.clock.now)  # windows dated by the agent's clock
        self.app = OIPApp(self.service, limits=HTTPLimits.from_settings(settings))  # serve_http takes them too
        self.service.set_routing(self._routing())
        self.state = PersistedState()
        self.backend: Backend | None = None
        self.cp: ControlPlaneClient | None = None
        self.identity: dict[str, Any] = {}
        self.desired: DesiredState | None = None
        self._etag: str | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._update_task: asyncio.Task[None] | None = None
        self._probation: ProbationStats | None = None
        self._probation_crash: str | None = None  # the last worker crash seen during probation
        self._offline_since: float | None = None
        self._upload_now = asyncio.Event()
        self._stopped = asyncio.Event()
        self._nudged = asyncio.Event()  # set from MQTT (agent/nudge.py): check in now
        self.nudges: NudgeListener | None = None
        self._server: Any = None
        self._uds_server: Any = None  # the local API on a Unix socket (settings.uds, agent/uds.py)
        self._counted = (0, 0)
        self.pipeline = UpdatePipeline(self)
        # several models (agent/modelunit.py, ADR 0108): one unit per additional model, and one update at a time
        self.units: dict[str, ModelUnit] = {}
        self.update_lock = asyncio.Lock()
        self._dropped_seen = self.buffer.dropped
        self.service.metrics.dropped.inc(self._dropped_seen)  # cumulative across restarts, like the reports
        self.port: int | None = None
        self.exit_code: int | None = None  # set when the agent ends itself (decommissioned, credential refused)
        self.exit_message: str | None = None
        self._refusals = 0  # check-ins refused in a row
        self._acted_on: str | None = None  # the ETag of the desired state whose rotation orders were carried out
        # remote diagnostics: recent log lines in memory (agent/logring.py), sent only when asked and consented to
        secrets = lambda: (self.settings.token or "", str(self.identity.get("credential") or ""))  # noqa: E731
        self.logs = LogRing(secrets) if (serve_http if keep_logs is None else keep_logs) else None
        self._logs_sent_for: datetime | None = None
        # worker crash reports (agent/crashes.py): kept on disk, sent while the group consents
        self.crashes = CrashStore(self.data_dir / "crashes")
        self.selfupdate = SelfUpdater(self)  # A/B environments under agent-launch (agent/selfupdate.py)
        # input sampling (agent/sampling.py): the worker samples, the agent seals, spools and uploads, with consent
        self.samples = SampleSpool(self.data_dir / "samples")
        self._sample_cap = ArrivalCap(0.0)
        # a rollout's shadow phase (agent/shadow.py): the candidate beside the served model, on mirrored requests
        self.shadow: ShadowEvaluator | None = None
        self._shadow_for: ShadowOrder | None = None
        self._shadow_task: asyncio.Task[None] | None = None

    @property
    def stop_requested(self) -> asyncio.Event:
        """Set when the agent should stop: by a signal handler, or by the agent itself (see :attr:`exit_code`)."""
        return self._stopped

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.logs is not None:
            logging.getLogger("edgefleet").addHandler(self.logs)
        if self.settings.mqtt:
            require_paho()  # one clear line now, not a warning in every check-in later
        loaded = self.store.load()
        self.state = recover(loaded)
        if self.state != loaded:
            self.store.save(self.state)
        suspect = rolled_back_in_recovery(loaded, self.state)
        if suspect is not None:
            reason = self.state.reason or "rolled back"
            self.event(EventKind.rolled_back, reason, suspect.model, suspect.version, suspect.rollout_id)
            log.warning("rolled back %s: %s", suspect.target, reason)
        if self.state.active is not None:
            await self._serve_slot(self.state.active)
        elif self.state.reason:
            self.service.clear(self.state.reason)
        if self.state.state is AgentState.probation:
            self._probation = ProbationStats(self.clock.monotonic())
            self.service.listener = self._probation.observe
        for name in unit_folders(self.data_dir):  # served again now; the first check-in says whether they stay
            unit = self.units[name] = ModelUnit(self, name)
            await unit.start()
        self.service.held = bool(self.units)
        if self.with_http:
            limits = self.app.limits
            self._server = await serve_http(self._route, self.settings.host, self.settings.port, limits)
            self.port = self._server.port
            more: list[Any] = []
            if self.settings.uds is not None:
                from edgefleet.agent.uds import serve_uds

                self._uds_server = await serve_uds(self._route, self.settings.uds, limits)
                more.append(self._uds_server)
            self.service.attach_http(self._server, *more)  # the worker serves the port itself (ADR 0032)
        loop = asyncio.get_running_loop()
        self.selfupdate.on_start()
        self._tasks += [loop.create_task(self._telemetry_loop()), loop.create_task(self._probation_loop())]
        if self.settings.server:
            self._tasks += [loop.create_task(self._checkin_loop()), loop.create_task(self._upload_loop())]

    async def run(self) -> None:
        await self.start()
        try:
            await self._stopped.wait()
        finally:
            await self.stop()

    def request_stop(self) -> None:
        self._stopped.set()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._uds_server is not None:
            self._uds_server.close()
        tasks = [*self._tasks, *([self._update_task] if self._update_task else [])]
        tasks += [self._shadow_task] if self._shadow_task else []
        self.selfupdate.stop()
        for t in tasks:
            t.cancel()
        if self.nudges is not None:
            await asyncio.to_thread(self.nudges.stop)
        # Bounded: a task that swallowed its cancellation (a library awaiting with wait_for, say) is cancelled
        # again rather than awaited for ever; one still running after that is left behind, and said so.
        pending = set(tasks)
        for _ in range(3):
            if not pending:
                break
            done, pending = await asyncio.wait(pending, timeout=2.0)
            for t in done:  # retrieved, so a task that failed is not reported again at exit
                if not t.cancelled():
                    t.exception()
            for t in pending:
                t.cancel()
        if pending:
            log.warning("%d agent task(s) did not stop: %s", len(pending), ", ".join(t.get_name() for t in pending))
        for unit in self.units.values():
            await unit.stop()
        with contextlib.suppress(Exception):
            await self._drift_and_close()  # the last, partial window is kept for the next upload
        if self.backend is not None:
            await self.backend.stop()
        if self.cp is not None:
            await self.cp.aclose()
        self.buffer.close()
        if self.logs is not None:
            logging.getLogger("edgefleet").removeHandler(self.logs)
        if identity.wipe_pending(self.data_dir):
            identity.finish_wipe(self.data_dir)
            log.warning("wiped %s", self.data_dir)

    def _finish(self, code: int, message: str) -> None:
        """End the agent on its own account: one clear line, an exit code that says why."""
        self.exit_code, self.exit_message = code, message
        log.error("%s", message)
        self.request_stop()

    # ------------------------------------------------------------------ serving

    def spec(self, slot: SlotInfo) -> WorkerSpec:
        return WorkerSpec(
            self.slots.path(slot.slot),
            self.key_for(self.slots.path(slot.slot)),
            memory_mb=self.settings.memory_mb,
            intra_op_threads=self.settings.intra_op_threads,
        )

    def key_for(self, package: Path) -> Path | None:
        """The device key that opens ``package``: after a key rotation, a package built for the old key still
        opens with the retired one."""
        return identity.key_for_package(self.data_dir, package)

    def _needed_key_ids(self) -> set[str]:
        s = self.state
        slots = {x.slot for x in (s.committed, s.active) if x is not None}
        if s.pending is not None and s.pending.slot is not None:
            slots.add(s.pending.slot)
        needed: set[str] = set()
        for slot in slots:
            p = self.slots.path(slot)
            if p.exists():
                needed.update(identity.package_key_ids(p))
        return needed

    async def _prune_keys(self) -> None:
        """Delete retired device keys that no package on the device is encrypted to any more."""
        if not identity.has_retired_keys(self.data_dir):
            return
        loop = asyncio.get_running_loop()
        needed = await loop.run_in_executor(None, self._needed_key_ids)
        gone = await loop.run_in_executor(None, identity.prune_retired_keys, self.data_dir, needed)
        if gone:
            log.info("deleted retired device key(s) %s: no package on this device needs them", ", ".join(gone))

    def _supervised(self, spec: WorkerSpec, on_crash: Any) -> Backend:
        return Supervisor(spec, on_crash, fault_file=self.crashes.fault_file, on_exit=self._keep_crash)

    def _keep_crash(self, ex: WorkerExit) -> None:
        report = build_report(
            ex,
            at=self.clock.now(),
            agent_version=__version__,
            runtime_version=runtime_version(),
            secrets=(self.settings.token or "", str(self.identity.get("credential") or "")),
        )
        self.crashes.add(report)
        log.info("kept crash report %s (%s)", report.crash_id, report.signal or f"exit {report.exit_code}")

    def _sync_sampling(self) -> None:
        """Tell the serving backend the sampling rate the configuration allows (0: none); one that cannot sample
        (an in-process backend) never does."""
        rate = sampling_rate(self.config)
        self._sample_cap.set_rate(rate)
        if self.backend is not None:
            self.backend.sample_inputs(rate, self._on_samples)

    def _on_samples(self, batch: list[Any], info: ModelInfo | None) -> None:
        key = self.config.sample_public_key
        if not self.config.input_sampling or key is None:
            return  # consent withdrawn since the worker sampled these: they are never kept
        n = self._sample_cap.admit(self.clock.monotonic(), len(batch))
        if n < len(batch):
            self.samples.count_dropped(len(batch) - n)
            log.warning("the worker sent %d input samples over the rate cap; dropped", len(batch) - n)
        if n:
            job = functools.partial(
                keep_samples,
                self.samples,
                batch[:n],
                key,
                device_id=self.identity.get("device_id"),
                model=info.name if info else None,
                version=info.version if info else None,
            )
            asyncio.get_running_loop().run_in_executor(None, job)  # sealing and writing stay off the event loop

    async def _send_samples(self) -> None:
        """Upload the spooled input samples, a few batches per check-in; forget those acknowledged. A refusal is
        logged and does not hold up the rest of the check-in."""
        assert self.cp is not None
        for _ in range(4):
            batch = self.samples.pending(MAX_SAMPLES_PER_UPLOAD, MAX_SAMPLE_UPLOAD_BYTES - 64 * 1024)
            if not batch:
                return
            try:
                answer = await self.cp.upload_samples(SampleUpload(samples=batch, dropped=self.samples.dropped))
            except ReportRejected as err:  # resending cannot help
                self.samples.forget(s.sample_id for s in batch)
                self.samples.count_dropped(len(batch))
                log.warning("dropped %d input sample(s) the control plane refuses: %s", len(batch), err)
                continue
            except Offline:
                raise
            except EdgefleetError as err:  # consent withdrawn meanwhile, say: the next check-in purges them
                log.warning("input samples not sent: %s", err)
                return
            n = self.samples.forget(answer.accepted_sample_ids)
            log.info("sent %d input sample(s) to the control plane", n)

    def _sync_shadow(self) -> None:
        """Start, replace or end the shadow phase the desired state orders. Only beside a committed model that
        serves: the idle slot then holds nothing an update needs."""
        want = self.desired.shadow if self.desired is not None else None
        if want is not None and (self.backend is None or self.state.state is not AgentState.committed):
            want = None
        if want == self._shadow_for:
            return
        self._shadow_for = want
        self._shadow_task = asyncio.get_running_loop().create_task(self._shadow_phase(self._shadow_task, want))

    async def _shadow_phase(self, old: asyncio.Task[None] | None, order: ShadowOrder | None) -> None:
        if old is not None:
            old.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await old
        if order is None:
            return
        ev: ShadowEvaluator | None = None
        try:
            path, metric = await install_shadow(UpdatePipeline(self), order)
            spec = WorkerSpec(path, self.key_for(path), role="shadow", memory_mb=self.settings.memory_mb)
            ev = ShadowEvaluator(order, spec, metric, monotonic=self.clock.monotonic)
            await ev.start()
            self.shadow = ev
            self._sync_mirror()
            log.info(
                "shadow phase of rollout %s: %s runs on up to %g mirrored requests a second (%s agreement)",
                order.rollout_id,
                order.target,
                order.rate_per_s,
                metric,
            )
            await asyncio.Event().wait()  # until the order ends (cancelled)
        except Exception as err:  # the served model goes on whatever becomes of its shadow
            log.warning(
                "shadow phase of %s not run: %s: %s; trying again in %g s",
                order.target,
                type(err).__name__,
                err,
                SHADOW_RETRY_S,
            )
        finally:
            if ev is not None:
                if self.shadow is ev:
                    self.shadow = None
                    self._sync_mirror()
                await ev.stop()
        await self.clock.sleep(SHADOW_RETRY_S)
        if self._shadow_for == order:
            self._shadow_for = None  # the next check-in starts it afresh if the order still holds

    def _sync_mirror(self) -> None:
        if self.backend is not None:
            self.backend.mirror_requests(self.shadow.order.rate_per_s if self.shadow else 0.0, self._on_mirror)

    def _on_mirror(self, batch: list[Any], info: ModelInfo | None) -> None:
        if self.shadow is not None:
            self.shadow.offer(batch, info)

    def _on_crash(self, reason: str) -> None:
        self.service.metrics.crashes.inc()
        if self._probation is not None:
            self._probation.crash_times.append(self.clock.monotonic())
            self._probation_crash = reason
        a = self.state.active
        # the rollout that installed what crashed, so the control plane counts the crash against that rollout
        rid = a.rollout_id if a else None
        self.event(EventKind.worker_crashed, reason, a.model if a else None, a.version if a else None, rid)

    async def start_backend(self, spec: WorkerSpec) -> tuple[Backend, ModelInfo]:
        backend = self.backend_factory(spec, self._on_crash)
        try:
            info = await backend.start()
        except BaseException:
            await backend.stop()
            raise
        return backend, info

    async def _serve_slot(self, slot: SlotInfo) -> bool:
        """Serve ``slot``; on failure answer 503 with the reason (the supervisor keeps retrying)."""
        try:
            backend, info = await self.start_backend(self.spec(slot))
        except WorkerUnavailable as err:
            self.service.clear(f"the model in slot {slot.slot} does not start: {err}")
            return False
        await self._swap_backend(backend, info)
        return True

    async def _swap_backend(
        self, new: Backend | None, info: ModelInfo | None, reason: str = "", *, close: bool = True
    ) -> None:
        """Serve ``new`` (None: answer 503 with ``reason``) and stop the backend it replaces. The current window
        closes first (unless the caller just closed it), with the old backend's drift: a window's counts and
        histograms belong to one model."""
        old = self.backend
        if old is not None and close:
            try:
                await self._drift_and_close()
            except Exception:  # a window lost is bad; a switch that does not happen is worse
                log.exception("the telemetry window before the switch could not be closed")
        self.backend = new
        self._counted = (0, 0)  # crash and restart counts are per backend
        if new is not None and info is not None:
            self.service.set_backend(new, info)
            self._sync_sampling()
            self._sync_mirror()
        else:
            self.service.clear(reason)
        if old is not None:
            await old.stop()

    # ------------------------------------------------------------------ several models (ADR 0108)

    def _route(self, method: str, path: str, headers: dict[bytes, bytes], body: bytes, respond: Any) -> None:
        """A request naming an additional model goes to its unit's OIP app; every other one to the first model's.
        While no unit exists the first model's worker serves the port itself and this is not on the hot path."""
        if self.units and path.startswith("/v2/models/"):
            unit = self.units.get(path[len("/v2/models/") :].split("/", 1)[0])
            if unit is not None:
                unit.app.handle(method, path, headers, body, respond)
                return
        self.app.handle(method, path, headers, body, respond)

    async def _sync_units(self, d: DesiredState) -> None:
        """Start, update or stop the unit of each additional model the desired state names."""
        want = {a.model: a for a in d.models if folder_name_ok(a.model)}
        for name in [n for n in self.units if n not in want]:
            await self.units.pop(name).stop(forget=True)
            log.info("model %s is no longer assigned: stopped, its slots deleted", name)
        for name, a in want.items():
            unit = self.units.get(name)
            if unit is None:
                unit = self.units[name] = ModelUnit(self, name)
                await unit.start()
                log.info("model %s assigned beside %s", name, d.model)
            unit.assign(a, d)
        await self._hold_port(bool(self.units))

    async def _hold_port(self, on: bool) -> None:
        """Keep the inference port in the agent while several models are assigned (routing by name), else hand it
        to the first model's worker (ADR 0032). A worker serving it keeps it until it stops: a fresh one takes
        over the first model, without the port."""
        if self.service.held == on:
            return
        self.service.hold_http(on)
        if on and self._server is not None and self.backend is not None and self.state.active is not None:
            await self._serve_slot(self.state.active)

    def keep_window(self, w: TelemetryWindow) -> None:
        """Buffer an additional model's telemetry window for upload."""
        self.buffer.add("window", w.model_dump_json())
        self._sync_buffer_metrics()

    # ------------------------------------------------------------------ events, reports

    def event(
        self,
        kind: EventKind,
        reason: str | None = None,
        model: str | None = None,
        version: str | None = None,
        rollout_id: str | None = None,
        *,
        bytes_downloaded: int | None = None,
        delta_from: str | None = None,
    ) -> None:
        ev = UpdateEvent(
            event_id=uuid.uuid4().hex,
            at=self.clock.now(),
            kind=kind,
            model=model,
            version=version,
            rollout_id=rollout_id,
            reason=_clip(reason),
            bytes_downloaded=bytes_downloaded,
            delta_from=delta_from,
        )
        self.buffer.add("event", ev.model_dump_json())
        self.service.metrics.updates.labels(kind.value).inc()
        self._upload_now.set()

    def save(self, s: PersistedState) -> None:
        self.store.save(s)
        self.state = s

    def served(self) -> ServedModel:
        a = self.state.active
        info = self.service.info
        return ServedModel(
            model=a.model if a else None,
            version=a.version if a else None,
            model_sha256=info.model_sha256 if info else None,
            package_sha256=a.package_sha256 if a else None,
        )

    def _report(self, batch_id: str, records: list[tuple[int, str, str]]) -> Report:
        events: list[UpdateEvent] = []
        windows: list[TelemetryWindow] = []
        invalid: list[int] = []
        for rid, kind, body in records:
            try:
                if kind == "event":
                    events.append(UpdateEvent.model_validate_json(body))
                elif kind == "window":
                    windows.append(TelemetryWindow.model_validate_json(body))
            except ValueError as err:  # would make the whole batch fail, here or on the server, forever
                log.warning("dropping a buffered %s the protocol refuses: %s", kind, " ".join(str(err).split())[:300])
                invalid.append(rid)
        if invalid:
            self.buffer.discard(invalid)
            self._sync_buffer_metrics()
        return Report(
            batch_id=batch_id,
            state=self.state.state,
            state_reason=_clip(self.state.reason),
            served=self.served(),
            agent_version=__version__,
            runtime_version=runtime_version(),
            runtimes=available_runtimes(),
            events=events,
            telemetry=windows,
            dropped_records=self.buffer.dropped,
            sent_at=self.clock.now(),
            models=[u.status() for u in self.units.values()],
        )

    async def _upload_loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that arrives as the
            # event is set, and this loop would then outlive stop()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.checkin_interval_s):
                    await self._upload_now.wait()
            self._upload_now.clear()
            if self.cp is None or self.cp.device_id is None:
                continue
            try:
                while (batch := self.buffer.next_batch()) is not None:
                    crashpoint("upload.before_send")
                    try:
                        answer = await self.cp.report(self._report(*batch))
                    except ReportRejected as err:
                        # Resending cannot help (too large, or invalid): drop the batch, count it, go on with the rest.
                        n = self.buffer.drop(batch[0])
                        self._sync_buffer_metrics()
                        log.warning("dropped %d telemetry records of batch %s: %s", n, batch[0], err)
                        continue
                    crashpoint("upload.before_ack")
                    if batch[0] not in answer.accepted_batch_ids:
                        log.warning("the control plane did not accept batch %s; will resend", batch[0])
                        break
                    self.buffer.ack(batch[0])
                    crashpoint("upload.after_ack")
                self._online()
            except Offline as err:
                self._offline(err)
            except EdgefleetError as err:
                log.warning("telemetry upload refused: %s", err)
            self._sync_buffer_metrics()

    def _sync_buffer_metrics(self) -> None:
        self.service.metrics.buffered.set(len(self.buffer))
        dropped = self.buffer.dropped
        if dropped > self._dropped_seen:
            self.service.metrics.dropped.inc(dropped - self._dropped_seen)
            self._dropped_seen = dropped

    async def _telemetry_loop(self) -> None:
        while True:
            await self.clock.sleep(self.config.telemetry_interval_s)
            try:
                await self._drift_and_close()
            except asyncio.CancelledError:
                raise
            except Exception:  # the next window must still close
                log.exception("closing a telemetry window failed")
            await asyncio.sleep(0)

    def close_window(self, drift: list[DriftSummary] | None = None) -> TelemetryWindow:
        """Close the current window now, with ``drift`` as its histograms, and buffer it for upload."""
        return self._keep(self._cut_window(), drift or [])

    def _cut_window(self) -> TelemetryWindow:
        """The window's counts up to this instant (the next window starts here), without drift."""
        b = self.backend
        crashes, restarts = (b.crashes, b.restarts) if b else self._counted
        d_crash, d_restart = max(0, crashes - self._counted[0]), max(0, restarts - self._counted[1])
        self._counted = (crashes, restarts)
        info = self.service.info
        w = self.service.window.close(
            model=info.name if info else None,
            version=info.version if info else None,
            model_sha256=info.model_sha256 if info else None,
            restarts=d_restart,
            crashes=d_crash,
            worker_rss=b.rss_bytes() if b else None,
            drift=[],
        )
        return w if self.shadow is None else w.model_copy(update={"shadow": self.shadow.take()})

    def _keep(self, w: TelemetryWindow, drift: list[DriftSummary]) -> TelemetryWindow:
        if drift:
            try:
                w = TelemetryWindow(**{**w.model_dump(), "drift": drift})
            except ValueError as err:  # histograms the protocol refuses: the window's counts still go out
                log.warning("telemetry window sent without drift: %s", " ".join(str(err).split())[:300])
        self.buffer.add("window", w.model_dump_json())
        self._sync_buffer_metrics()
        return w

    async def _drift_and_close(self) -> TelemetryWindow:
        """Close the window with the drift histograms of exactly the inputs served in it (they reset there): the
        backend cuts the counts at the instant it takes the histograms (``at_answer``)."""
        b = self.backend
        got = None if b is None else await cut_with_drift(b.drift, self._cut_window, "telemetry window")
        return self.close_window() if got is None else self._keep(*got)

    # ------------------------------------------------------------------ control plane

    def _offline(self, err: Exception) -> None:
        if self._offline_since is None:
            self._offline_since = self.clock.monotonic()
            log.warning("offline: %s; serving the committed model and buffering telemetry", err)

    def _online(self) -> None:
        if self._offline_since is not None:
            log.info("back online after %.0f s", self.clock.monotonic() - self._offline_since)
            self._offline_since = None

    def _hardware(self) -> Hardware:
        from edgefleet.bench.env import cpu_model
        from edgefleet.bench.tiers import host_isa_features

        mem = self.settings.memory_mb or int(psutil.virtual_memory().total // 2**20)
        return Hardware(
            arch=platform.machine() or "unknown",
            cpu_count=os.cpu_count() or 1,
            memory_mb=mem,
            chipset=self.settings.chipset,
            cpu_model=cpu_model()[:128],
            # none read (no /proc/cpuinfo) is unknown, not "no features": the server then judges the arch alone
            isa_features=host_isa_features() or None,
            # settings.tier is set by --emulate-tier only: a real device learns its tier from its token
            emulates=self.settings.tier,
            runtimes=available_runtimes(),
            execution_providers=available_providers(),
        )

    async def _enroll(self, cp: ControlPlaneClient, *, previous: str | None = None) -> None:
        """Load the stored identity, or (none stored, or ``previous`` names the identity being replaced) enroll
        with ``--token``."""
        ident = None if previous is not None else identity.load_identity(self.data_dir)
        if ident is None:
            ident = await self._enroll_new(cp, previous)
        self.identity = ident.model_dump()
        cp.device_id, cp.credential = ident.device_id, ident.credential

    def _pinned_root(self) -> bytes | None:
        if self.settings.root is None:
            return None
        try:
            return Path(self.settings.root).read_bytes()
        except OSError as err:
            raise UsageError(f"cannot read --root {self.settings.root}: {err.strerror}") from None

    async def _enroll_new(self, cp: ControlPlaneClient, previous: str | None) -> identity.Identity:
        from edgefleet.package import generate_device_keypair

        token = self.settings.token
        if not token:
            raise UsageError("this device is not enrolled yet: give --token ENROLL_TOKEN")
        pinned_root = self._pinned_root()
        pin = identity.token_pin(token)
        if pin is None and pinned_root is None:
            log.warning(
                "the enrollment token pins no TUF root and no --root was given: trusting the root the enroll "
                "answer carries (mint a new token to pin it)"
            )
        if (self.data_dir / "device.key").exists() and (self.data_dir / "device.pub").exists():
            pub = identity.public_key(self.data_dir)  # a re-enrollment keeps the key its packages are built for
        else:
            pub = generate_device_keypair(self.data_dir, name="device", overwrite=True).public_key_hex
        ans = await cp.enroll(
            EnrollRequest(
                token=token,
                hardware=self.hardware or self._hardware(),
                runtime_version=runtime_version(),
                agent_version=__version__,
                public_key=pub,
                previous_device_id=previous,
            )
        )
        root = ans.root_json.encode()
        # before anything is written: a refused answer leaves the device as it was
        identity.check_root(root, pin=pin, pinned_root=pinned_root)
        identity.reset_trust(self.data_dir)
        identity.save_trusted_root(self.data_dir, root)
        ident = identity.Identity(
            device_id=ans.device_id,
            credential=ans.credential,
            tier=ans.tier,
            repository_url=ans.repository_url,
            token_sha256=identity.token_sha256(token),
        )
        identity.save_identity(self.data_dir, ident)
        log.info(
            "enrolled as %s (tier %s%s)",
            ans.device_id,
            ans.tier,
            f", replacing {previous}" if previous else "",
        )
        return ident

    async def _refused(self, err: AuthError) -> None:
        """The control plane refused this device's credential. Once may be a replica behind a rotation; three
        times in a row, the device re-enrolls with a new ``--token`` if it was given one, else it stops."""
        self._refusals += 1
        if self._refusals < REFUSALS_BEFORE_EXIT:
            log.warning("check-in refused (%d of %d before giving up): %s", self._refusals, REFUSALS_BEFORE_EXIT, err)
            return
        token = self.settings.token
        if not token or identity.token_sha256(token) == self.identity.get("token_sha256"):
            self._finish(EXIT_CREDENTIAL_REFUSED, f"{REFUSED} ({err})")
            return
        assert self.cp is not None
        previous = self.identity.get("device_id")
        log.warning("this device's credential was refused (%s): enrolling again with the new --token", err)
        try:
            await self._enroll(self.cp, previous=previous)
        except (RegistryError, VerificationError) as e:
            self._finish(EXIT_CREDENTIAL_REFUSED, f"{REFUSED}; enrolling with the new --token failed: {e}")
            return
        self._refusals = 0
        self._etag, self.desired, self._acted_on = None, None, None

    async def _send_logs(self, d: DesiredState) -> None:
        """Answer an operator's request for this device's log lines, once per request, if its group consents."""
        since = d.send_logs_since
        if since is None or self._logs_sent_for == since:
            return
        assert self.cp is not None
        if not self.config.remote_logs:  # the server checks consent too; a device does not rely on it alone
            self._logs_sent_for = since
            log.warning("the control plane asked for this device's log lines, but its group does not consent")
            return
        if self.logs is None:
            lines, dropped = [f"this agent is embedded (keep_logs=False) and keeps no log lines; asked at {since}"], 0
        else:
            lines, dropped = self.logs.since(since)
        await self.cp.upload_logs(LogUpload(since=since, lines=lines, dropped=dropped))
        self._logs_sent_for = since  # only once it arrived: a failed upload is tried again on the next check-in
        log.info("sent %d log line(s) since %s to the control plane, as an operator asked", len(lines), since)

    async def _send_crashes(self) -> None:
        """Upload the crash reports kept here; forget those the control plane acknowledges. A refusal is logged
        and does not hold up the rest of the check-in."""
        assert self.cp is not None
        pending = self.crashes.pending()[:MAX_CRASH_REPORTS]
        if not pending:
            return
        try:
            answer = await self.cp.upload_crashes(CrashUpload(reports=pending))
        except ReportRejected as err:  # resending cannot help
            self.crashes.forget(r.crash_id for r in pending)
            log.warning("dropped %d crash report(s) the control plane refuses: %s", len(pending), err)
            return
        except Offline:
            raise
        except EdgefleetError as err:  # consent withdrawn meanwhile, say: kept for later
            log.warning("crash reports not sent: %s", err)
            return
        n = self.crashes.forget(answer.accepted_crash_ids)
        log.info("sent %d crash report(s) to the control plane", n)

    async def _lifecycle(self, d: DesiredState) -> bool:
        """Carry out the desired state's lifecycle orders; True when the agent is done (wiped)."""
        assert self.cp is not None
        if d.wipe:
            identity.begin_wipe(self.data_dir)  # durable first: from here on the wipe happens, power or not
            await self._swap_backend(None, None, "decommissioned: this device is wiping itself", close=False)
            self._finish(EXIT_DECOMMISSIONED, DECOMMISSIONED)
            return True
        if self._acted_on is not None and self._acted_on == self._etag:
            return False  # done already; the next answer (the order cleared) has not come yet
        if d.rotate_credential:
            credential = await self.cp.rotate_credential()
            ident = identity.Identity.model_validate({**self.identity, "credential": credential})
            identity.save_identity(self.data_dir, ident)  # durable before first use: the old one works till then
            self.identity = ident.model_dump()
            self.cp.credential = credential
            log.info("rotated this device's credential")
        if d.rotate_key:
            pub = identity.new_key_pair(self.data_dir)
            await self.cp.rotate_key(pub)
            identity.finish_key_rotation(self.data_dir)
            log.info("rotated this device's key pair: new key id %s", _key_id(pub))
            await self._prune_keys()
        self._acted_on = self._etag
        return False

    async def _checkin_loop(self) -> None:
        assert self.settings.server
        self.cp = ControlPlaneClient(
            self.settings.server,
            transport=self.transport,
            ca_file=self.settings.ca_file,
            insecure_http=self.settings.insecure_http,
        )
        while True:
            try:
                if self.cp.device_id is None:
                    await self._enroll(self.cp)
                self._follow_nudges(self.cp)
                try:
                    desired, self._etag = await self.cp.desired(self._etag)
                except AuthError as err:
                    await self._refused(err)
                    if self.exit_code is not None:
                        return
                    await self.clock.sleep(jittered(self.config.checkin_interval_s))
                    continue
                self._refusals = 0
                self._online()
                if desired is not None:
                    self._apply(desired)
                if self.desired is not None:
                    await self._sync_units(self.desired)
                self.selfupdate.after_checkin(self.desired)
                self._sync_shadow()
                d = self.desired
                if d is not None and d.send_logs_since is not None:
                    await self._send_logs(d)
                if self.config.crash_reports:  # the server checks consent too; a device does not rely on it alone
                    await self._send_crashes()
                if self.config.input_sampling:  # the same for input samples
                    await self._send_samples()
                elif d is not None and (n := self.samples.purge()):
                    log.warning("deleted %d input sample(s): this device's group no longer consents", n)
                if d is not None and (d.wipe or d.rotate_credential or d.rotate_key) and await self._lifecycle(d):
                    return
                due = d is None or self.pipeline.retry_due(d)
                if d is not None and due and should_update(self.state, d, self._update_task is not None):
                    self._update_task = asyncio.get_running_loop().create_task(self._update(d))
            except Offline as err:
                self._offline(err)
            except EdgefleetError as err:
                log.warning("check-in failed: %s", err)
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop that brings updates must outlive any one bad answer
                log.exception("check-in failed unexpectedly; retrying")
            if self.nudges is None:
                await self.clock.sleep(jittered(self.config.checkin_interval_s))
            else:
                await sleep_or_nudge(self.clock.sleep(jittered(self.config.checkin_interval_s)), self._nudged)

    def _follow_nudges(self, cp: ControlPlaneClient) -> None:
        """Listen for nudges as this device: from its first check-in, and afresh when a re-enrollment changed its
        id (docs/agent.md, "Nudges over MQTT")."""
        if not self.settings.mqtt or cp.device_id is None:
            return
        if self.nudges is not None:
            if self.nudges.device_id == cp.device_id:
                return
            self.nudges.stop()
        self.nudges = NudgeListener(
            self.settings.mqtt,
            cp.device_id,
            self.identity.get("tier"),
            self._nudged.set,
            loop=asyncio.get_running_loop(),
        )
        self.nudges.start()

    def _apply(self, desired: DesiredState) -> None:
        self.desired = desired
        if desired.config.version > 0:
            self.config = desired.config
        else:
            # Version 0: no group document exists, so the device's own flags keep their say over intervals.
            self.config = desired.config.model_copy(
                update={
                    "checkin_interval_s": self.settings.checkin_interval_s,
                    "telemetry_interval_s": self.settings.telemetry_interval_s,
                }
            )
        self._sync_sampling()
        self.service.set_routing(self._routing())

    def _routing(self) -> Policy:
        """Hybrid routing (ADR 0105): the group's document when it names an endpoint, else the device's setting."""
        doc = self.config.routing
        if doc is None and self.settings.routing is not None:
            try:
                doc = RemoteRouting.model_validate(self.settings.routing)
            except ValueError as err:
                raise ConfigError(f"the agent's routing setting is not valid: {err}") from None
        return Policy.from_doc(doc)

    # ------------------------------------------------------------------ update (agent/pipeline.py)

    async def _update(self, d: DesiredState) -> None:
        try:
            async with self.update_lock:  # one download and TUF refresh at a time, whichever model (ADR 0108)
                await self.pipeline.run(d)
        except Offline as err:
            self._offline(err)  # keep the partial download; the next check-in resumes it
        finally:
            self._update_task = None

    async def close_window_before_switch(self) -> None:
        try:
            await self._drift_and_close()
        except Exception:  # a window lost is bad; a switch that does not happen is worse
            log.exception("the telemetry window before the switch could not be closed")

    async def switch_to(self, backend: Backend, info: ModelInfo, probation: ProbationStats) -> None:
        """Serve the candidate, on probation from now on (the window before it closed already)."""
        self._probation = probation
        self._probation_crash = None
        self.service.listener = probation.observe
        await self._swap_backend(backend, info, close=False)

    # ------------------------------------------------------------------ probation

    async def _probation_loop(self) -> None:
        while True:
            await self.clock.sleep(0.1)
            stats = self._probation
            if stats is None or self.state.state is not AgentState.probation:
                continue
            info = self.service.info
            budget = latency_budget_ms(
                info.metrics if info else {}, self.identity.get("tier"), self.config.p95_budget_ms
            )
            decision = decide(self.config, stats, self.clock.monotonic(), budget)
            if decision.action == "commit":
                await self._commit(decision.reason)
            elif decision.action == "rollback":
                reason = decision.reason
                if stats.crash_times and self._probation_crash and self._probation_crash not in reason:
                    # The breach (errors while no worker ran, a crash loop) has a root cause the operator needs to
                    # see: how the worker last ended (killed over its memory, a signal, an exit code).
                    reason = f"{reason}; the worker crashed: {self._probation_crash}"
                await self._rollback(reason)

    async def _commit(self, reason: str) -> None:
        s = self.state
        a = s.active
        self._probation = None
        self.service.listener = None
        self.save(committed(s))
        self.slots.clear_downloads()
        try:
            await self._prune_keys()  # the package replaced may have been the last one built for a retired key
        except Exception:
            log.exception("pruning retired device keys failed; they are kept")
        self.event(
            EventKind.committed, reason, a.model if a else None, a.version if a else None, a.rollout_id if a else None
        )
        log.info("committed %s: %s", a.target if a else None, reason)

    async def _rollback(self, reason: str) -> None:
        s = self.state
        a = s.active
        self._probation = None
        self.service.listener = None
        self.save(rolled_back(s, reason))
        self.event(
            EventKind.rolled_back, reason, a.model if a else None, a.version if a else None, a.rollout_id if a else None
        )
        log.warning("rolled back %s: %s", a.target if a else None, reason)
        if s.committed is not None:
            if self.service.router is not None:
                # Hybrid routing (ADR 0105): the failed candidate stops now, and the remote answers while the
                # committed version starts, rather than the candidate serving on until then.
                await self.close_window_before_switch()
                old, self.backend = self.backend, None
                self.service.rolling_back = True
                self.service.suspend(f"rolling back: {reason}")
                if old is not None:
                    await old.stop()
            try:
                await self._serve_slot(s.committed)
            finally:
                self.service.rolling_back = False
        else:
            await self._swap_backend(None, None, reason)


def _key_id(public_hex: str) -> str:
    from edgefleet.package.keys import key_id

    return key_id(public_hex)


def _clip(reason: str | None) -> str | None:
    """A reason as the wire takes it (at most 2000 characters): a longer one would get the report refused."""
    return reason[:2000] if reason else None
