"""Lightweight agents: the real :class:`edgefleet.agent.Agent` (state machine, slots, TUF updater, probation,
telemetry buffer) hosted many to a process, with one shared in-process model per package instead of a worker
process each, and the device's link (:mod:`edgefleet.sim.link`) as its HTTP transport — to the control plane and
the TUF repository alike. All through the agent's injection points: its backend factory, transport and health
check.

What a shared model cannot do, it emulates, and says so: a worker crash (the ``crash`` fault) is an exception
on every call plus the agent's crash callback; a memory limit is an estimate (worker base + twice the model
bytes) checked when the model is loaded. Real process deaths come from the full agents (``edgefleet agent``).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from edgefleet.agent import Agent, ModelInfo, WorkerSpec
from edgefleet.agent.backend import InProcessBackend
from edgefleet.agent.edges import HealthCheck
from edgefleet.agent.healthcheck import HealthResult, check_latency
from edgefleet.agent.worker import packaged
from edgefleet.config import AgentSettings
from edgefleet.errors import WorkerUnavailable
from edgefleet.protocol import DeviceConfig, Hardware
from edgefleet.sim.link import LinkStats, SimLink
from edgefleet.sim.spec import DevicePlan

__all__ = ["SharedBackend", "SharedModels", "SimAgent", "shared_health_check"]

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
            info = packaged.package_info(opened, model, time.perf_counter() - t)
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

    async def load(self) -> tuple[Any, ModelInfo, Any, Any]:
        try:
            loaded = await self.pool.aload(self.spec.path)
        except Exception as err:
            raise WorkerUnavailable(f"cannot load {self.spec.path.name}: {err}")
        try:
            self.pool.check_memory(loaded, self.spec.memory_mb)
        except WorkerUnavailable as err:
            self._crash(str(err))
            raise
        return loaded.model, loaded.info, loaded.opened, loaded.opened.reference

    async def infer(self, feeds: dict[str, np.ndarray], outputs: list[str] | None) -> tuple[dict[str, Any], float]:
        if self.info is not None and self.info.version in self.pool.crash_versions.get(self.device, set()):
            self._crash(f"simulated chipset fault: {self.info.version} aborts the worker")
            raise WorkerUnavailable("the inference worker crashed (simulated)")
        return await super().infer(feeds, outputs)


def shared_health_check(pool: SharedModels) -> HealthCheck:
    """The agent's health check (golden vectors + latency budget) on ``pool``'s shared model, not a fresh worker:
    500 agents updating must not start 500 worker processes."""

    async def check(spec: WorkerSpec, budget_ms_for: Callable[[ModelInfo], float | None]) -> HealthResult:
        try:
            loaded = await pool.aload(spec.path)
            pool.check_memory(loaded, spec.memory_mb)
            golden = packaged.golden(loaded.model, loaded.opened)
        except Exception as err:
            return HealthResult(False, f"health check failed: {err}")
        ok, p95, why = check_latency(golden["latencies_s"], budget_ms_for(loaded.info))
        return HealthResult(ok, why if ok else f"health check failed: {why}", p95, loaded.info)

    return check


class SimAgent(Agent):
    """A real agent whose link is simulated, whose model is shared and whose hardware is its tier's."""

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
        self.link = SimLink(plan, stats, transport)
        t = plan.tier
        super().__init__(
            settings,
            backend_factory=lambda spec, on_crash: SharedBackend(spec, on_crash, pool, plan.index),
            transport=self.link,
            health_check=shared_health_check(pool),
            serve_http=False,
            config=config,
            hardware=Hardware(
                arch=t.arch, cpu_count=t.cpu_threads, memory_mb=plan.memory_mb, chipset=t.chipset, emulates=t.name
            ),
        )
