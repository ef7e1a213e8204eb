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

from edgefleet.agent._worker_main import answer_all
from edgefleet.agent.codec import BadRequest
from edgefleet.agent.frames import encode
from edgefleet.agent.frames import take as take_frames
from edgefleet.agent.httpserver import ACCEPT_BACKOFF, HTTPLimits, HTTPProtocol, accept_burst, refuse_connection
from edgefleet.agent.oip import OIPApp

__all__ = ["FLUSH_N", "FLUSH_S", "WorkerService", "serve_http"]

FLUSH_S = 0.05
FLUSH_N = 256
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_HIGH_WATER = 256 * 1024
_RECV = 256 * 1024

Observation = tuple[str, float | None, float]
Done = Callable[[dict[str, Any] | None, float, BadRequest | None], None]


class _Transport:
    """What ``HTTPProtocol`` uses of an asyncio transport, over a non-blocking socket in a selectors loop."""

    def __init__(self, loop: _Loop, sock: socket.socket, protocol: HTTPProtocol) -> None:
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


class _Loop:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.transports: set[_Transport] = set()


class WorkerService:
    """The worker's side of what :class:`~edgefleet.agent.service.InferenceService` offers the OIP app: the model
    runs in this process, per-request facts are batched to the agent."""

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
        self.backend: object = self  # ready: a model is loaded and serving
        self.unavailable_reason = ""
        self.run = run
        self.input_errors = input_errors
        self.after = after
        self.observations: list[Observation] = []
        self.deadline = 0.0
        self.metrics_waiting: deque[Callable[[bytes], None]] = deque()

    def record(self, outcome: str, total: float | None, compute: float = 0.0) -> None:
        obs = self.observations
        if not obs:
            self.deadline = time.monotonic() + FLUSH_S
        obs.append((outcome, total, compute))
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
        done(result, time.perf_counter() - t0, None)  # the answer is written from here
        if self.after is not None:
            self.after(feeds, result)  # drift, after the answer; raw inputs never leave this process

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
) -> None:
    """Accept on ``listen`` and answer frames on ``ctrl`` (``buf``: frames already read; ``view``: the receive
    buffer, reused) until EOF or stop."""
    loop = _Loop()
    svc = WorkerService(ctrl, info, run, input_errors, after)
    handle = OIPApp(svc, limits=limits).handle
    listen.setblocking(False)
    loop.sel.register(listen, _READ, "accept")
    loop.sel.register(ctrl, _READ, "ctrl")
    tick = limits.tick_s
    next_sweep = time.monotonic() + tick
    backoff = 0.0
    resume_at = 0.0  # accepting paused (EMFILE and the like) until then; 0: accepting

    def take(conn: socket.socket) -> None:
        if len(loop.transports) >= limits.max_connections:
            refuse_connection(conn, limits.max_connections)
            return
        conn.setblocking(False)
        _Transport(loop, conn, HTTPProtocol(handle, None, limits))

    def accept() -> None:
        nonlocal backoff, resume_at
        err = accept_burst(listen, take, 16)
        if err is None:
            backoff = 0.0
            return
        # No descriptors (or buffers) now: the socket stays readable, so retrying at once would spin.
        backoff = min(ACCEPT_BACKOFF[1], backoff * 2) if backoff else ACCEPT_BACKOFF[0]
        resume_at = time.monotonic() + backoff
        loop.sel.unregister(listen)

    def special(msg: tuple[Any, ...]) -> bytes | None:
        if msg[0] == "metrics":
            if svc.metrics_waiting:
                svc.metrics_waiting.popleft()(msg[1])
            return b""
        if msg[0] == "flush":
            svc.flush()  # the stats frame goes before this answer: the agent counts them first
            return encode(("ok", None, 0.0))
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
            now = time.monotonic()
            wake = next_sweep if loop.transports else 0.0
            if svc.observations:
                wake = min(wake or svc.deadline, svc.deadline)
            if resume_at:
                wake = min(wake or resume_at, resume_at)
            timeout = max(0.0, wake - now) if wake else None
            for key, mask in loop.sel.select(timeout):
                data = key.data
                if isinstance(data, _Transport):
                    data.on_event(mask)
                elif data == "accept":
                    accept()
                else:
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
            if resume_at and now >= resume_at:
                resume_at = 0.0
                loop.sel.register(listen, _READ, "accept")
            if now >= next_sweep:
                next_sweep = now + tick
                for t in list(loop.transports):
                    t.protocol.check(now)
    finally:
        # A graceful stop (a switch, shutdown): no more accepting, answered requests counted, connections closed.
        if not resume_at:
            loop.sel.unregister(listen)
        listen.close()
        for t in list(loop.transports):
            t.close()
        try:
            svc.flush()
        except OSError:
            pass
        deadline = time.monotonic() + 1.0
        while any(t.out for t in loop.transports) and time.monotonic() < deadline:
            for key, mask in loop.sel.select(0.05):
                if isinstance(key.data, _Transport):
                    key.data.on_event(mask)
