"""The serving side shared by the OIP app and the agent: which backend serves, the bounded request queue,
and the per-request bookkeeping (Prometheus, telemetry window, probation listener)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.agent.backend import Backend, InputError
from edgefleet.agent.codec import BadRequest
from edgefleet.agent.feedback import FEEDBACK
from edgefleet.agent.frames import FrameError
from edgefleet.agent.metrics import AgentMetrics
from edgefleet.agent.routing import Facts, Policy
from edgefleet.agent.serving import Done
from edgefleet.agent.shm import ShmRegistry
from edgefleet.agent.telemetry import WindowAccumulator
from edgefleet.agent.worker.spec import ModelInfo
from edgefleet.errors import ModelError, RemoteUnavailable, WorkerUnavailable

if TYPE_CHECKING:
    from edgefleet.agent.httpserver import HTTPServer
    from edgefleet.agent.remote import RemoteRouter

__all__ = ["InferenceService"]

Listener = Callable[[str, float | None], None]


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
        self.http_more: list[HTTPServer] = []  # the Unix socket listener (agent/uds.py), handed over with the port
        # Shared memory regions (agent/shm.py): the records outlive any worker; each is sent them with ``serve``.
        self.shm = ShmRegistry(mapped=False)
        # Hybrid edge/cloud routing (agent/routing.py, agent/remote.py, ADR 0105): None while every request is local.
        self.router: RemoteRouter | None = None
        self.rolling_back = False  # probation failed; the committed version is not serving yet
        self._routed: set[Any] = set()  # the workers serving the port now, told the policy (confidence or not)
        # Several models (ADR 0108): while held, no backend is handed the listening sockets; the agent answers and
        # routes every request by the model it names.
        self.held = False

    def attach_http(self, server: HTTPServer, *more: HTTPServer) -> None:
        """The agent's HTTP server (and ``more``: its Unix socket one): a backend that can serve the listening
        sockets itself (a worker :class:`~edgefleet.agent.supervisor.Supervisor`) is handed them (ADR 0032)."""
        self.http = server
        self.http_more = list(more)
        if self.backend is not None:
            self._delegate(self.backend)

    def hold_http(self, on: bool) -> None:
        """Keep the listening sockets in the agent (``on``), or hand them to the backend serving now. A worker that
        serves them already keeps them until it stops: the caller starts a fresh one."""
        self.held = on
        if not on and self.backend is not None:
            self._delegate(self.backend)

    def _delegate(self, backend: Backend) -> None:
        if self.http is not None and not self.held:
            # The worker serves under the agent's HTTP limits: it refuses exactly what the agent would.
            servers = [self.http, *self.http_more]

            def serving(owner: object, on: bool) -> None:
                for server in servers:
                    server.delegated(owner, on)
                self._worker_serving(owner, on)

            socks = [s.sock for s in servers]
            backend.delegate_http(socks, serving, self.record_many, self.metrics.render, self.http.limits, self.shm)

    def set_backend(self, backend: Backend, info: ModelInfo) -> None:
        self.backend, self.info = backend, info
        if self.http is not None:
            self._delegate(backend)

    def clear(self, reason: str) -> None:
        self.backend, self.info = None, None
        self.unavailable_reason = reason

    def suspend(self, reason: str) -> None:
        """No backend for now, the model's interface kept: requests still parse, and routing may answer them
        remotely (a rollback under hybrid routing, ADR 0105)."""
        self.backend = None
        self.unavailable_reason = reason

    @property
    def ready(self) -> bool:
        return self.backend is not None

    def render_metrics(self, reply: Callable[[bytes], None]) -> None:
        reply(self.metrics.render())

    def record_many(self, observations: list[tuple[str, float | None, float]], info: ModelInfo | None) -> None:
        """Requests a worker answered itself, shipped in a batch (ADR 0032): counted exactly as :meth:`record`."""
        for outcome, total, compute in observations:
            if outcome == FEEDBACK:  # ground truth, not a request: (FEEDBACK, predicted, label)
                self.record_feedback(total, compute)  # type: ignore[arg-type]
                continue
            self.record(outcome, total, compute, info)

    def record_feedback(self, predicted: str | None, label: str) -> None:
        """Ground truth for a request, matched to its prediction or not (``predicted`` None): into the window."""
        self.window.observe_feedback(predicted, label)

    def record(self, outcome: str, total: float | None, compute: float = 0.0, info: ModelInfo | None = None) -> None:
        info = info or self.info
        model, version = (info.name, info.version) if info else ("none", "none")
        if outcome == "ok|remote":  # answered by the remote endpoint: not the local model's latency nor probation's
            if total is not None:
                self.metrics.observe_remote(model, version, total)
            self.metrics.count(model, version, "ok", "remote")
            self.window.remote_requests += 1
            return
        if total is not None and outcome == "ok":
            self.metrics.observe(model, version, total, max(0.0, total - compute), compute)
        self.metrics.count(model, version, outcome)
        self.window.observe(outcome, total)
        if self.listener is not None:
            self.listener(outcome, total)

    # ------------------------------------------------------------------ hybrid routing (ADR 0105)

    def set_routing(self, policy: Policy) -> None:
        """The routing policy in force from now on (the group's config document, or the standalone flags)."""
        old = self.router
        if old is not None and old.policy == policy:
            return
        self.router = None
        if policy.remote:
            from edgefleet.agent.remote import RemoteRouter  # httpx: only on a device that routes

            self.router = RemoteRouter(policy, self._count_unsent)
        if old is not None:
            self._spawn(old.aclose())
        for w in list(self._routed):
            self._tell(w)

    def _count_unsent(self, reason: str) -> None:
        self.metrics.remote_unsent.labels(reason).inc()
        self.window.remote_unsent += 1

    def _worker_serving(self, w: Any, on: bool) -> None:
        if not on:
            self._routed.discard(w)
            return
        self._routed.add(w)
        w.on_remote = self.remote_from_worker
        self._tell(w)

    def _tell(self, w: Any) -> None:
        """Tell a serving worker whether to hand over its low-confidence answers (only under ``confidence``)."""
        confidence = self.router is not None and self.router.policy.policy == "confidence"
        with contextlib.suppress(Exception):  # a worker gone meanwhile: its successor is told when it serves
            w.submit(("routing", {"confidence": confidence}), lambda reply, err: None)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def remote_from_worker(self, msg: tuple[Any, ...], reply: Callable[[tuple[Any, ...]], None]) -> None:
        """A worker's low-confidence answer, handed over: decide (policy, budget), ask the remote, and answer the
        worker with the remote's outputs, or "local" for it to send its own."""
        token, feeds, meta = msg[1], msg[2], msg[3]
        router = self.router
        if router is None:
            reply(("remote", token, {}, {"route": "local", "reason": "routing is local only"}))
            return
        conf, thr = meta.get("confidence"), meta.get("threshold")
        facts = Facts(
            confidence=float(conf) if isinstance(conf, int | float) else None,
            threshold=float(thr) if isinstance(thr, int | float) else None,
            queue_limit=self.queue_size,
        )
        r = router.decide(facts)
        if r.to != "remote":
            reply(("remote", token, {}, {"route": "local", "reason": r.reason}))
            return
        outputs = meta.get("outputs") if isinstance(meta.get("outputs"), list) else None
        model = self.info.name if self.info is not None else ""

        async def ask() -> None:
            try:
                ans = await router.infer(model, feeds, outputs)
            except RemoteUnavailable as err:
                reply(("remote", token, {}, {"route": "local", "reason": str(err)}))
                return
            doc = {"route": "remote", "model_name": ans.model_name or model, "model_version": ans.model_version}
            try:
                reply(("remote", token, ans.outputs, doc))
            except FrameError as err:  # an output a frame cannot carry: the local answer goes out
                reply(("remote", token, {}, {"route": "local", "reason": str(err)}))

        self._spawn(ask())

    def _route_here(
        self, router: RemoteRouter, feeds: dict[str, np.ndarray], outputs: list[str] | None, done: Done
    ) -> bool:
        """A request the agent itself took (no worker serves the port, or an in-process backend): True when routing
        answered it (remote, or a 503 naming why nothing could)."""
        backend = self.backend
        up = backend is not None and backend.up  # a Supervisor between two workers is not
        facts = Facts(worker_up=up, queued=self._in_flight, queue_limit=self.queue_size, rolling_back=self.rolling_back)
        r = router.decide(facts)
        if r.to == "local":
            return False
        if r.to == "none":
            done(None, 0.0, BadRequest(f"no model is serving locally ({self.unavailable_reason}): {r.reason}", 503))
            return True
        model = self.info.name if self.info is not None else ""

        async def ask() -> None:
            try:
                ans = await router.infer(model, feeds, outputs)
            except RemoteUnavailable as err:
                local = self.backend is not None and not self.rolling_back and self._in_flight < self.queue_size
                if local and self.backend is not None and self.backend.up:
                    self._local(feeds, outputs, done)  # the local worker can still answer: it does
                else:
                    done(None, 0.0, BadRequest(f"{r.reason}, and the remote endpoint could not answer: {err}", 503))
                return
            done(ans.outputs, 0.0, None, (ans.model_name or model, ans.model_version))  # type: ignore[call-arg]

        self._spawn(ask())
        return True

    # ------------------------------------------------------------------ serving

    def submit(self, feeds: dict[str, np.ndarray], outputs: list[str] | None, done: Done) -> None:
        """Run one request and call ``done`` with the outcome (maybe before returning: a 503 answers at once).

        The hot path: the worker :class:`~edgefleet.agent.supervisor.Supervisor`'s ``submit`` calls back from the
        event-loop callback that read the worker's answer; an in-process :class:`Backend` answers from a task.
        Under a routing policy the request may go to the remote endpoint instead (ADR 0105); then ``done`` gets a
        fourth argument, the remote's ``(model, version)``.
        """
        router = self.router
        if router is not None and self._route_here(router, feeds, outputs, done):
            return
        self._local(feeds, outputs, done)

    def _local(self, feeds: dict[str, np.ndarray], outputs: list[str] | None, done: Done) -> None:
        backend = self.backend
        if backend is None:
            done(None, 0.0, BadRequest(f"no model is serving: {self.unavailable_reason}", 503))
            return
        if self._in_flight >= self.queue_size:
            done(None, 0.0, BadRequest(f"overloaded: {self._in_flight} requests queued (limit {self.queue_size})", 503))
            return
        self._in_flight += 1

        def finish(results: dict[str, Any] | None, compute: float, err: Exception | None) -> None:
            self._in_flight -= 1
            done(results, compute, None if err is None else _as_bad_request(err))

        try:
            backend.submit(feeds, outputs, finish)
        except Exception as err:  # no worker running right now
            finish(None, 0.0, err)

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
