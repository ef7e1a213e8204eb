"""One additional model on the device (docs/adr/0108-several-models-per-device.md): the desired state's
``models`` entry for it, with its own state file and slots (``<data_dir>/models/<name>/``), its own supervised
worker, its own update run (``pipeline.UpdatePipeline``: download, verify, stage, health check, switch), probation,
commit or rollback, and its own telemetry windows. Events and windows carry its model name.

The agent's first model keeps its own machinery (agent.py); a unit shares the device's identity, TUF metadata,
keys, telemetry buffer and Prometheus registry with it. While any unit exists the agent keeps the inference port and
routes each request by the model it names (``Agent._route``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from edgefleet.agent.backend import Backend
from edgefleet.agent.oip import OIPApp
from edgefleet.agent.pipeline import UpdatePipeline
from edgefleet.agent.probation import ProbationStats, decide, latency_budget_ms
from edgefleet.agent.service import InferenceService
from edgefleet.agent.slots import SlotStore
from edgefleet.agent.state import (
    PersistedState,
    SlotInfo,
    StateStore,
    committed,
    recover,
    rolled_back,
    rolled_back_in_recovery,
)
from edgefleet.agent.telemetry import cut_with_drift
from edgefleet.agent.updater import Offline, should_update
from edgefleet.agent.worker.spec import ModelInfo, WorkerSpec
from edgefleet.errors import WorkerUnavailable
from edgefleet.protocol import (
    AgentState,
    DesiredState,
    EventKind,
    ModelAssignment,
    ModelStatus,
    TelemetryWindow,
)
from edgefleet.telemetry.drift import DriftSummary

if TYPE_CHECKING:
    from edgefleet.agent.agent import Agent

__all__ = ["MODELS_DIR", "ModelUnit", "folder_name_ok", "unit_folders"]

log = logging.getLogger("edgefleet.agent")

MODELS_DIR = "models"  # under the data folder: one folder per additional model


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def folder_name_ok(name: str) -> bool:
    """Whether ``name`` can name a folder under ``models/`` as it is (no separator, no dot-dot, no hidden name)."""
    return bool(_NAME.match(name)) and ".." not in name


def unit_folders(data_dir: Path) -> list[str]:
    """The additional models with a state file on this device (served again at start, before the first check-in)."""
    root = data_dir / MODELS_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if folder_name_ok(p.name) and (p / "state.json").exists())


class ModelUnit:
    """One additional model: an :class:`~edgefleet.agent.pipeline.UpdateHost` of its own."""

    def __init__(self, agent: Agent, name: str) -> None:
        self.agent = agent
        self.name = name
        self.folder = agent.data_dir / MODELS_DIR / name
        self.folder.mkdir(parents=True, exist_ok=True)
        # UpdateHost: the device's settings, clock, TUF metadata folder (data_dir), keys and health check
        self.settings = agent.settings
        self.data_dir = agent.data_dir
        self.clock = agent.clock
        self.health_check = agent.health_check
        self.transport = agent.transport
        self.config = agent.config
        self.identity = agent.identity
        self.cp = agent.cp
        self.desired: DesiredState | None = None
        # its own state, slots, service (the agent's Prometheus registry: every series is labelled by model)
        self.store = StateStore(self.folder)
        self.slots = SlotStore(self.folder)
        self.service = InferenceService(queue_size=agent.settings.queue_size, metrics=agent.service.metrics)
        self.app = OIPApp(self.service, limits=agent.app.limits)
        self.state = PersistedState()
        self.backend: Backend | None = None
        self.pipeline = UpdatePipeline(self)
        self._probation: ProbationStats | None = None
        self._probation_crash: str | None = None
        self._counted = (0, 0)
        self._update_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loaded = self.store.load()
        self.state = recover(loaded)
        if self.state != loaded:
            self.store.save(self.state)
        suspect = rolled_back_in_recovery(loaded, self.state)
        if suspect is not None:
            reason = self.state.reason or "rolled back"
            self.event(EventKind.rolled_back, reason, suspect.model, suspect.version, suspect.rollout_id)
        if self.state.active is not None:
            await self._serve_slot(self.state.active)
        elif self.state.reason:
            self.service.clear(self.state.reason)
        if self.state.state is AgentState.probation:
            self._probation = ProbationStats(self.clock.monotonic())
            self.service.listener = self._probation.observe
        loop = asyncio.get_running_loop()
        self._tasks += [loop.create_task(self._telemetry_loop()), loop.create_task(self._probation_loop())]

    async def stop(self, *, forget: bool = False) -> None:
        """Stop serving; ``forget``: the model is no longer assigned, so its folder (state, slots) goes too."""
        tasks = [*self._tasks, *([self._update_task] if self._update_task else [])]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        with contextlib.suppress(Exception):
            await self._drift_and_close()
        if self.backend is not None:
            await self.backend.stop()
            self.backend = None
        if forget:
            shutil.rmtree(self.folder, ignore_errors=True)

    def assign(self, a: ModelAssignment, d: DesiredState) -> None:
        """The desired state names this model at ``a``: start an update when one is due (agent.py's rule)."""
        self.config, self.identity, self.cp = self.agent.config, self.agent.identity, self.agent.cp
        self.desired = DesiredState(
            device_id=d.device_id,
            model=a.model,
            version=a.version,
            target=a.target,
            package_sha256=a.package_sha256,
            rollout_id=a.rollout_id,
            pinned=a.pinned,
            config=d.config,
            repository_url=d.repository_url,
        )
        want = self.desired
        busy = self._update_task is not None
        if self.pipeline.retry_due(want) and should_update(self.state, want, busy):
            self._update_task = asyncio.get_running_loop().create_task(self._update(want))

    async def _update(self, d: DesiredState) -> None:
        try:
            async with self.agent.update_lock:  # one download and TUF refresh at a time on the device
                await self.pipeline.run(d)
        except Offline as err:
            log.warning("update of %s: %s", self.name, err)
        finally:
            self._update_task = None

    def status(self) -> ModelStatus:
        info = self.service.info
        reason = self.state.reason
        return ModelStatus(
            model=self.name,
            state=self.state.state,
            version=info.version if info is not None and self.service.ready else None,
            reason=reason[:2000] if reason else None,
        )

    # ------------------------------------------------------------------ UpdateHost

    def save(self, s: PersistedState) -> None:
        self.store.save(s)
        self.state = s

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
        self.agent.event(
            kind,
            reason,
            model or self.name,
            version,
            rollout_id,
            bytes_downloaded=bytes_downloaded,
            delta_from=delta_from,
        )

    def spec(self, slot: SlotInfo) -> WorkerSpec:
        return WorkerSpec(
            self.slots.path(slot.slot),
            self.key_for(self.slots.path(slot.slot)),
            memory_mb=self.settings.memory_mb,
            intra_op_threads=self.settings.intra_op_threads,
        )

    def key_for(self, package: Path) -> Path | None:
        return self.agent.key_for(package)

    async def start_backend(self, spec: WorkerSpec) -> tuple[Backend, ModelInfo]:
        backend = self.agent.backend_factory(spec, self._on_crash)
        try:
            info = await backend.start()
        except BaseException:
            await backend.stop()
            raise
        return backend, info

    async def close_window_before_switch(self) -> None:
        try:
            await self._drift_and_close()
        except Exception:
            log.exception("the telemetry window of %s before the switch could not be closed", self.name)

    async def switch_to(self, backend: Backend, info: ModelInfo, probation: ProbationStats) -> None:
        self._probation = probation
        self._probation_crash = None
        self.service.listener = probation.observe
        await self._swap_backend(backend, info, close=False)

    # ------------------------------------------------------------------ serving

    def _on_crash(self, reason: str) -> None:
        self.service.metrics.crashes.inc()
        if self._probation is not None:
            self._probation.crash_times.append(self.clock.monotonic())
            self._probation_crash = reason
        a = self.state.active
        self.event(EventKind.worker_crashed, reason, self.name, a.version if a else None, a.rollout_id if a else None)

    async def _serve_slot(self, slot: SlotInfo) -> bool:
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
        old = self.backend
        if old is not None and close:
            await self.close_window_before_switch()
        self.backend = new
        self._counted = (0, 0)
        if new is not None and info is not None:
            self.service.set_backend(new, info)
        else:
            self.service.clear(reason)
        if old is not None:
            await old.stop()

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
                self._commit(decision.reason)
            elif decision.action == "rollback":
                reason = decision.reason
                if stats.crash_times and self._probation_crash and self._probation_crash not in reason:
                    reason = f"{reason}; the worker crashed: {self._probation_crash}"
                await self._rollback(reason)

    def _commit(self, reason: str) -> None:
        s = self.state
        a = s.active
        self._probation = None
        self.service.listener = None
        self.save(committed(s))
        self.slots.clear_downloads()
        self.event(EventKind.committed, reason, self.name, a.version if a else None, a.rollout_id if a else None)
        log.info("committed %s: %s", a.target if a else None, reason)

    async def _rollback(self, reason: str) -> None:
        s = self.state
        a = s.active
        self._probation = None
        self.service.listener = None
        self.save(rolled_back(s, reason))
        self.event(EventKind.rolled_back, reason, self.name, a.version if a else None, a.rollout_id if a else None)
        log.warning("rolled back %s: %s", a.target if a else None, reason)
        if s.committed is not None:
            await self._serve_slot(s.committed)
        else:
            await self._swap_backend(None, None, reason)

    # ------------------------------------------------------------------ telemetry

    async def _telemetry_loop(self) -> None:
        while True:
            await self.clock.sleep(self.config.telemetry_interval_s)
            try:
                await self._drift_and_close()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("closing a telemetry window of %s failed", self.name)

    def _cut_window(self) -> TelemetryWindow:
        b = self.backend
        crashes, restarts = (b.crashes, b.restarts) if b else self._counted
        d_crash, d_restart = max(0, crashes - self._counted[0]), max(0, restarts - self._counted[1])
        self._counted = (crashes, restarts)
        info = self.service.info
        return self.service.window.close(
            model=info.name if info else self.name,
            version=info.version if info else None,
            model_sha256=info.model_sha256 if info else None,
            restarts=d_restart,
            crashes=d_crash,
            worker_rss=b.rss_bytes() if b else None,
            drift=[],
        )

    def _keep(self, w: TelemetryWindow, drift: list[DriftSummary]) -> None:
        if drift:
            try:
                w = TelemetryWindow(**{**w.model_dump(), "drift": drift})
            except ValueError as err:
                log.warning("telemetry window of %s sent without drift: %s", self.name, str(err)[:300])
        if w.requests or w.worker_crashes or w.worker_restarts or w.version is not None:
            self.agent.keep_window(w)

    async def _drift_and_close(self) -> None:
        b = self.backend
        what = f"telemetry window of {self.name}"
        got = None if b is None else await cut_with_drift(b.drift, self._cut_window, what)
        self._keep(*(got or (self._cut_window(), [])))
