"""The worker's full path, for packages (or any model when ``EDGEFLEET_RUNTIME_*`` settings are given).

:func:`load` opens and loads a package (decryption, manifest, drift reference, pre/post-processing) or a bare
model through the runtime layer; :func:`golden` runs a package's golden vectors. The worker process imports this
module only for such a model (``main.py`` serves a bare ONNX model without it); in-process backends
(``agent/backend.py``, the simulator's) call :func:`load` and :func:`golden` too, so both paths load alike.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from edgefleet.agent.frames import encode
from edgefleet.agent.worker.main import fault, limit_memory, serve_loop
from edgefleet.agent.worker.spec import ModelInfo, WorkerSpec

__all__ = ["golden", "load", "package_info", "serve"]


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


def load(spec: WorkerSpec) -> tuple[Any, ModelInfo, Any, Any]:
    """Load ``spec``'s model: ``(model, info, opened package or None, drift reference or None)``."""
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


def golden(model: Any, opened: Any) -> dict[str, Any]:
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
    try:
        model, info, opened, reference = load(spec)
    except Exception as err:
        sock.sendall(encode(("err", "load", f"{type(err).__name__}: {err}")))
        return
    if spec.memory_mb:
        limit_memory(spec.memory_mb)
    sock.sendall(encode(("hello", _info_dict(info))))
    fault(info.version, spec.role)
    from edgefleet.errors import InputValidationError

    drift = None
    if reference is not None:
        from edgefleet.agent.worker.driftcount import DriftCounter

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
                return ("ok", golden(model, opened), 0.0)
            except Exception as err:
                return ("err", "golden", f"{type(err).__name__}: {err}")
        return None if op == "stop" else ("err", "model", f"unknown operation {op!r}")

    served = _info_dict(info)
    # hybrid routing (ADR 0105): the package's confidence step, for the serving loop only (not in the hello)
    served["confidence"] = next(
        (
            {"tensor": p.tensor, "below": p.remote_below, "axis": p.axis}
            for p in getattr(model, "postprocessing", ())
            if getattr(p, "op", None) == "confidence"
        ),
        None,
    )
    serve_loop(sock, model.run, handle, (InputValidationError,), drift.add if drift is not None else None, served)


def _info_dict(info: ModelInfo) -> dict[str, Any]:
    # A plain dict, not the dataclass: the lean worker sends the same shape without importing this module.
    return dict(info.__dict__)
