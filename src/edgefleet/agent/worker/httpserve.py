"""The inference worker serves the OIP HTTP port itself (ADR 0032): no agent → worker hop on the hot path.

The agent owns the listening socket and hands it over the control socket pair (``("serve",)`` with SCM_RIGHTS)
once the worker is the active backend; from then on this loop accepts and answers ``infer``, health and
metadata requests with the agent's own HTTP protocol (``httpserver.HTTPProtocol``) and OIP app (``oip.OIPApp``,
the same strict parsing and encoding), over :class:`WorkerService`. The agent stops accepting while a worker
serves, and resumes the moment the control socket closes (a crash, a kill), answering 503 until a restarted
worker is ready.

What the agent needs per request (counts by outcome, latency sketch, Prometheus histograms, probation) is
collected here as ``(outcome, total_s, compute_s)`` and shipped as ``("stats", [...])`` frames every
:data:`FLUSH_S` seconds or :data:`FLUSH_N` requests, never per request; ``("flush",)`` and ``("drift",)`` from
the agent ship what is pending at once, before their answer (a telemetry window closes as the drift answer is
read, so its counts and its drift histograms cover exactly the same requests). ``/metrics`` is rendered by the
agent, which holds the registry: the worker ships its pending stats, then asks (``("metrics",)``).

This runs in the lean worker: the standard library's ``selectors``, no asyncio (whose import maps OpenSSL and
costs ~7 MB of RSS here) — a small non-blocking transport gives ``HTTPProtocol`` what it uses. The HTTP limits
are the agent's (``httpserver.HTTPLimits``, sent with ``serve``): the same caps, timeouts (checked every
``tick_s``), connection limit and accept back-off as the agent's own server.
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np

from edgefleet.agent.codec import BadRequest
from edgefleet.agent.feedback import FEEDBACK
from edgefleet.agent.frames import encode
from edgefleet.agent.frames import take as take_frames
from edgefleet.agent.httpserver import (
    ACCEPT_BACKOFF,
    Handler,
    HTTPLimits,
    HTTPProtocol,
    accept_burst,
    refuse_connection,
)
from edgefleet.agent.oip import OIPApp
from edgefleet.agent.serving import Done
from edgefleet.agent.shm import ShmRegistry
from edgefleet.agent.worker.main import answer_all

__all__ = ["FLUSH_N", "FLUSH_S", "HTTPLoop", "WorkerService", "serve_http", "serve_plain"]

FLUSH_S = 0.05
FLUSH_N = 256
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_HIGH_WATER = 256 * 1024
_RECV = 256 * 1024
_ACCEPT = "accept"  # the key data of a listening socket

# (outcome, total_s, compute_s) of a request, or (feedback.FEEDBACK, predicted, label) of ground truth
Observation = tuple[str, Any, Any]


class _Transport:
    """What ``HTTPProtocol`` uses of an asyncio transport, over a non-blocking socket in a selectors loop."""

    def __init__(self, loop: HTTPLoop, sock: socket.socket, protocol: HTTPProtocol) -> None:
        self.loop = loop
        self.sock = sock
        self.protocol = protocol
        self.out = bytearray()
        self.closing = False
        self.closed = False
        self.eof = False  # write_eof: shut the write side once the buffer is sent
        self.reading = True
        self.write_paused = False
        self.events = 0
        loop.transports.add(self)
        protocol.connection_made(self)
        self._update()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        if self.closing or self.eof:
            return
        if not self.out:
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._finish()
                return
            if n == len(data):
                return
            data = data[n:]
        self.out += data
        self._update()
        if len(self.out) > _HIGH_WATER and not self.write_paused:
            self.write_paused = True
            self.protocol.pause_writing()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self.closing or self.eof:
            return
        self.eof = True
        if not self.out:
            self._shutdown()

    def _shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._finish()

    def abort(self) -> None:
        self.out.clear()
        self._finish()

    def pause_reading(self) -> None:
        self.reading = False
        self._update()

    def resume_reading(self) -> None:
        self.reading = True
        self._update()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.out:
            self._update()
        else:
            self._finish()

    def on_event(self, mask: int) -> None:
        if mask & _WRITE:
            self._send_buffered()
        if mask & _READ and not self.closing:
            try:
                data = self.sock.recv(_RECV)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._finish()
                return
            if not data:
                self._finish()
                return
            self.protocol.data_received(data)

    def _send_buffered(self) -> None:
        try:
            n = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._finish()
            return
        del self.out[:n]
        if not self.out:
            if self.closing:
                self._finish()
                return
            if self.eof:
                self._shutdown()
            if self.write_paused:
                self.write_paused = False
                self.protocol.resume_writing()
        self._update()

    def _update(self) -> None:
        if self.closed:
            return
        ev = (_READ if self.reading and not self.closing else 0) | (_WRITE if self.out else 0)
        if ev == self.events:
            return
        sel = self.loop.sel
        if self.events == 0:
            sel.register(self.sock, ev, self)
        elif ev == 0:
            sel.unregister(self.sock)
        else:
            sel.modify(self.sock, ev, self)
        self.events = ev

    def _finish(self) -> None:
        if self.closed:
            return
        self.closing = True
        if self.events:
            self.loop.sel.unregister(self.sock)
            self.events = 0
        self.closed = True
        self.sock.close()
        self.loop.transports.discard(self)
        self.protocol.connection_lost(None)


class HTTPLoop:
    """Accepting on listening sockets and serving their connections with ``handle``, in a selectors loop; other
    descriptors registered on :attr:`sel` come back to the caller of :meth:`wait`. :func:`serve_http` runs it with
    the OIP app and the control socket; :func:`serve_plain` with any handler alone (the benchmark's null floor runs
    exactly this loop, benchmarks/agent_overhead.py)."""

    def __init__(self, listens: list[socket.socket], handle: Handler, limits: HTTPLimits) -> None:
        self.sel = selectors.DefaultSelector()
        self.transports: set[_Transport] = set()
        self.listens = listens
        self.handle = handle
        self.limits = limits
        self.tick = limits.tick_s
        self.next_sweep = time.monotonic() + self.tick
        self.backoff = 0.0
        self.resume_at = 0.0  # accepting paused (EMFILE and the like) until then; 0: accepting
        for s in listens:
            s.setblocking(False)
            self.sel.register(s, _READ, _ACCEPT)

    def wait(self, wake: float = 0.0) -> list[selectors.SelectorKey]:
        """Wait for events (until ``wake`` at the latest, a monotonic time; 0: none of the caller's), serve those
        of connections and listening sockets, and return the keys of the caller's own descriptors that are ready."""
        if self.transports:
            wake = min(wake or self.next_sweep, self.next_sweep)
        if self.resume_at:
            wake = min(wake or self.resume_at, self.resume_at)
        timeout = max(0.0, wake - time.monotonic()) if wake else None
        other: list[selectors.SelectorKey] = []
        for key, mask in self.sel.select(timeout):
            data = key.data
            if data.__class__ is _Transport:
                data.on_event(mask)
            elif data is _ACCEPT:
                self._accept(key.fileobj)  # type: ignore[arg-type]
            else:
                other.append(key)
        return other

    def housekeeping(self, now: float) -> None:
        """Resume accepting after a back-off; enforce the connections' deadlines every :attr:`tick`."""
        if self.resume_at and now >= self.resume_at:
            self.resume_at = 0.0
            for s in self.listens:
                self.sel.register(s, _READ, _ACCEPT)
        if now >= self.next_sweep:
            self.next_sweep = now + self.tick
            for t in list(self.transports):
                t.protocol.check(now)

    def _take(self, conn: socket.socket) -> None:
        if len(self.transports) >= self.limits.max_connections:
            refuse_connection(conn, self.limits.max_connections)
            return
        conn.setblocking(False)
        _Transport(self, conn, HTTPProtocol(self.handle, None, self.limits))

    def _accept(self, sock: socket.socket) -> None:
        err = accept_burst(sock, self._take, 16)
        if err is None:
            self.backoff = 0.0
            return
        # No descriptors (or buffers) now: the socket stays readable, so retrying at once would spin.
        self.backoff = min(ACCEPT_BACKOFF[1], self.backoff * 2) if self.backoff else ACCEPT_BACKOFF[0]
        self.resume_at = time.monotonic() + self.backoff
        for s in self.listens:
            self.sel.unregister(s)

    def stop_accepting(self) -> None:
        for s in self.listens:
            if not self.resume_at:
                self.sel.unregister(s)
            s.close()

    def close(self, grace_s: float = 1.0) -> None:
        """Close every connection, sending what each still has buffered for up to ``grace_s``."""
        for t in list(self.transports):
            t.close()
        deadline = time.monotonic() + grace_s
        while any(t.out for t in self.transports) and time.monotonic() < deadline:
            for key, mask in self.sel.select(0.05):
                if isinstance(key.data, _Transport):
                    key.data.on_event(mask)


def serve_plain(listens: list[socket.socket], handle: Handler, limits: HTTPLimits) -> None:
    """Serve ``handle`` on ``listens`` in an :class:`HTTPLoop` until interrupted."""
    loop = HTTPLoop(listens, handle, limits)
    try:
        while True:
            loop.wait()
            loop.housekeeping(time.monotonic())
    finally:
        loop.stop_accepting()
        loop.close()


class WorkerService:
    """The worker's :class:`~edgefleet.agent.serving.Serving` (the agent's is ``service.InferenceService``): the
    model runs in this process, per-request facts are batched to the agent."""

    def __init__(
        self,
        ctrl: socket.socket,
        info: dict[str, Any],
        run: Callable[[dict[str, Any], list[str] | None], dict[str, Any]],
        input_errors: tuple[type[BaseException], ...],
        after: Callable[[dict[str, Any], dict[str, Any]], None] | None,
    ) -> None:
        self.ctrl = ctrl
        # the fields of worker.ModelInfo, whose defaults the lean worker does not send
        self.info = SimpleNamespace(**{"platform": "onnxruntime", "metrics": {}, "has_golden": False, **info})
        self.unavailable_reason = ""
        self.run = run
        self.input_errors = input_errors
        self.after = after
        self.observations: list[Observation] = []
        self.deadline = 0.0
        self.metrics_waiting: deque[Callable[[bytes], None]] = deque()
        # Hybrid routing (ADR 0105): the package's confidence step ({"tensor", "below", "axis"}, worker.serve), whether
        # the agent's policy wants low-confidence answers (its "routing" frame), and the answers handed over to it.
        self.confidence: dict[str, Any] | None = info.get("confidence")
        self.route_confidence = False
        self.handed: dict[int, tuple[Done, dict[str, Any], float]] = {}
        self._token = 0
        # Shared memory regions, mapped here (agent/shm.py); a change made through this worker's API goes to the
        # agent, which keeps the records for the next worker.
        self.shm = ShmRegistry(mapped=True)
        self.shm.on_change = lambda change: ctrl.sendall(encode(("shm", change)))

    @property
    def ready(self) -> bool:
        return True  # a model is loaded and serving: this loop runs only then

    def record(self, outcome: str, total: float | None, compute: float = 0.0) -> None:
        obs = self.observations
        if not obs:
            self.deadline = time.monotonic() + FLUSH_S
        obs.append((outcome, total, compute))
        if len(obs) >= FLUSH_N:
            self.flush()

    def record_feedback(self, predicted: str | None, label: str) -> None:
        """Ground truth matched (or not: ``predicted`` None) to a request: shipped with the stats, so it lands in
        the telemetry window of the version that answered (agent/feedback.py)."""
        obs = self.observations
        if not obs:
            self.deadline = time.monotonic() + FLUSH_S
        obs.append((FEEDBACK, predicted, label))
        if len(obs) >= FLUSH_N:
            self.flush()

    def flush(self) -> None:
        if self.observations:
            batch, self.observations = self.observations, []
            self.ctrl.sendall(encode(("stats", batch)))

    def submit(self, feeds: dict[str, Any], outputs: list[str] | None, done: Done) -> None:
        t0 = time.perf_counter()
        try:
            result = self.run(feeds, outputs)
        except self.input_errors as err:
            done(None, 0.0, BadRequest(str(err), 400))
            return
        except MemoryError:
            os._exit(137)  # the emulated device ran out of memory: a crash, not an error answer
        except Exception as err:
            done(None, 0.0, BadRequest(f"{type(err).__name__}: {err}", 500))
            return
        compute = time.perf_counter() - t0
        if not (self.route_confidence and self._hand_over(feeds, outputs, result, compute, done)):
            done(result, compute, None)  # the answer is written from here
        if self.after is not None:
            self.after(feeds, result)  # drift, after the answer; raw inputs never leave this process

    def _hand_over(
        self, feeds: dict[str, Any], outputs: list[str] | None, result: dict[str, Any], compute: float, done: Done
    ) -> bool:
        """A local answer under the package's confidence threshold goes to the agent, which may ask the remote
        endpoint (its budget, its client); this loop never waits on the network. True: handed over."""
        c = self.confidence
        probs = result.get(c["tensor"]) if c else None
        if c is None or probs is None:
            return False
        try:
            top = float(np.min(np.max(probs, axis=c.get("axis", -1))))
        except (TypeError, ValueError):
            return False
        if not top < c["below"]:
            return False
        self._token += 1
        self.handed[self._token] = (done, result, compute)
        meta = {"outputs": outputs, "confidence": top, "threshold": c["below"]}
        self.ctrl.sendall(encode(("remote", self._token, feeds, meta)))
        return True

    def remote_answered(self, msg: tuple[Any, ...]) -> None:
        """The agent's answer to a handed-over request: the remote's outputs, or "local" (budget spent, remote
        unreachable, policy changed): the local answer goes out then."""
        entry = self.handed.pop(msg[1], None)
        if entry is None:
            return
        done, result, compute = entry
        meta = msg[3]
        if meta.get("route") == "remote":
            via = (str(meta.get("model_name", "")), str(meta.get("model_version", "")))
            done(msg[2], compute, None, via)  # type: ignore[call-arg]  # OIPApp's done takes the remote's name
        else:
            done(result, compute, None)

    def render_metrics(self, reply: Callable[[bytes], None]) -> None:
        self.flush()  # the agent counts what was answered so far before it renders
        self.metrics_waiting.append(reply)
        self.ctrl.sendall(encode(("metrics",)))


def serve_http(
    ctrl: socket.socket,
    listen: socket.socket,
    buf: bytearray,
    view: memoryview,
    answer: Callable[[tuple[Any, ...]], tuple[bytes | None, tuple[dict[str, Any], dict[str, Any]] | None]],
    run: Callable[[dict[str, Any], list[str] | None], dict[str, Any]],
    input_errors: tuple[type[BaseException], ...],
    after: Callable[[dict[str, Any], dict[str, Any]], None] | None,
    info: dict[str, Any],
    limits: HTTPLimits,
    more: list[socket.socket] | None = None,
    regions: Any = None,
) -> None:
    """Accept on ``listen`` (and ``more``: the Unix socket) and answer frames on ``ctrl`` (``buf``: frames already
    read; ``view``: the receive buffer, reused) until EOF or stop. ``regions``: the agent's shared memory regions,
    mapped here before the first request (one that cannot be is unregistered on the agent's side too)."""
    svc = WorkerService(ctrl, info, run, input_errors, after)
    for region in regions if isinstance(regions, list) else []:
        lost = svc.shm.apply(region)
        if lost is not None:
            ctrl.sendall(encode(("shm", {"op": "unregister", "name": lost})))
    loop = HTTPLoop([listen, *(more or [])], OIPApp(svc, limits=limits).handle, limits)
    loop.sel.register(ctrl, _READ, "ctrl")

    def special(msg: tuple[Any, ...]) -> bytes | None:
        if msg[0] == "remote":  # the agent's answer to a request handed over (hybrid routing)
            svc.remote_answered(msg)
            return b""
        if msg[0] == "routing":
            svc.route_confidence = bool(msg[1].get("confidence"))
            return encode(("ok", None, 0.0))
        if msg[0] == "metrics":
            if svc.metrics_waiting:
                svc.metrics_waiting.popleft()(msg[1])
            return b""
        if msg[0] == "flush":
            svc.flush()  # the stats frame goes before this answer: the agent counts them first
            return encode(("ok", None, 0.0))
        if msg[0] == "shm":  # registered or unregistered through the agent: no answer
            lost = svc.shm.apply(msg[1])
            if lost is not None:  # the object went away meanwhile: the agent forgets the region too
                ctrl.sendall(encode(("shm", {"op": "unregister", "name": lost})))
            return b""
        if msg[0] == "drift":
            # The same cut for counts and histograms: the requests whose drift this answer holds are shipped
            # before it, so the agent closes the telemetry window on exactly them. The handler answers.
            svc.flush()
        return None

    def control() -> bool:
        """Answer the complete frames in ``buf``; False: stop serving."""
        return answer_all(ctrl, take_frames(buf), answer, after, special)

    try:
        running = control()
        while running:
            for _key in loop.wait(svc.deadline if svc.observations else 0.0):  # only the control socket is ours
                n = ctrl.recv_into(view)
                if n == 0:
                    running = False  # the agent is gone: so is this worker (and its hold on the port)
                    break
                buf += view[:n]
                if not control():
                    running = False
                    break
            now = time.monotonic()
            if svc.observations and now >= svc.deadline:
                svc.flush()
            loop.housekeeping(now)
    finally:
        # A graceful stop (a switch, shutdown): no more accepting, answered requests counted, connections closed.
        loop.stop_accepting()
        svc.shm.close()
        for t in list(loop.transports):
            t.close()
        try:
            svc.flush()
        except OSError:
            pass
        loop.close()
