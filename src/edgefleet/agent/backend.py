"""The small interface between the serving side (OIP app, telemetry, probation) and whatever runs the model.

:class:`~edgefleet.agent.supervisor.Supervisor` runs a real worker process; :class:`InProcessBackend` runs the
model in the caller's process, so a fleet simulator can share one loaded model among many lightweight agents.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from edgefleet.agent.worker.driftcount import DriftCounter
from edgefleet.agent.worker.spec import ModelInfo, WorkerSpec
from edgefleet.errors import InputValidationError, ModelError, WorkerUnavailable
from edgefleet.telemetry.drift import DriftSummary

__all__ = ["Answered", "Backend", "BackendFactory", "InProcessBackend", "InputError", "Samples"]


class InputError(WorkerUnavailable):
    """Raised by ``infer`` for a request the model refuses (a 400, not a crash)."""


# done(outputs, compute_seconds, error): exactly one of outputs and error is None.
Answered = Callable[[dict[str, Any] | None, float, Exception | None], None]
# on_samples(batch, info): inputs a worker sampled (agent/sampling.py)
Samples = Callable[[list[Any], ModelInfo | None], None]


class Backend(Protocol):
    """What runs a model for the service. Every capability is declared here, with a no-op (or the plain way) in a
    backend that lacks it: the service calls them, never probes for them (docs/adr/0106-agent-worker-process-
    boundary.md)."""

    info: ModelInfo | None
    crashes: int
    restarts: int

    async def start(self) -> ModelInfo: ...

    @property
    def up(self) -> bool:
        """A model can answer now: False only while a supervised worker is down between two processes (a request
        routing may send remotely instead, ADR 0105)."""
        ...

    def submit(self, feeds: dict[str, np.ndarray], outputs: list[str] | None, done: Answered) -> None:
        """Run one request; ``done`` gets its outcome (the worker's hot path calls it from the event-loop callback
        that read the answer; an in-process backend from a task). Raises WorkerUnavailable when nothing runs."""
        ...

    def delegate_http(
        self,
        listen: socket.socket | list[socket.socket],
        on_serving: Callable[[object, bool], None],
        on_stats: Callable[[list[Any], ModelInfo | None], None],
        render_metrics: Callable[[], bytes],
        limits: Any = None,
        shm: Any = None,
    ) -> None:
        """Serve the agent's listening sockets from the model's process from now on (ADR 0032), where it has one;
        a backend without one (in-process) keeps the agent's server answering: a no-op."""
        ...

    def sample_inputs(self, per_min: float, on_samples: Samples) -> None:
        """Sample served inputs at ``per_min`` a minute (0: off) into ``on_samples``; a no-op where the backend
        cannot (in-process)."""
        ...

    def mirror_requests(self, per_s: float, on_mirror: Samples) -> None:
        """Copy at most ``per_s`` answered requests a second (inputs and served outputs; 0: off) to ``on_mirror``
        for a shadow phase (agent/shadow.py); a no-op where the backend cannot (in-process)."""
        ...

    async def infer(self, feeds: dict[str, np.ndarray], outputs: list[str] | None) -> tuple[dict[str, Any], float]:
        """Outputs and compute seconds. Raises InputError (bad input), ModelError, WorkerUnavailable."""
        ...

    async def drift(self, at_answer: Callable[[], None] | None = None) -> list[DriftSummary]:
        """The histograms of the inputs served since the last call, which start afresh. ``at_answer()`` runs at
        the instant they are taken, in step with the per-request counts: the telemetry window closes there."""
        ...

    async def golden(self) -> dict[str, Any]: ...

    def rss_bytes(self) -> int | None: ...

    @property
    def in_flight(self) -> int: ...

    async def stop(self) -> None: ...


BackendFactory = Callable[[WorkerSpec, Callable[[str], None] | None], Backend]


