"""The onnxruntime backend: session creation with threads, optimization level and execution providers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from edgefleet.config import RuntimeSettings
from edgefleet.errors import ModelError
from edgefleet.runtime.schema import ORT_TO_NUMPY, TensorSpec

__all__ = ["OrtSession", "available_providers", "choose_providers", "runtime_version"]

CPU = "CPUExecutionProvider"

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def runtime_version() -> str:
    return str(ort.__version__)


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build offers (whether each starts is known only at load)."""
    return [str(p) for p in ort.get_available_providers()]


def _spec(arg: Any) -> TensorSpec:
    dims: list[int | str | None] = []
    for d in arg.shape or []:
        dims.append(d if isinstance(d, int) else (d or None))
    return TensorSpec(name=arg.name, dtype=ORT_TO_NUMPY.get(arg.type, "float32"), shape=dims)


def choose_providers(preferred: Sequence[str], available: Sequence[str]) -> list[str]:
    """The preferred providers this build has, in the package's order, with the CPU last as the fallback."""
    chosen = [p for p in preferred if p in available and p != CPU]
    return [*dict.fromkeys(chosen), CPU]


class OrtSession:
    """A loaded model in onnxruntime. ``run`` does no validation; :class:`edgefleet.runtime.Model` does.

    Providers: settings that name them (``EDGEFLEET_RUNTIME_PROVIDERS``, a bench tier) are a demand, refused when
    one is missing; a package's ``preferred`` list is a wish, filled from what this build has, the CPU last.
    ``provider`` is the one that runs the model (onnxruntime itself falls back when a provider fails to start)."""

    name = "onnxruntime"

    def __init__(
        self, model: bytes | str, settings: RuntimeSettings | None = None, preferred: Sequence[str] | None = None
    ) -> None:
        s = settings or RuntimeSettings()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = s.intra_op_threads
        opts.inter_op_num_threads = s.inter_op_threads
        opts.graph_optimization_level = _LEVELS[s.graph_optimization]
        opts.log_severity_level = 3
        available = list(ort.get_available_providers())
        if "providers" in s.model_fields_set or not preferred:
            unknown = [p for p in s.providers if p not in available]
            if unknown:
                raise ModelError(f"execution provider {unknown[0]} is not available here (have {sorted(available)})")
            providers = list(s.providers)
        else:
            providers = choose_providers(preferred, available)
        try:
            self.session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        except Exception as err:  # onnxruntime raises its own untyped exceptions
            raise ModelError(f"onnxruntime cannot load the model: {str(err).splitlines()[0]}")
        self.version = runtime_version()
        self.provider = str(self.session.get_providers()[0])
        self.inputs = [_spec(a) for a in self.session.get_inputs()]
        self.outputs = [_spec(a) for a in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        names = output_names or self._output_names
        try:
            values = self.session.run(names, feeds)
        except Exception as err:
            raise ModelError(f"inference failed: {str(err).splitlines()[0]}")
        return dict(zip(names, values, strict=True))
