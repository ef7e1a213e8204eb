"""The LiteRT backend (``edgefleet[litert]``, the ``ai-edge-litert`` package): a ``.tflite`` model on the CPU.

LiteRT's interpreter holds one set of tensors: a call whose input shape differs from the last one resizes them
(inputs with a dynamic dim, ``-1`` in the model's shape signature) before it runs.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from edgefleet.config import RuntimeSettings
from edgefleet.errors import ModelError
from edgefleet.runtime.schema import ONNX_TO_NUMPY, TensorSpec

__all__ = ["LiteRtModel", "runtime_version"]


def runtime_version() -> str:
    return importlib.metadata.version("ai-edge-litert")


def _spec(detail: dict[str, Any]) -> TensorSpec:
    signature = detail.get("shape_signature")
    dims = [int(d) for d in (signature if signature is not None and len(signature) else detail["shape"])]
    dtype = np.dtype(detail["dtype"]).name
    if dtype not in ONNX_TO_NUMPY.values():
        raise ModelError(f"tensor {detail['name']!r} has dtype {dtype}, which edgefleet does not carry")
    return TensorSpec(name=detail["name"], dtype=dtype, shape=[d if d >= 0 else None for d in dims])


class LiteRtModel:
    """A ``.tflite`` model in LiteRT's interpreter. ``run`` does no validation; :class:`edgefleet.runtime.Model`
    does."""

    name = "litert"
    provider = "CPU"

    def __init__(self, model: bytes, settings: RuntimeSettings | None = None) -> None:
        s = settings or RuntimeSettings()
        try:
            self._interp = Interpreter(model_content=model, num_threads=s.intra_op_threads or None)
            self._interp.allocate_tensors()
            inputs = self._interp.get_input_details()
            outputs = self._interp.get_output_details()
        except Exception as err:  # LiteRT raises ValueError/RuntimeError with its own text
            raise ModelError(f"LiteRT cannot load the model: {str(err).strip().splitlines()[0] if str(err) else err}")
        self.version = runtime_version()
        self.inputs = [_spec(d) for d in inputs]
        self.outputs = [_spec(d) for d in outputs]
        self._in = {d["name"]: (int(d["index"]), tuple(int(x) for x in d["shape"])) for d in inputs}
        self._out = {d["name"]: int(d["index"]) for d in outputs}

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        names = output_names or list(self._out)
        unknown = [n for n in names if n not in self._out]
        if unknown:
            raise ModelError(f"the model has no output {unknown[0]!r}")
        interp = self._interp
        try:
            resized = False
            for name, (index, shape) in self._in.items():
                arr = feeds[name]
                if arr.shape != shape:
                    interp.resize_tensor_input(index, list(arr.shape))
                    self._in[name] = (index, arr.shape)
                    resized = True
            if resized:
                interp.allocate_tensors()
            for name, (index, _) in self._in.items():
                interp.set_tensor(index, np.ascontiguousarray(feeds[name]))
            interp.invoke()
            return {n: interp.get_tensor(self._out[n]) for n in names}  # get_tensor copies
        except Exception as err:
            raise ModelError(f"inference failed: {str(err).strip().splitlines()[0] if str(err) else err}")