class InProcessBackend:
    """Runs the model in this process (no isolation): for simulators and embedding, not for devices."""

    def __init__(self, spec: WorkerSpec, on_crash: Callable[[str], None] | None = None, model: Any = None) -> None:
        self.spec = spec
        self.info: ModelInfo | None = None
        self.crashes = 0
        self.restarts = 0
        self._model = model
        self._opened: Any = None
        self._drift: DriftCounter | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # submitted requests, held until answered

    async def load(self) -> tuple[Any, ModelInfo, Any, Any]:
        """Load the spec's model: ``(model, info, opened package or None, drift reference or None)``. A subclass
        that serves a model loaded elsewhere (one shared by many agents) overrides this; a WorkerUnavailable it
        raises is the start's failure as it stands."""
        from edgefleet.agent.worker.packaged import load

        return load(self.spec)

    async def start(self) -> ModelInfo:
        try:
            model, info, opened, reference = await self.load()
        except WorkerUnavailable:
            raise
        except Exception as err:
            raise WorkerUnavailable(f"cannot load {self.spec.path.name}: {err}")
        self._model = self._model or model
        self._opened = opened
        self._drift = DriftCounter(reference) if reference is not None else None
        self.info = info
        return info

    async def infer(self, feeds: dict[str, np.ndarray], outputs: list[str] | None) -> tuple[dict[str, Any], float]:
        if self._model is None:
            raise WorkerUnavailable("no model is loaded")
        t0 = time.perf_counter()
        try:
            result = self._model.run(feeds, outputs)
        except InputValidationError as err:
            raise InputError(str(err))
        except Exception as err:
            raise ModelError(f"inference failed: {err}")
        dt = time.perf_counter() - t0
        if self._drift is not None:
            # After the caller has answered: call_soon runs once the awaiting task's step (which writes the
            # response) has finished, so drift never delays a request here either.
            asyncio.get_running_loop().call_soon(self._drift.add, feeds, result)
        return result, dt

    @property
    def up(self) -> bool:
        return True

    def submit(self, feeds: dict[str, np.ndarray], outputs: list[str] | None, done: Answered) -> None:
        """Run :meth:`infer` in a task and hand its outcome to ``done``."""
        task = asyncio.get_running_loop().create_task(self._answer(feeds, outputs, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, feeds: dict[str, np.ndarray], outputs: list[str] | None, done: Answered) -> None:
        try:
            results, compute = await self.infer(feeds, outputs)
        except Exception as err:
            done(None, 0.0, err)
            return
        done(results, compute, None)

    def delegate_http(
        self,
        listen: socket.socket | list[socket.socket],
        on_serving: Callable[[object, bool], None],
        on_stats: Callable[[list[Any], ModelInfo | None], None],
        render_metrics: Callable[[], bytes],
        limits: Any = None,
        shm: Any = None,
    ) -> None:
        """No process to hand the sockets to: the agent's own server keeps answering."""

    def sample_inputs(self, per_min: float, on_samples: Samples) -> None:
        """Never samples: the inputs stay in this process (the simulator's, an embedding's)."""

    def mirror_requests(self, per_s: float, on_mirror: Samples) -> None:
        """Never mirrors: a shadow phase needs a serving worker process (agent/shadow.py)."""

    async def drift(self, at_answer: Callable[[], None] | None = None) -> list[DriftSummary]:
        await asyncio.sleep(0)  # the counts that infer calls answered just before scheduled land in this window
        if at_answer is not None:
            at_answer()
        if self._drift is None:
            return []
        try:
            return self._drift.summaries()
        finally:
            self._drift.reset()

    async def golden(self) -> dict[str, Any]:
        from edgefleet.agent.worker.packaged import golden

        if self._opened is None:
            raise ModelError("no golden vectors (not a package)")
        return golden(self._model, self._opened)

    def rss_bytes(self) -> int | None:
        return None

    @property
    def in_flight(self) -> int:
        return 0

    async def stop(self) -> None:
        self._model = None
