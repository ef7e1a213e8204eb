"""The onnxruntime backend: session creation with threads, optimization level and providers."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from edgefleet.config import RuntimeSettings
from edgefleet.errors import ModelError
from edgefleet.runtime.schema import ORT_TO_NUMPY, TensorSpec

__all__ = ["OrtSession", "runtime_version"]

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def runtime_version() -> str:
    return str(ort.__version__)


def _spec(arg: Any) -> TensorSpec:
    dims: list[int | str | None] = []
    for d in arg.shape or []:
        dims.append(d if isinstance(d, int) else (d or None))
    return TensorSpec(name=arg.name, dtype=ORT_TO_NUMPY.get(arg.type, "float32"), shape=dims)


class OrtSession:
    """A loaded model in onnxruntime. ``run`` does no validation; :class:`edgefleet.runtime.Model` does."""

    name = "onnxruntime"

    def __init__(self, model: bytes | str, settings: RuntimeSettings | None = None) -> None:
        s = settings or RuntimeSettings()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = s.intra_op_threads
        opts.inter_op_num_threads = s.inter_op_threads
        opts.graph_optimization_level = _LEVELS[s.graph_optimization]
        opts.log_severity_level = 3
        available = set(ort.get_available_providers())
        unknown = [p for p in s.providers if p not in available]
        if unknown:
            raise ModelError(f"execution provider {unknown[0]} is not available here (have {sorted(available)})")
        try:
            self.session = ort.InferenceSession(model, sess_options=opts, providers=list(s.providers))
        except Exception as err:  # onnxruntime raises its own untyped exceptions
            raise ModelError(f"onnxruntime cannot load the model: {str(err).splitlines()[0]}")
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
