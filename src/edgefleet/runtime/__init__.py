"""The runtime integration layer: load a model, validate inputs, run pre/post-processing, return named outputs.

One interface (:class:`Model`) over interchangeable backends (``runtime/backends.py``): onnxruntime, and LiteRT and
OpenVINO where their extras are installed. This is also the library a product application embeds
(``edgefleet.load``).
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
from edgefleet.runtime.backends import RUNTIMES, Backend, available_runtimes, detect_format, open_backend
from edgefleet.runtime.onnxruntime import available_providers, runtime_version
from edgefleet.runtime.processing import Step, apply_steps
from edgefleet.runtime.schema import TensorSpec, describe, validate_feeds

__all__ = [
    "RUNTIMES",
    "Backend",
    "Model",
    "Step",
    "TensorSpec",
    "available_providers",
    "available_runtimes",
    "detect_format",
    "load_model",
    "runtime_version",
]


class Model:
    """A model ready to run: raw inputs are validated against ``inputs``, then pre-processed, run and
    post-processed. ``inputs`` is the *raw* schema (the manifest's, else the model's own). ``runtime`` runs it
    (``model_format`` is detected from the bytes when not given); ``providers`` are onnxruntime execution providers
    in order of preference. ``runtime_name``, ``runtime_version`` and ``provider`` say what actually runs it."""

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
        runtime: str = "onnxruntime",
        model_format: str | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        self.model_sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.size_bytes = len(model_bytes)
        self.backend: Backend = open_backend(
            runtime, model_bytes, model_format=model_format, settings=settings, providers=providers
        )
        self.runtime_name = self.backend.name
        self.runtime_version = self.backend.version
        self.provider = self.backend.provider
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
    """Load a bare model file: ``.onnx`` in onnxruntime, ``.tflite`` in LiteRT, an OpenVINO IR ``.xml`` (with its
    ``.bin`` beside it) in OpenVINO."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model file {p} does not exist")
    if p.suffix == ".xml":
        from edgefleet.runtime.backends import unavailable

        try:
            from edgefleet.runtime.openvino import read_ir_files
        except ImportError:
            raise unavailable("openvino")
        return Model(read_ir_files(p), settings=settings, runtime="openvino", model_format="openvino-ir")
    data = p.read_bytes()
    if detect_format(data) == "tflite":
        return Model(data, settings=settings, runtime="litert", model_format="tflite")
    if not _looks_like_onnx(data):
        raise ModelError(f"{p} is not an ONNX model (nor a .tflite or an OpenVINO IR .xml)")
    return Model(data, settings=settings)


def _looks_like_onnx(data: bytes) -> bool:
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception:
        return False
    return len(model.graph.node) > 0 or len(model.graph.output) > 0
