"""The inference worker process: its entry point, the frame protocol and the serving loop — deliberately lean.

The supervisor starts it as ``python -P <this file>`` rather than ``python -m edgefleet.agent…``: running a module
inside the package would first run ``edgefleet/__init__``, which imports the runtime layer, pydantic-settings and
onnx (~20 MB of RSS and ~0.3 s of start-up here, for nothing the hot path uses). A bare ``.onnx`` model is served
with the standard library, numpy and onnxruntime only; a package (decryption, manifest, golden vectors, drift
reference, pre/post-processing) or a worker with ``EDGEFLEET_RUNTIME_*`` settings loads through the full
package/runtime layers (:func:`edgefleet.agent.worker.packaged.load`), imported only then. ``-P`` keeps this file's
folder off ``sys.path`` (its neighbours' names, such as ``metrics`` or ``telemetry``, must not shadow anything).

Frames, both ways: ``frames.py`` — a fixed header, a JSON descriptor and raw tensor bytes, nothing that can carry
code (ADR 0101): this process runs a model that may be hostile, and the agent holds the device's keys. Requests
are answered in order; the worker reads everything that has arrived in one ``recv`` and answers a burst of
pipelined requests with one ``sendall``.

Messages (agent → worker): ``("infer", feeds, outputs)``, ``("drift",)``, ``("golden",)``, ``("stop",)``, and
``("serve", limits)`` with the agent's listening socket attached (SCM_RIGHTS): from then on the worker answers the
OIP HTTP port itself (``worker/httpserve.py``, ADR 0032) under the agent's HTTP limits (``httpserver.HTTPLimits`` as a
dict), still answering these frames, plus ``("flush",)``.
Answers: ``("ok", value, compute_seconds)`` or ``("err", kind, message)``; the first frame is
``("hello", info_dict)`` with the model's metadata, or ``("err", "load", message)``. While serving HTTP the
worker also sends, unasked, ``("stats", observations)`` batches and ``("metrics",)`` requests (the agent answers
``("metrics", body)``). ``("sample", rate_per_min)`` turns input sampling on (0: off; agent/sampling.py): the
inputs of answered requests, at most that many a minute, go to the agent unasked as ``("samples", [...])``
(``worker/sampler.py``). ``("shadow", rate_per_s)`` turns mirroring on for a shadow phase (0: off): the inputs
and outputs of answered requests, at most that many a second, go to the agent unasked as ``("mirror", [...])``
(``worker/mirror.py``).

``EDGEFLEET_WORKER_FAULT=<version>:abort|alloc`` is a test hook: a serving worker for that model version aborts
or allocates without bound after loading — a model that passes its golden vectors but crashes on live traffic.
"""

from __future__ import annotations

import array
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from edgefleet.agent.frames import FrameError, encode, take
from edgefleet.dtypes import ORT_TO_NUMPY

try:  # CPython's own SHA-256: hashlib's would map OpenSSL into this process (~3.5 MB resident here)
    from _sha256 import sha256
except ImportError:  # pragma: no cover - other Pythons
    from hashlib import sha256

__all__ = ["FAULT_ENV", "answer_all", "answer_frame", "fault", "limit_memory", "main", "serve_loop"]

FAULT_ENV = "EDGEFLEET_WORKER_FAULT"
_RECV = 1 << 20


def answer_frame(result: dict[str, Any], compute: float) -> bytes:
    """An inference's answer; outputs a frame cannot carry (the object dtype: strings, maps) are the model's
    error, as OIP cannot carry them either."""
    try:
        return encode(("ok", result, compute))
    except FrameError as err:
        return encode(("err", "model", str(err)))


def fault(version: str, role: str) -> None:
    """The :data:`FAULT_ENV` test hook, run once the model is loaded and the hello sent."""
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


def limit_memory(memory_mb: int) -> None:
    """RLIMIT_DATA: at most ``memory_mb`` more heap than the loaded model holds now."""
    # Called once the model is loaded: the backstop bounds what serving allocates beyond that.
    # RLIMIT_AS is useless for onnxruntime (it maps ~190 MB of address space at import); RLIMIT_DATA bounds the
    # heap growth from here on. The precise emulation of device memory is the supervisor's RSS watchdog.
    import resource

    try:
        with open("/proc/self/status") as f:
            vm_data = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    except (OSError, StopIteration):
        vm_data = 0
    limit = vm_data + memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


# ---------------------------------------------------------------- the lean path: a bare ONNX model


