"""The inference worker: a separate process that loads one model and answers requests over a socket pair.

A crash there (a segfault in the runtime, an abort, the memory watchdog's SIGKILL) cannot take the agent down;
the supervisor restarts it. The process's entry point, frame protocol and serving loop are in
``_worker_main.py`` (kept free of edgefleet imports, so a bare ONNX model is served by a lean process); this
module holds what both sides share (:class:`WorkerSpec`, :class:`ModelInfo`), the full package loading path the
worker imports only for packages, and the agent side (:class:`WorkerProcess`).

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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.agent._worker_main import FAULT_ENV, serve_loop
from edgefleet.agent.frames import FrameError, encode, take
from edgefleet.errors import WorkerUnavailable

__all__ = ["FAULT_ENV", "ModelInfo", "WorkerProcess", "WorkerSpec", "package_info", "run_golden", "serve"]

log = logging.getLogger("edgefleet.agent")
_ENTRY = str(Path(__file__).with_name("_worker_main.py"))


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker loads: a package (``.efpkg``) or a bare ONNX file."""

    path: Path
    device_key: Path | None = None
    role: str = "serve"  # serve | health
    memory_mb: int | None = None
    intra_op_threads: int = 1
    fault_file: Path | None = None  # where faulthandler writes the worker's traceback on a fatal signal


@dataclass
class ModelInfo:
    name: str
    version: str
    model_sha256: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    platform: str = "onnxruntime"  # the runtime that serves it: onnxruntime, litert, openvino
    provider: str = "CPUExecutionProvider"  # what runs it there: an execution provider, an OpenVINO device, ...
    load_seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    has_golden: bool = False


# ---------------------------------------------------------------- worker side (the full path, for packages)


def package_info(opened: Any, model: Any, load_seconds: float = 0.0) -> ModelInfo:
    """What the agent reports of a package's model once loaded (``opened``: an opened package)."""
    m = opened.manifest
    return ModelInfo(
        name=m.name,
        version=m.version,
        model_sha256=opened.model_sha256,
        inputs=[s.model_dump() for s in model.inputs],
        outputs=[s.model_dump() for s in model.outputs],
        platform=model.runtime_name,
        provider=model.provider,
        metrics=dict(m.metrics or {}),
        has_golden=True,
        load_seconds=load_seconds,
    )


def _load(spec: WorkerSpec) -> tuple[Any, ModelInfo, Any, Any]:
    from edgefleet.config import RuntimeSettings

    settings = RuntimeSettings(intra_op_threads=spec.intra_op_threads)
    t0 = time.perf_counter()
    if spec.path.suffix == ".efpkg":
        from edgefleet.package import open_package

        opened = open_package(spec.path, device_key=spec.device_key)
        model = opened.load(settings)
        info = package_info(opened, model)
        reference = opened.reference
    else:
        from edgefleet.runtime import load_model

        model = load_model(spec.path, settings)
        opened = None
        info = ModelInfo(
            name=spec.path.stem,
            version="1",
            model_sha256=model.model_sha256,
            inputs=[s.model_dump() for s in model.inputs],
            outputs=[s.model_dump() for s in model.outputs],
            platform=model.runtime_name,
            provider=model.provider,
        )
        reference = None
    info.load_seconds = time.perf_counter() - t0
    return model, info, opened, reference


def run_golden(model: Any, opened: Any) -> dict[str, Any]:
    """Run an opened package's golden vectors through ``model`` (the package's, loaded): raises
    GoldenMismatchError when an output leaves its tolerance, else times every call (three passes) and returns
    ``{"calls": n, "latencies_s": [...]}``, what :func:`~edgefleet.agent.healthcheck.check_latency` judges.
    The worker's ``golden`` request runs this; so does a health check that shares one loaded model."""
    opened.verify_golden(model)
    times: list[float] = []
    calls = opened.golden_inputs
    for _ in range(3):
        for feed in calls:
            t0 = time.perf_counter()
            model.run(feed)
            times.append(time.perf_counter() - t0)
    return {"calls": len(calls), "latencies_s": times}


