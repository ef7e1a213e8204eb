"""The runtime integration layer: load a model, validate inputs, run pre/post-processing, return named outputs.

One interface (:class:`Model`) over interchangeable backends; onnxruntime first (``runtime/onnxruntime.py``).
This is also the library a product application embeds (``edgefleet.load``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.config import RuntimeSettings
from edgefleet.errors import ModelError
from edgefleet.runtime.onnxruntime import OrtSession, runtime_version
from edgefleet.runtime.processing import Step, apply_steps
from edgefleet.runtime.schema import TensorSpec, describe, validate_feeds

__all__ = ["Model", "Step", "TensorSpec", "load_model", "runtime_version"]


class Model:
    """A model ready to run: raw inputs are validated against ``inputs``, then pre-processed, run and
    post-processed. ``inputs`` is the *raw* schema (the manifest's, else the ONNX graph's)."""

    def __init__(
        self,
        model_bytes: bytes,
        *,
        settings: RuntimeSettings | None = None,
        inputs: Sequence[TensorSpec] | None = None,
        outputs: Sequence[TensorSpec] | None = None,
        preprocessing: Sequence[Any] = (),
        postprocessing: Sequence[Any] = (),
        manifest: Any = None,
    ) -> None:
        self.model_sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.size_bytes = len(model_bytes)
        self.backend = OrtSession(model_bytes, settings)
        self.inputs: list[TensorSpec] = list(inputs) if inputs else list(self.backend.inputs)
        self.outputs: list[TensorSpec] = list(outputs) if outputs else list(self.backend.outputs)
        self.preprocessing = list(preprocessing)
        self.postprocessing = list(postprocessing)
        self.manifest = manifest

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    def prepare(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate raw feeds and apply pre-processing: exactly what the backend receives."""
        arrays = {k: v if isinstance(v, np.ndarray) else np.asarray(v) for k, v in feeds.items()}
        validate_feeds(arrays, self.inputs)
        return apply_steps(self.preprocessing, arrays) if self.preprocessing else arrays

    def run(self, feeds: Mapping[str, Any], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run one call. Raises :class:`~edgefleet.errors.InputValidationError` for bad inputs."""
        raw = self.backend.run(self.prepare(feeds), output_names)
        return apply_steps(self.postprocessing, raw) if self.postprocessing else raw

    def sample_feed(self, seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
        """A random feed that satisfies the raw input schema (symbolic dims become ``batch``)."""
        rng = np.random.default_rng(seed)
        feed: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            shape = spec.concrete_shape(batch)
            if spec.dtype.startswith("float"):
                lo, hi = spec.value_range or (0.0, 1.0)
                feed[spec.name] = rng.uniform(lo, hi, size=shape).astype(spec.dtype)
            elif spec.dtype == "bool":
                feed[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
            else:
                lo, hi = spec.value_range or (0, 10)
                feed[spec.name] = rng.integers(int(lo), int(hi) + 1, size=shape).astype(spec.dtype)
        return feed

    def __repr__(self) -> str:
        return f"Model(sha256={self.model_sha256[:12]}, inputs={describe(self.inputs)})"


def load_model(path: str | os.PathLike[str], settings: RuntimeSettings | None = None) -> Model:
    """Load a bare ``.onnx`` file."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model file {p} does not exist")
    data = p.read_bytes()
    if not _looks_like_onnx(data):
        raise ModelError(f"{p} is not an ONNX model")
    return Model(data, settings=settings)


def _looks_like_onnx(data: bytes) -> bool:
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception:
        return False
    return len(model.graph.node) > 0 or len(model.graph.output) > 0