class InputRefused(Exception):
    """A request the model's input schema refuses (answered as ``("err", "input", …)``, a 400 upstream)."""


def _signature(spec: dict[str, Any]) -> str:
    dims = ", ".join("?" if d is None else str(d) for d in spec["shape"])
    return f"{spec['name']}: {spec['dtype']}[{dims}]"


class OnnxModel:
    """An onnxruntime session with the same settings, specs and input checks as ``edgefleet.runtime.Model``
    (RuntimeSettings defaults: inter-op 1 thread, all graph optimizations, the CPU provider), minus spinning."""

    def __init__(self, path: str, intra_op_threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # No spinning: after each run onnxruntime's pool would busy-wait for more work, stealing the core that the
        # agent and the client need next (here: a worker round trip of ~65 µs spinning vs ~15 µs without).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        digest = sha256()
        with open(path, "rb") as f:  # hashed in chunks: the model's bytes are never held twice
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        self.model_sha256 = digest.hexdigest()
        try:
            self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own untyped exceptions
            raise RuntimeError(f"onnxruntime cannot load the model: {str(err).splitlines()[0]}") from None
        self.inputs = [self._spec(a) for a in self.session.get_inputs()]
        self.outputs = [self._spec(a) for a in self.session.get_outputs()]
        self._output_names = [o["name"] for o in self.outputs]
        import numpy as np

        self._checks = [(s["name"], np.dtype(s["dtype"]), s["shape"], s) for s in self.inputs]
        self._described = "; ".join(_signature(s) for s in self.inputs)

    @staticmethod
    def _spec(arg: Any) -> dict[str, Any]:
        dims = [d if isinstance(d, int) else (d or None) for d in arg.shape or []]
        return {"name": arg.name, "dtype": ORT_TO_NUMPY.get(arg.type, "float32"), "shape": dims, "value_range": None}

    def _validate(self, feeds: dict[str, Any]) -> None:
        if len(feeds) != len(self._checks):
            known = {c[0] for c in self._checks}
            extra = [n for n in feeds if n not in known]
            if extra:
                raise InputRefused(f"unknown input {extra[0]!r}; the model expects {self._described}")
        for name, dtype, shape, spec in self._checks:
            arr = feeds.get(name)
            if arr is None:
                raise InputRefused(f"missing input {name!r}; the model expects {self._described}")
            if arr.dtype != dtype:
                raise InputRefused(f"input {name!r} has dtype {arr.dtype}, expected {_signature(spec)}")
            if arr.ndim != len(shape):
                raise InputRefused(
                    f"input {name!r} has rank {arr.ndim} (shape {list(arr.shape)}), expected {_signature(spec)}"
                )
            for got, want in zip(arr.shape, shape, strict=True):
                if isinstance(want, int) and want > 0 and got != want:
                    raise InputRefused(f"input {name!r} has shape {list(arr.shape)}, expected {_signature(spec)}")

    def run(self, feeds: dict[str, Any], outputs: list[str] | None) -> dict[str, Any]:
        self._validate(feeds)
        names = outputs or self._output_names
        return dict(zip(names, self.session.run(names, feeds), strict=True))


def _lean_load(path: str, intra_op_threads: int) -> tuple[OnnxModel, dict[str, Any]]:
    t0 = time.perf_counter()
    model = OnnxModel(path, intra_op_threads)
    info = {
        "name": os.path.splitext(os.path.basename(path))[0],
        "version": "1",
        "model_sha256": model.model_sha256,
        "inputs": model.inputs,
        "outputs": model.outputs,
        "load_seconds": time.perf_counter() - t0,
    }
    return model, info


# ---------------------------------------------------------------- the loop


Handler = Callable[[tuple[Any, ...]], tuple[Any, ...] | None]


Answer = Callable[[tuple[Any, ...]], tuple[bytes | None, tuple[dict[str, Any], dict[str, Any]] | None]]


def answer_all(
    sock: socket.socket,
    msgs: list[tuple[Any, ...]],
    answer: Answer,
    after: Callable[[dict[str, Any], dict[str, Any]], None] | None,
    special: Callable[[tuple[Any, ...]], bytes | None] | None = None,
) -> bool:
    """Answer ``msgs`` in order with one ``sendall``, then run ``after`` on the requests served (raw inputs never
    leave this process, and drift never delays an answer). ``special`` answers the ops it knows (a frame, or
    b"" for no answer) before ``answer`` sees them. False: a stop came (what followed it is dropped)."""
    replies: list[bytes] = []
    done: list[tuple[dict[str, Any], dict[str, Any]]] = []
    running = True
    for msg in msgs:
        mine = special(msg) if special is not None else None
        if mine is not None:
            if mine:
                replies.append(mine)
            continue
        reply, served = answer(msg)
        if reply is None:
            running = False
            break
        replies.append(reply)
        if served is not None and after is not None:
            done.append(served)
    if replies:
        sock.sendall(b"".join(replies) if len(replies) > 1 else replies[0])
    if after is not None:
        for feeds, result in done:
            after(feeds, result)
    return running


def serve_loop(
    sock: socket.socket,
    run: Callable[[dict[str, Any], list[str] | None], dict[str, Any]],
    handle: Handler,
    input_errors: tuple[type[BaseException], ...],
    after: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    info: dict[str, Any] | None = None,
) -> None:
    """Answer frames until EOF or ``("stop",)``. ``run`` serves ``infer``; ``handle`` the other ops (None: stop);
    ``after(feeds, outputs)`` runs once the answers of a burst are sent (drift: it never delays a request).
    ``("serve",)`` (with a listening socket attached) turns to serving HTTP with the model ``info``."""
    perf = time.perf_counter
    sampler: list[Any] = []  # worker/sampler.py's WorkerSampler while the agent has input sampling on
    mirror: list[Any] = []  # worker/mirror.py's WorkerMirror while a shadow phase runs (agent/shadow.py)
    after = _with_sampling(after, sampler, mirror)

    def answer(msg: tuple[Any, ...]) -> tuple[bytes | None, tuple[dict[str, Any], dict[str, Any]] | None]:
        """One frame's answer (None: stop) and, for a served infer, its (feeds, outputs) for ``after``."""
        if msg[0] == "infer":
            t0 = perf()
            try:
                result = run(msg[1], msg[2])
            except input_errors as err:
                return encode(("err", "input", str(err))), None
            except MemoryError:
                os._exit(137)  # the emulated device ran out of memory: a crash, not an error answer
            except Exception as err:
                return encode(("err", "model", f"{type(err).__name__}: {err}")), None
            return answer_frame(result, perf() - t0), (msg[1], result)
        if msg[0] == "sample":
            return _set_sampling(sampler, sock, msg[1]), None
        if msg[0] == "shadow":
            return _set_mirror(mirror, sock, msg[1]), None
        if sampler and (msg[0] == "drift" or msg[0] == "stop"):
            sampler[0].ship()  # before the answer: what was sampled reaches the agent every telemetry window
        if mirror and (msg[0] == "drift" or msg[0] == "stop"):
            mirror[0].ship()
        reply = handle(msg)
        return (None, None) if reply is None else (encode(reply), None)

    buf = bytearray()
    chunk = bytearray(_RECV)
    view = memoryview(chunk)
    fds: list[int] = []
    anc = socket.CMSG_SPACE(4 * 4)
    while True:
        n, ancdata, _flags, _addr = sock.recvmsg_into([view], anc)
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
        if n == 0:
            return
        buf += view[:n]
        while True:
            msgs = take(buf, until=lambda m: m[0] == "serve")  # what follows "serve" is for the HTTP loop
            serve = msgs.pop() if msgs and msgs[-1][0] == "serve" else None
            if not answer_all(sock, msgs, answer, after):
                return
            if serve is None:
                break
            if not fds or info is None:
                sock.sendall(encode(("err", "model", "serve: no listening socket or no model info")))
                continue
            extra = serve[2] if len(serve) > 2 and isinstance(serve[2], dict) else {}
            count = extra.get("listeners")
            count = count if isinstance(count, int) and 1 <= count <= len(fds) else 1
            listens = [socket.socket(fileno=fd) for fd in fds[:count]]  # TCP, then the Unix socket if any
            del fds[:count]
            sock.sendall(encode(("ok", None, 0.0)))
            from edgefleet.agent.httpserver import HTTPLimits
            from edgefleet.agent.worker.httpserve import serve_http

            limits = HTTPLimits.from_dict(serve[1] if len(serve) > 1 else None)
            serve_http(
                sock, listens[0], buf, view, answer, run, input_errors, after, info, limits,
                more=listens[1:], regions=extra.get("shm"),
            )  # fmt: skip
            return


def _with_sampling(
    after: Callable[[dict[str, Any], dict[str, Any]], None] | None, sampler: list[Any], mirror: list[Any]
) -> Callable[[dict[str, Any], dict[str, Any]], None]:
    def both(feeds: dict[str, Any], result: dict[str, Any]) -> None:
        if after is not None:
            after(feeds, result)
        if sampler:
            sampler[0].observe(feeds)  # after the answer went out, as drift: sampling never delays a request
        if mirror:
            mirror[0].observe(feeds, result)  # the same for shadow evaluation's copies

    return both


def _set_mirror(mirror: list[Any], sock: socket.socket, per_s: float) -> bytes:
    """Mirroring for a shadow phase on at ``per_s`` requests a second, or off at 0 (worker/mirror.py, imported
    only when on)."""
    if mirror:
        mirror.pop().ship()
    if isinstance(per_s, (int, float)) and per_s > 0:
        from edgefleet.agent.worker.mirror import WorkerMirror

        mirror.append(WorkerMirror(sock.sendall, float(per_s)))
    return encode(("ok", None, 0.0))


def _set_sampling(sampler: list[Any], sock: socket.socket, per_min: float) -> bytes:
    """Input sampling on at ``per_min`` inputs a minute, or off at 0; its module is imported only when on."""
    if sampler:
        sampler.pop().ship()
    if per_min > 0:
        from edgefleet.agent.worker.sampler import WorkerSampler

        sampler.append(WorkerSampler(sock.sendall, per_min))
    return encode(("ok", None, 0.0))


def _serve_lean(sock: socket.socket, path: str, role: str, threads: int, memory_mb: int | None) -> None:
    try:
        model, info = _lean_load(path, threads)
    except Exception as err:
        sock.sendall(encode(("err", "load", f"{type(err).__name__}: {err}")))
        return
    if memory_mb:
        limit_memory(memory_mb)
    sock.sendall(encode(("hello", info)))
    fault(info["version"], role)

    def handle(msg: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if msg[0] == "drift":
            return ("ok", [], 0.0)
        if msg[0] == "golden":
            return ("err", "golden", "no golden vectors (a bare ONNX model, not a package)")
        return None if msg[0] == "stop" else ("err", "model", f"unknown operation {msg[0]!r}")

    serve_loop(sock, model.run, handle, (InputRefused,), None, info)


def _enable_faulthandler(path: str) -> None:
    # A segfault or abort in the runtime leaves the Python stacks of every thread in this file, which the
    # supervisor reads into the crash report (agent/crashes.py). SIGTERM is left alone: a stop is not a crash.
    import faulthandler

    faulthandler.enable(file=open(path, "w"), all_threads=True)  # noqa: SIM115 - open for the process's life


def _args(argv: list[str]) -> dict[str, str]:
    """``--name value`` pairs: the supervisor is the only caller (argparse alone costs start-up and memory)."""
    if len(argv) % 2 or not all(k.startswith("--") for k in argv[::2]):
        raise SystemExit(f"edgefleet-worker: bad arguments {argv!r}")
    args = {k[2:]: v for k, v in zip(argv[::2], argv[1::2], strict=True)}
    if "fd" not in args or "path" not in args:
        raise SystemExit("edgefleet-worker: --fd and --path are required")
    return args


def main(argv: list[str] | None = None) -> None:
    a = _args(sys.argv[1:] if argv is None else argv)
    if a.get("fault-file"):
        _enable_faulthandler(a["fault-file"])
    sock = socket.socket(fileno=int(a["fd"]))
    memory_mb = int(a["memory-mb"]) if a.get("memory-mb") else None
    threads = int(a.get("threads", "1"))
    role = a.get("role", "serve")
    if role == "shadow":
        os.nice(10)  # a shadow phase's candidate yields the CPU to the worker that serves (agent/shadow.py)
    runtime_env = any(k.startswith("EDGEFLEET_RUNTIME_") for k in os.environ)
    if a["path"].endswith(".onnx") and not runtime_env:
        _serve_lean(sock, a["path"], role, threads, memory_mb)
        return
    from pathlib import Path

    from edgefleet.agent.worker.packaged import serve
    from edgefleet.agent.worker.spec import WorkerSpec

    key = Path(a["device-key"]) if a.get("device-key") else None
    serve(sock, WorkerSpec(Path(a["path"]), key, role, memory_mb, threads))


if __name__ == "__main__":
    # httpserve and packaged import this module by its package name: let them find this copy, not load a second one
    sys.modules.setdefault("edgefleet.agent.worker.main", sys.modules[__name__])
    main()