def serve(sock: socket.socket, spec: WorkerSpec) -> None:
    """The worker's loop for a package (or any model when ``EDGEFLEET_RUNTIME_*`` settings are given)."""
    from edgefleet.agent._worker_main import _fault, _limit_memory

    try:
        model, info, opened, reference = _load(spec)
    except Exception as err:
        sock.sendall(encode(("err", "load", f"{type(err).__name__}: {err}")))
        return
    if spec.memory_mb:
        _limit_memory(spec.memory_mb)
    sock.sendall(encode(("hello", _info_dict(info))))
    _fault(info.version, spec.role)
    from edgefleet.errors import InputValidationError

    drift = None
    if reference is not None:
        from edgefleet.agent.driftcount import DriftCounter

        drift = DriftCounter(reference)

    def handle(msg: tuple[Any, ...]) -> tuple[Any, ...] | None:
        op = msg[0]
        if op == "drift":  # the window's histograms, then a fresh start for the next window
            if drift is None:
                return ("ok", [], 0.0)
            try:
                out = [d.model_dump(mode="json") for d in drift.summaries()]
            except Exception as err:  # a statistic that cannot be summarised must not take serving down
                return ("err", "model", f"drift: {type(err).__name__}: {err}")
            finally:
                drift.reset()
            return ("ok", out, 0.0)
        if op == "golden":
            if not opened:
                return ("err", "golden", "no golden vectors")
            try:
                return ("ok", run_golden(model, opened), 0.0)
            except Exception as err:
                return ("err", "golden", f"{type(err).__name__}: {err}")
        return None if op == "stop" else ("err", "model", f"unknown operation {op!r}")

    serve_loop(
        sock, model.run, handle, (InputValidationError,), drift.add if drift is not None else None, _info_dict(info)
    )


def _info_dict(info: ModelInfo) -> dict[str, Any]:
    # A plain dict, not the dataclass: the lean worker sends the same shape without importing this module.
    return dict(info.__dict__)


# ---------------------------------------------------------------- agent side


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
            if op == "stats" or op == "metrics":  # unasked-for, from a worker serving HTTP itself (ADR 0032)
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

    def _unasked(self, msg: tuple[Any, ...]) -> None:
        owner = self.owner
        try:
            if msg[0] == "stats":
                if owner.on_stats is not None:
                    owner.on_stats(msg[1], owner.info)
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

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self, fd: int) -> list[str]:
        # -P: the entry file's folder stays off sys.path; a file, not -m: no edgefleet/__init__ (see _worker_main).
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

    async def serve_http(self, listen: socket.socket, limits: dict[str, Any] | None = None) -> bool:
        """Hand the worker the agent's listening socket: it accepts and answers HTTP itself from now on (ADR
        0032), under ``limits`` (``HTTPLimits._asdict()``, the agent's own). True once it said so; False if it
        cannot (it crashed, or refused)."""
        if self._transport is None or self._sock is None or self.closed.is_set():
            return False
        while self._transport.get_write_buffer_size():  # the fd must travel in order with the frames
            await asyncio.sleep(0.001)
            if self.closed.is_set():
                return False
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        data = encode(("serve", limits))
        try:
            n = socket.send_fds(self._sock, [data], [listen.fileno()])
        except (BlockingIOError, InterruptedError):
            n = 0  # the socket buffer is full: the fd must ride the first byte, so retry that way
            while n == 0 and not self.closed.is_set():
                await asyncio.sleep(0.001)
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    n = socket.send_fds(self._sock, [data], [listen.fileno()])
        except OSError:
            return False
        if 0 < n < len(data):
            self._transport.write(data[n:])
        try:
            reply = await fut
        except WorkerUnavailable:
            return False
        return bool(reply[0] == "ok")

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
