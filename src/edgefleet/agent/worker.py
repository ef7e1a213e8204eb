"""The inference worker: a separate process that loads one model and answers requests over a socket pair.

A crash here (a segfault in the runtime, an abort, the memory watchdog's SIGKILL) cannot take the agent down;
the supervisor restarts it. Frames are a 4-byte little-endian length and a pickle (the peer is our own process,
started by us with a socket pair, so nothing untrusted is unpickled). Requests are answered in order, which lets
the agent pipeline several requests on one connection.

Messages (agent → worker): ``("infer", feeds, outputs)``, ``("drift",)``, ``("golden",)``, ``("stop",)``.
Answers: ``("ok", value, compute_seconds)`` or ``("err", kind, message)``; the first frame is the hello with the
model's metadata, or ``("err", "load", message)``.

``EDGEFLEET_WORKER_FAULT=<version>:abort|alloc`` is a test hook: a serving worker for that model version aborts
or allocates without bound after loading — a model that passes its golden vectors but crashes on live traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import pickle
import resource
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.errors import WorkerUnavailable

__all__ = ["FAULT_ENV", "ModelInfo", "WorkerProcess", "WorkerSpec", "main"]

FAULT_ENV = "EDGEFLEET_WORKER_FAULT"
_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker loads: a package (``.efpkg``) or a bare ONNX file."""

    path: Path
    device_key: Path | None = None
    role: str = "serve"  # serve | health
    memory_mb: int | None = None
    intra_op_threads: int = 1


@dataclass
class ModelInfo:
    name: str
    version: str
    model_sha256: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    platform: str = "onnxruntime"
    load_seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    has_golden: bool = False


# ---------------------------------------------------------------- worker side (runs in the child process)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError
        got += k
    return bytes(buf)


def _send(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=5)
    sock.sendall(_LEN.pack(len(data)) + data)


def _limit_memory(memory_mb: int) -> None:
    # RLIMIT_AS is useless for onnxruntime (it maps ~190 MB of address space at import); RLIMIT_DATA bounds the
    # heap growth from here on. The precise emulation of device memory is the supervisor's RSS watchdog.
    try:
        with open("/proc/self/status") as f:
            vm_data = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    except (OSError, StopIteration):
        vm_data = 0
    limit = vm_data + memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _fault(version: str, role: str) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if role != "serve" or ":" not in spec:
        return
    want, action = spec.split(":", 1)
    if want != version:
        return
    time.sleep(0.2)  # after the hello: the worker starts fine, then dies under "traffic"
    if action == "abort":
        os.abort()
    if action == "alloc":
        hog = []
        while True:  # grows until the watchdog or RLIMIT_DATA ends the process
            hog.append(bytearray(16 * 1024 * 1024))
            time.sleep(0.01)


def _load(spec: WorkerSpec) -> tuple[Any, ModelInfo, Any, Any]:
    from edgefleet.config import RuntimeSettings

    settings = RuntimeSettings(intra_op_threads=spec.intra_op_threads)
    t0 = time.perf_counter()
    if spec.path.suffix == ".efpkg":
        from edgefleet.package import open_package

        opened = open_package(spec.path, device_key=spec.device_key)
        model = opened.load(settings)
        m = opened.manifest
        info = ModelInfo(
            name=m.name,
            version=m.version,
            model_sha256=opened.model_sha256,
            inputs=[s.model_dump() for s in model.inputs],
            outputs=[s.model_dump() for s in model.outputs],
            metrics=dict(m.metrics or {}),
            has_golden=True,
        )
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
        )
        reference = None
    info.load_seconds = time.perf_counter() - t0
    return model, info, opened, reference


