"""The serving side shared by the OIP app and the agent: which backend serves, the bounded request queue,
and the per-request bookkeeping (Prometheus, telemetry window, probation listener)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.agent.backend import Backend, InputError
from edgefleet.agent.codec import BadRequest
from edgefleet.agent.metrics import AgentMetrics
from edgefleet.agent.telemetry import WindowAccumulator
from edgefleet.agent.worker import ModelInfo
from edgefleet.errors import ModelError, WorkerUnavailable

if TYPE_CHECKING:
    from edgefleet.agent.httpserver import HTTPServer

__all__ = ["InferenceService"]

Listener = Callable[[str, float | None], None]
# done(outputs, compute_seconds, error): exactly one of outputs and error is None.
Done = Callable[[dict[str, Any] | None, float, BadRequest | None], None]


def _as_bad_request(err: Exception) -> BadRequest:
    if isinstance(err, InputError):
        return BadRequest(str(err), 400)
    if isinstance(err, ModelError):
        return BadRequest(str(err), 500)
    if isinstance(err, WorkerUnavailable):
        return BadRequest(str(err), 503)
    return BadRequest(f"internal error: {type(err).__name__}: {err}", 500)


class InferenceService:
    def __init__(self, *, queue_size: int = 64, metrics: AgentMetrics | None = None) -> None:
        self.queue_size = queue_size
        self.metrics = metrics or AgentMetrics()
        self.window = WindowAccumulator()
        self.backend: Backend | None = None
        self.info: ModelInfo | None = None
        self.unavailable_reason = "no model installed yet"
        self.listener: Listener | None = None
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.http: HTTPServer | None = None

    def attach_http(self, server: HTTPServer) -> None:
        """The agent's HTTP server: a backend that can serve its listening socket itself (a worker
        :class:`~edgefleet.agent.supervisor.Supervisor`) is handed it (ADR 0032)."""
        self.http = server
        if self.backend is not None:
            self._delegate(self.backend)

    def _delegate(self, backend: Backend) -> None:
        hand = getattr(backend, "delegate_http", None)
        if hand is not None and self.http is not None:
            # The worker serves under the agent's HTTP limits: it refuses exactly what the agent would.
            hand(self.http.sock, self.http.delegated, self.record_many, self.metrics.render, self.http.limits)

    def set_backend(self, backend: Backend, info: ModelInfo) -> None:
        self.backend, self.info = backend, info
        if self.http is not None:
            self._delegate(backend)

    def clear(self, reason: str) -> None:
        self.backend, self.info = None, None
        self.unavailable_reason = reason

    @property
    def ready(self) -> bool:
        return self.backend is not None

    def render_metrics(self, reply: Callable[[bytes], None]) -> None:
        reply(self.metrics.render())

    def record_many(self, observations: list[tuple[str, float | None, float]], info: ModelInfo | None) -> None:
        """Requests a worker answered itself, shipped in a batch (ADR 0032): counted exactly as :meth:`record`."""
        for outcome, total, compute in observations:
            self.record(outcome, total, compute, info)

    def record(self, outcome: str, total: float | None, compute: float = 0.0, info: ModelInfo | None = None) -> None:
        info = info or self.info
        model, version = (info.name, info.version) if info else ("none", "none")
        if total is not None and outcome == "ok":
            self.metrics.observe(model, version, total, max(0.0, total - compute), compute)
        self.metrics.count(model, version, outcome)
        self.window.observe(outcome, total)
        if self.listener is not None:
            self.listener(outcome, total)

    def submit(self, feeds: dict[str, np.ndarray], outputs: list[str] | None, done: Done) -> None:
        """Run one request and call ``done`` with the outcome (maybe before returning: a 503 answers at once).

        The hot path: a backend with ``submit`` (the worker :class:`~edgefleet.agent.supervisor.Supervisor`)
        calls back from the event-loop callback that read the worker's answer; any other :class:`Backend` runs
        in a task.
        """
        backend = self.backend
        if backend is None:
            done(None, 0.0, BadRequest(f"no model is serving: {self.unavailable_reason}", 503))
            return
        if self._in_flight >= self.queue_size:
            done(None, 0.0, BadRequest(f"overloaded: {self._in_flight} requests queued (limit {self.queue_size})", 503))
            return
        self._in_flight += 1
        fast = getattr(backend, "submit", None)
        if fast is None:
            task = asyncio.get_running_loop().create_task(self._run_task(backend, feeds, outputs, done))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return

        def finish(results: dict[str, Any] | None, compute: float, err: Exception | None) -> None:
            self._in_flight -= 1
            done(results, compute, None if err is None else _as_bad_request(err))

        try:
            fast(feeds, outputs, finish)
        except Exception as err:  # no worker running right now
            finish(None, 0.0, err)

    async def _run_task(
        self, backend: Backend, feeds: dict[str, np.ndarray], outputs: list[str] | None, done: Done
    ) -> None:
        try:
            results, compute = await backend.infer(feeds, outputs)
        except Exception as err:
            self._in_flight -= 1
            done(None, 0.0, _as_bad_request(err))
            return
        self._in_flight -= 1
        done(results, compute, None)

    async def infer(self, feeds: dict[str, np.ndarray], outputs: list[str] | None) -> tuple[dict[str, Any], float]:
        """Run one request. Raises BadRequest with the HTTP status to answer."""
        backend = self.backend
        if backend is None:
            raise BadRequest(f"no model is serving: {self.unavailable_reason}", 503)
        if self._in_flight >= self.queue_size:
            raise BadRequest(f"overloaded: {self._in_flight} requests queued (limit {self.queue_size})", 503)
        self._in_flight += 1
        try:
            return await backend.infer(feeds, outputs)
        except InputError as err:
            raise BadRequest(str(err), 400)
        except ModelError as err:
            raise BadRequest(str(err), 500)
        except WorkerUnavailable as err:
            raise BadRequest(str(err), 503)
        finally:
            self._in_flight -= 1
