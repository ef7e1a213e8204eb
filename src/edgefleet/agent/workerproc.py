"""The agent's handle of an inference worker process: it starts one, speaks the frames, and learns it ended.

The worker is a separate process that loads one model and answers requests over a socket pair: a crash there (a
segfault in the runtime, an abort, the memory watchdog's SIGKILL) cannot take the agent down; the supervisor
restarts it. What runs inside that process is the ``agent/worker/`` package (its entry ``worker/main.py``, the
full package path ``worker/packaged.py``), which never imports this side (docs/adr/0106-agent-worker-process-
boundary.md); what both sides share is ``worker/spec.py`` (:class:`WorkerSpec`, :class:`ModelInfo`) and the frames.

Frames are ``frames.py``'s (ADR 0101): the agent reads JSON and raw tensors from the worker, never anything that
can carry code, and a frame that breaks the format ends the worker (a crash: the model's process is broken or
hostile).

On the agent side the connection is a plain :class:`asyncio.Protocol`: answers come back in order, so each one
completes the oldest waiter — a future for :meth:`WorkerProcess.call`, or a plain callback for the serving hot
path (:meth:`WorkerProcess.submit`), which lets the HTTP response be written from the same event-loop callback
that read the worker's answer, with no task or future in between.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.agent.frames import FrameError, encode, take
from edgefleet.agent.worker.spec import ModelInfo, WorkerSpec
from edgefleet.errors import WorkerUnavailable

__all__ = ["WorkerProcess"]

log = logging.getLogger("edgefleet.agent")
# the worker process's entry, run as a file (see worker/main.py): not imported here, the agent never loads it
_ENTRY = str(Path(__file__).with_name("worker") / "main.py")


class _Conn(asyncio.Protocol):
    """The agent's end of the socket pair: splits frames and hands each answer to the oldest waiter."""

    def __init__(self, owner: WorkerProcess) -> None:
        self.owner = owner
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        try:
            msgs = take(buf)
        except FrameError as err:
            # A worker that breaks the frame format is broken or hostile: it ends, and counts as a crash.
            self.owner.close_reason = f"worker sent a malformed frame: {err}"
            self.buf = bytearray()
            log.warning("%s; killing it", self.owner.close_reason)
            self.owner.kill()
            if self.transport is not None:
                self.transport.close()
            return
        waiters = self.owner._waiters
        for msg in msgs:
            op = msg[0]
            if op == "remote":  # a low-confidence request handed over for the remote endpoint (ADR 0105)
                self._remote(msg)
                continue
            # unasked-for: from a worker serving HTTP (ADR 0032), and the inputs it sampled (agent/sampling.py)
            if op == "stats" or op == "metrics" or op == "shm" or op == "samples" or op == "mirror":
                self._unasked(msg)
                continue
            if not waiters:
                continue  # the hello is taken by start(); anything unasked-for is a protocol slip, dropped
            w = waiters.popleft()
            if isinstance(w, asyncio.Future):
                if not w.done():
                    w.set_result(msg)
            else:
                try:
                    w(msg, None)
                except Exception:  # one answer's handler failing must not desynchronise the stream
                    log.exception("an inference answer's callback failed")

    def _remote(self, msg: tuple[Any, ...]) -> None:
        on_remote = self.owner.on_remote

        def reply(answer: tuple[Any, ...]) -> None:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(encode(answer))

        try:
            if on_remote is None:  # no routing here: the worker answers with its own result
                reply(("remote", msg[1], {}, {"route": "local", "reason": "no routing in this agent"}))
            else:
                on_remote(msg, reply)
        except Exception:
            log.exception("a request handed over for the remote endpoint could not be handled")

    def _unasked(self, msg: tuple[Any, ...]) -> None:
        owner = self.owner
        try:
            if msg[0] == "stats":
                if owner.on_stats is not None:
                    owner.on_stats(msg[1], owner.info)
            elif msg[0] == "samples":
                if owner.on_samples is not None:
                    owner.on_samples(msg[1], owner.info)
            elif msg[0] == "mirror":
                if owner.on_mirror is not None:
                    owner.on_mirror(msg[1], owner.info)
            elif msg[0] == "shm":
                if owner.on_shm is not None:
                    owner.on_shm(msg[1])
            else:
                body = owner.render_metrics() if owner.render_metrics is not None else b""
                if self.transport is not None:
                    self.transport.write(encode(("metrics", body)))
        except Exception:
            log.exception("a message from the worker could not be handled")

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._connection_lost()


