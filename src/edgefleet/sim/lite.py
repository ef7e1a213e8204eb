"""Lightweight agents: the real :class:`edgefleet.agent.Agent` (state machine, slots, TUF updater, probation,
telemetry buffer) hosted many to a process, with one shared in-process model per package instead of a worker
process each, and the device's link (:mod:`edgefleet.sim.link`) as its HTTP transport.

What a shared model cannot do, it emulates, and says so: a worker crash (the ``crash`` fault) is an exception
on every call plus the agent's crash callback; a memory limit is an estimate (worker base + twice the model
bytes) checked when the model is loaded. Real process deaths come from the full agents (``edgefleet agent``).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

import edgefleet.agent.agent as agent_module
from edgefleet.agent import Agent, ModelInfo, WorkerSpec
from edgefleet.agent.backend import InProcessBackend
from edgefleet.agent.driftcount import DriftCounter
from edgefleet.agent.healthcheck import HealthResult, check_latency
from edgefleet.agent.worker import package_info
from edgefleet.config import AgentSettings
from edgefleet.errors import WorkerUnavailable
from edgefleet.protocol import DeviceConfig, Hardware
from edgefleet.sim.link import LinkStats, SimLink
from edgefleet.sim.spec import DevicePlan

__all__ = ["SharedModels", "SimAgent", "install_shared_health_check"]

WORKER_BASE_MB = 100  # a worker process with numpy + onnxruntime loaded, measured on this kind of machine


@dataclass
class _Loaded:
    model: Any
    info: ModelInfo
    opened: Any
    model_mb: float


class SharedModels:
    """One loaded model per package content, shared by every lightweight agent of the process."""

    def __init__(self) -> None:
        self._by_hash: dict[str, _Loaded] = {}
        self._hash_of: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) → content hash
        self._lock = threading.Lock()
        self.crash_versions: dict[int, set[str]] = {}  # device index → versions that crash its "worker"

    async def aload(self, path: Path) -> _Loaded:
        """:meth:`load` off the event loop: hashing and loading a large package takes seconds, and the loop
        serves every other agent of the process (and their keep-alive connections) meanwhile."""
        return await asyncio.to_thread(self.load, path)

    def load(self, path: Path) -> _Loaded:
        with self._lock:
            return self._load(path)

    def _load(self, path: Path) -> _Loaded:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        h = self._hash_of.get(key)
        if h is None:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            h = self._hash_of[key] = digest.hexdigest()
        hit = self._by_hash.get(h)
        if hit is None:
            from edgefleet.package import open_package

            t = time.perf_counter()
            opened = open_package(path)
            model = opened.load()
            info = package_info(opened, model, time.perf_counter() - t)
            hit = _Loaded(model, info, opened, len(opened.model_bytes) / 2**20)
            self._by_hash[h] = hit
        return hit

    def check_memory(self, loaded: _Loaded, memory_mb: int | None) -> None:
        need = WORKER_BASE_MB + 2 * loaded.model_mb
        if memory_mb is not None and need > memory_mb:
            raise WorkerUnavailable(
                f"the worker cannot load {loaded.info.name} {loaded.info.version}: needs about {need:.0f} MB, "
                f"the device has {memory_mb} MB (simulated out-of-memory)"
            )


class SharedBackend(InProcessBackend):
    """The agent's :class:`~edgefleet.agent.backend.Backend` over a shared model, with the simulated faults."""

    def __init__(self, spec: WorkerSpec, on_crash: Any, pool: SharedModels, device: int) -> None:
        super().__init__(spec, on_crash)
        self.on_crash, self.pool, self.device = on_crash, pool, device

    def _crash(self, reason: str) -> None:
        self.crashes += 1
        self.restarts += 1
        if self.on_crash is not None:
            self.on_crash(reason)

    async def start(self) -> ModelInfo:
        try:
            loaded = await self.pool.aload(self.spec.path)
        except Exception as err:
            raise WorkerUnavailable(f"cannot load {self.spec.path.name}: {err}")
        try:
            self.pool.check_memory(loaded, self.spec.memory_mb)
        except WorkerUnavailable as err:
            self._crash(str(err))
            raise
        self._model, self._opened, self.info = loaded.model, loaded.opened, loaded.info
        ref = loaded.opened.reference
        self._drift = DriftCounter(ref) if ref is not None else None
        return loaded.info

    async def infer(self, feeds: dict[str, np.ndarray], outputs: list[str] | None) -> tuple[dict[str, Any], float]:
        if self.info is not None and self.info.version in self.pool.crash_versions.get(self.device, set()):
            self._crash(f"simulated chipset fault: {self.info.version} aborts the worker")
            raise WorkerUnavailable("the inference worker crashed (simulated)")
        return await super().infer(feeds, outputs)


_POOL: SharedModels | None = None
_real_health_check = agent_module.run_health_check


async def _shared_health_check(spec: WorkerSpec, budget_ms_for: object, timeout_s: float = 120.0) -> HealthResult:
    """The agent's health check (golden vectors + latency budget) on the shared model, not a fresh worker."""
    assert _POOL is not None
    try:
        loaded = await _POOL.aload(spec.path)
        _POOL.check_memory(loaded, spec.memory_mb)
        from edgefleet.agent import worker

        golden = worker._golden(loaded.model, loaded.opened)
    except Exception as err:
        return HealthResult(False, f"health check failed: {err}")
    budget = budget_ms_for(loaded.info) if callable(budget_ms_for) else None
    ok, p95, why = check_latency(golden["latencies_s"], budget)
    return HealthResult(ok, why if ok else f"health check failed: {why}", p95, loaded.info)


def install_shared_health_check(pool: SharedModels) -> None:
    """In a process that hosts only lightweight agents, their pre-switch health check uses the shared model —
    500 agents updating must not start 500 worker processes. Full agents run in their own processes and are not
    affected."""
    global _POOL
    _POOL = pool
    agent_module.run_health_check = _shared_health_check


class SimAgent(Agent):
    """A real agent whose link is simulated and whose hardware is its tier's."""

    def __init__(
        self,
        plan: DevicePlan,
        settings: AgentSettings,
        *,
        pool: SharedModels,
        stats: LinkStats,
        transport: httpx.AsyncBaseTransport,
        config: DeviceConfig | None = None,
    ) -> None:
        self.plan = plan
        self._link = SimLink(plan, stats, transport)
        self._sim_cp: Any = None
        super().__init__(
            settings,
            backend_factory=lambda spec, on_crash: SharedBackend(spec, on_crash, pool, plan.index),
            serve_http=False,
            config=config,
        )

    # The agent creates its control-plane client inside its check-in loop; intercepting the attribute gives the
    # client this device's link without a hook in the agent.
    @property
    def cp(self) -> Any:
        return self._sim_cp

    @cp.setter
    def cp(self, client: Any) -> None:
        if client is not None:
            old = client.http
            client.http = httpx.AsyncClient(timeout=old.timeout, transport=self._link)
        self._sim_cp = client

    def _hardware(self) -> Hardware:
        t = self.plan.tier
        return Hardware(
            arch=t.arch, cpu_count=t.cpu_threads, memory_mb=self.plan.memory_mb, chipset=t.chipset, emulates=t.name
        )