def _golden(model: Any, opened: Any) -> dict[str, Any]:
    """Reproduce the golden vectors (raises GoldenMismatchError) and time each call."""
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
    if spec.memory_mb:
        _limit_memory(spec.memory_mb)
    try:
        model, info, opened, reference = _load(spec)
    except Exception as err:
        _send(sock, ("err", "load", f"{type(err).__name__}: {err}"))
        return
    _send(sock, ("hello", info))
    _fault(info.version, spec.role)
    from edgefleet.errors import InputValidationError

    drift = None
    if reference is not None:
        from edgefleet.telemetry.drift import DriftAccumulator

        drift = DriftAccumulator(reference)
    while True:
        try:
            (n,) = _LEN.unpack(_recv_exact(sock, 4))
            msg = pickle.loads(_recv_exact(sock, n))
        except EOFError:
            return
        op = msg[0]
        if op == "infer":
            feeds, outputs = msg[1], msg[2]
            t0 = time.perf_counter()
            try:
                result = model.run(feeds, outputs)
            except InputValidationError as err:
                _send(sock, ("err", "input", str(err)))
                continue
            except MemoryError:
                os._exit(137)  # the emulated device ran out of memory: a crash, not an error answer
            except Exception as err:
                _send(sock, ("err", "model", f"{type(err).__name__}: {err}"))
                continue
            _send(sock, ("ok", result, time.perf_counter() - t0))
            # After answering, so the request does not wait for it; raw inputs never leave this process.
            if drift is not None:
                drift.add(feeds, result)
        elif op == "drift":
            out = drift.summaries() if drift is not None else []
            if drift is not None:
                drift.reset()
            _send(sock, ("ok", [d.model_dump() for d in out], 0.0))
        elif op == "golden":
            try:
                _send(sock, ("ok", _golden(model, opened), 0.0) if opened else ("err", "golden", "no golden vectors"))
            except Exception as err:
                _send(sock, ("err", "golden", f"{type(err).__name__}: {err}"))
        elif op == "stop":
            return


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="edgefleet-worker")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--path", type=Path, required=True)
    p.add_argument("--device-key", type=Path)
    p.add_argument("--role", default="serve")
    p.add_argument("--memory-mb", type=int)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    sock = socket.socket(fileno=a.fd)
    serve(sock, WorkerSpec(a.path, a.device_key, a.role, a.memory_mb, a.threads))


# ---------------------------------------------------------------- agent side


class WorkerProcess:
    """One running worker and its pipelined connection (asyncio side)."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: ModelInfo | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._reader_task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.close_reason: str | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self, timeout: float = 60.0) -> ModelInfo:
        parent, child = socket.socketpair()
        args = [
            sys.executable,
            "-m",
            "edgefleet.agent._worker_main",
            "--fd",
            str(child.fileno()),
            "--path",
            str(self.spec.path),
        ]
        args += ["--role", self.spec.role, "--threads", str(self.spec.intra_op_threads)]
        if self.spec.device_key:
            args += ["--device-key", str(self.spec.device_key)]
        if self.spec.memory_mb:
            args += ["--memory-mb", str(self.spec.memory_mb)]
        self.proc = subprocess.Popen(args, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
        child.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=parent)
        try:
            hello = await asyncio.wait_for(self._read(reader), timeout)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, pickle.UnpicklingError, AttributeError):
            self.kill()
            raise WorkerUnavailable(f"the worker exited while loading {self.spec.path.name} (exit {self._exit_code()})")
        if hello[0] != "hello":
            self.kill()
            raise WorkerUnavailable(f"the worker cannot load {self.spec.path.name}: {hello[2]}")
        self.info = hello[1]
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop(reader))
        return hello[1]

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> Any:
        (n,) = _LEN.unpack(await reader.readexactly(4))
        return pickle.loads(await reader.readexactly(n))

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                msg = await self._read(reader)
                fut = self._waiters.popleft()
                if not fut.done():
                    fut.set_result(msg)
        except (asyncio.IncompleteReadError, ConnectionError, IndexError):
            pass
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
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(WorkerUnavailable(f"the inference worker crashed: {reason}"))
        self.closed.set()

    async def call(self, msg: tuple[Any, ...]) -> Any:
        """Send one request and wait for its answer (answers come back in order)."""
        if self._writer is None or self.closed.is_set():
            raise WorkerUnavailable("the inference worker is not running")
        data = pickle.dumps(msg, protocol=5)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._writer.write(_LEN.pack(len(data)) + data)
        return await fut

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
        if self._writer is not None and not self.closed.is_set():
            try:
                data = pickle.dumps(("stop",), protocol=5)
                self._writer.write(_LEN.pack(len(data)) + data)
                self._writer.close()
            except (ConnectionError, RuntimeError):
                pass
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, self.proc.wait), 2.0)
        except TimeoutError:
            self.kill()
            await loop.run_in_executor(None, self.proc.wait)
        if self._reader_task is not None:
            self._reader_task.cancel()
        self._closed("stopped")