Waiter = asyncio.Future[Any] | Callable[[Any, Exception | None], None]


class WorkerProcess:
    """One running worker and its pipelined connection (asyncio side)."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: ModelInfo | None = None
        self._transport: asyncio.Transport | None = None
        self._waiters: collections.deque[Waiter] = collections.deque()
        self.closed = asyncio.Event()
        self.close_reason: str | None = None
        self._sock: socket.socket | None = None
        # Set when the worker serves HTTP itself: where its per-request stats go, and who renders /metrics.
        self.on_stats: Callable[[list[Any], ModelInfo | None], None] | None = None
        self.render_metrics: Callable[[], bytes] | None = None
        # hybrid routing (ADR 0105): on_remote(("remote", token, feeds, meta), reply) for a handed-over request
        self.on_remote: Callable[[tuple[Any, ...], Callable[[tuple[Any, ...]], None]], None] | None = None
        self.on_shm: Callable[[Any], None] | None = None  # a shared memory region (un)registered in the worker
        self.serve_sent = False  # the serve frame left: later shared memory changes follow it as frames
        # input sampling (agent/sampling.py): the rate this worker was told, and where what it sampled goes
        self.sample_rate = 0.0
        self.on_samples: Callable[[list[Any], ModelInfo | None], None] | None = None
        # shadow evaluation (agent/shadow.py): the mirroring rate this worker was told, and where its copies go
        self.mirror_rate = 0.0
        self.on_mirror: Callable[[list[Any], ModelInfo | None], None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self, fd: int) -> list[str]:
        # -P: the entry file's folder stays off sys.path; a file, not -m: no edgefleet/__init__ (see worker/main.py).
        args = [sys.executable, "-P", _ENTRY, "--fd", str(fd), "--path", str(self.spec.path)]
        args += ["--role", self.spec.role, "--threads", str(self.spec.intra_op_threads)]
        if self.spec.device_key:
            args += ["--device-key", str(self.spec.device_key)]
        if self.spec.memory_mb:
            args += ["--memory-mb", str(self.spec.memory_mb)]
        if self.spec.fault_file:
            args += ["--fault-file", str(self.spec.fault_file)]
        return args

    async def start(self, timeout: float = 60.0) -> ModelInfo:
        parent, child = socket.socketpair()
        self.proc = subprocess.Popen(self.command(child.fileno()), pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
        child.close()
        self._sock = parent
        loop = asyncio.get_running_loop()
        hello_fut: asyncio.Future[Any] = loop.create_future()
        self._waiters.append(hello_fut)
        transport, _ = await loop.create_unix_connection(lambda: _Conn(self), sock=parent)
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        try:
            hello = await asyncio.wait_for(hello_fut, timeout)
        except (WorkerUnavailable, TimeoutError):
            self.kill()
            raise WorkerUnavailable(f"the worker exited while loading {self.spec.path.name} (exit {self._exit_code()})")
        if hello[0] != "hello":
            self.kill()
            raise WorkerUnavailable(f"the worker cannot load {self.spec.path.name}: {hello[2]}")
        self.info = ModelInfo(**hello[1])
        return self.info

    def _connection_lost(self) -> None:
        code = self._exit_code()
        self._closed("worker exited" if code is None else f"worker exited (exit {code})")

    def _exit_code(self) -> int | None:
        if self.proc is None:
            return None
        return self.proc.poll()

    def _closed(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        while self._waiters:
            w = self._waiters.popleft()
            err = WorkerUnavailable(f"the inference worker crashed: {reason}")
            if isinstance(w, asyncio.Future):
                if not w.done():
                    w.set_exception(err)
            else:
                try:
                    w(None, err)
                except Exception:
                    log.exception("an inference answer's callback failed")
        self.closed.set()

    def submit(self, msg: tuple[Any, ...], callback: Callable[[Any, Exception | None], None]) -> None:
        """Send one request; ``callback(answer, None)`` or ``callback(None, WorkerUnavailable)`` runs in the loop
        callback that reads the answer (the hot path: no task, no future)."""
        if self._transport is None or self.closed.is_set():
            raise WorkerUnavailable("the inference worker is not running")
        self._waiters.append(callback)
        self._transport.write(encode(msg))

    async def call(self, msg: tuple[Any, ...]) -> Any:
        """Send one request and wait for its answer (answers come back in order)."""
        if self._transport is None or self.closed.is_set():
            raise WorkerUnavailable("the inference worker is not running")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._transport.write(encode(msg))
        return await fut

    async def serve_http(
        self,
        listen: socket.socket | list[socket.socket],
        limits: dict[str, Any] | None = None,
        shm: Callable[[], list[dict[str, Any]]] | None = None,
    ) -> bool:
        """Hand the worker the agent's listening socket(s) (TCP, and the Unix socket when there is one): it
        accepts and answers HTTP itself from now on (ADR 0032), under ``limits`` (``HTTPLimits._asdict()``, the
        agent's own), with the shared memory regions ``shm()`` lists at that moment. True once it said so; False if
        it cannot (it crashed, or refused)."""
        listens = listen if isinstance(listen, list) else [listen]
        fds = [s.fileno() for s in listens]
        if self._transport is None or self._sock is None or self.closed.is_set():
            return False
        while self._transport.get_write_buffer_size():  # the fd must travel in order with the frames
            await asyncio.sleep(0.001)
            if self.closed.is_set():
                return False
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)

        def frame() -> bytes:  # the regions as they are when the frame leaves; later changes follow it (send_shm)
            return encode(("serve", limits, {"listeners": len(fds), "shm": shm() if shm is not None else []}))

        data = frame()
        try:
            n = socket.send_fds(self._sock, [data], fds)
        except (BlockingIOError, InterruptedError):
            n = 0  # the socket buffer is full: the fd must ride the first byte, so retry that way
            while n == 0 and not self.closed.is_set():
                await asyncio.sleep(0.001)
                data = frame()
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    n = socket.send_fds(self._sock, [data], fds)
        except OSError:
            return False
        self.serve_sent = n > 0
        if 0 < n < len(data):
            self._transport.write(data[n:])
        try:
            reply = await fut
        except WorkerUnavailable:
            return False
        return bool(reply[0] == "ok")

    def send_shm(self, change: dict[str, Any]) -> None:
        """A shared memory region (un)registered on the agent's side, for a worker that serves HTTP (no answer)."""
        if self.serve_sent and self._transport is not None and not self.closed.is_set():
            self._transport.write(encode(("shm", change)))

    @property
    def in_flight(self) -> int:
        return len(self._waiters)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    async def stop(self) -> None:
        """Graceful stop; kills if it does not exit promptly."""
        if self.proc is None:
            return
        if self._transport is not None and not self.closed.is_set():
            try:
                self._transport.write(encode(("stop",)))
            except (ConnectionError, RuntimeError):
                pass
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, self.proc.wait), 2.0)
        except TimeoutError:
            self.kill()
            await loop.run_in_executor(None, self.proc.wait)
        # Read to the end first: a worker serving HTTP ships its last stats just before it exits.
        if self._transport is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), 1.0)
        if self._transport is not None:
            self._transport.close()
        self._closed("stopped")
