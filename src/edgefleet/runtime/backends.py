"""The seam between :class:`edgefleet.runtime.Model` and the inference runtimes behind it.

A backend is one loaded model in one runtime: its tensor specs, ``run``, and what it runs on. Each runtime has one
module (``onnxruntime.py``, ``openvino.py``, ``litert.py``); only onnxruntime is a core dependency, the others are
extras (``edgefleet[openvino]``, ``edgefleet[litert]``) imported only when a model asks for them, so a device without
one refuses that model with :class:`~edgefleet.errors.RuntimeUnavailable` — never an ``ImportError``.
"""

from __future__ import annotations

import importlib.metadata
import tarfile
from collections.abc import Sequence
from typing import Literal, Protocol, cast

import numpy as np

from edgefleet.config import RuntimeSettings
from edgefleet.errors import ModelError, RuntimeUnavailable
from edgefleet.runtime.schema import TensorSpec

__all__ = [
    "FORMATS",
    "RUNTIMES",
    "Backend",
    "ModelFormat",
    "RuntimeName",
    "available_runtimes",
    "detect_format",
    "open_backend",
]

RuntimeName = Literal["onnxruntime", "litert", "openvino"]
ModelFormat = Literal["onnx", "tflite", "openvino-ir"]

# The model formats each runtime reads. OpenVINO reads ONNX itself, and its own IR (an .xml graph and a .bin of
# weights: held as one uncompressed tar of model.xml and model.bin, see runtime/openvino.py).
FORMATS: dict[str, tuple[ModelFormat, ...]] = {
    "onnxruntime": ("onnx",),
    "litert": ("tflite",),
    "openvino": ("onnx", "openvino-ir"),
}
RUNTIMES = tuple(FORMATS)
# Where each optional runtime comes from: what a device without it is told to install.
_DISTRIBUTION = {"litert": "ai-edge-litert", "openvino": "openvino"}
_EXTRA = {"litert": "litert", "openvino": "openvino"}


class Backend(Protocol):
    """One model loaded in one runtime. ``run`` does no validation; :class:`edgefleet.runtime.Model` does."""

    name: str  # the runtime: onnxruntime, litert, openvino
    version: str
    provider: str  # what runs it: an onnxruntime execution provider, an OpenVINO device, LiteRT's CPU
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]: ...


def detect_format(data: bytes) -> ModelFormat:
    """``tflite`` (the FlatBuffer file identifier ``TFL3``), ``openvino-ir`` (a tar holding model.xml), else ``onnx``
    (whether it really is ONNX is the runtime's to say when it loads it)."""
    if data[4:8] == b"TFL3":
        return "tflite"
    if len(data) > 512 and data[257:262] == b"ustar":
        import io

        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                if "model.xml" in tar.getnames():
                    return "openvino-ir"
        except tarfile.TarError:
            pass
    return "onnx"


def available_runtimes() -> dict[str, str]:
    """The runtimes this installation can load, name → version, without importing any of them."""
    from edgefleet.runtime.onnxruntime import runtime_version

    out = {"onnxruntime": runtime_version()}
    for name, dist in _DISTRIBUTION.items():
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def unavailable(runtime: str) -> RuntimeUnavailable:
    return RuntimeUnavailable(
        f"this model needs the {runtime} runtime, which is not installed here: "
        f"pip install 'edgefleet[{_EXTRA[runtime]}]' (the {_DISTRIBUTION[runtime]} package)"
    )


def open_backend(
    runtime: str,
    model: bytes,
    *,
    model_format: str | None = None,
    settings: RuntimeSettings | None = None,
    providers: Sequence[str] | None = None,
) -> Backend:
    """Load ``model`` in ``runtime``. ``providers``: onnxruntime execution providers in order of preference (the
    first available is used, the CPU is the fallback); other runtimes run on the CPU."""
    fmt = cast(ModelFormat, model_format) if model_format else detect_format(model)
    if runtime not in FORMATS:
        raise ModelError(f"unknown runtime {runtime!r}; edgefleet runs {', '.join(RUNTIMES)}")
    if fmt not in FORMATS[runtime]:
        raise ModelError(f"{runtime} cannot run a {fmt} model (it reads {', '.join(FORMATS[runtime])})")
    if runtime == "onnxruntime":
        from edgefleet.runtime.onnxruntime import OrtSession

        return OrtSession(model, settings, preferred=providers)
    if runtime == "openvino":
        try:
            from edgefleet.runtime.openvino import OpenVinoModel
        except ImportError:
            raise unavailable(runtime)
        return OpenVinoModel(model, fmt, settings)
    try:
        from edgefleet.runtime.litert import LiteRtModel
    except ImportError:
        raise unavailable(runtime)
    return LiteRtModel(model, settings)
