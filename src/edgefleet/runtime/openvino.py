"""The OpenVINO backend (``edgefleet[openvino]``): an ONNX model, or OpenVINO's IR, compiled for the CPU.

An IR is two files, the graph (``.xml``) and its weights (``.bin``); a package holds a model as one member (one
hash, one ciphertext), so an IR travels as one uncompressed tar of ``model.xml`` and ``model.bin``
(:func:`ir_bundle`), read back in memory. Inference precision is held at f32: on CPUs with bf16 units OpenVINO would
otherwise pick bf16 by itself, and a device would then miss golden vectors computed on another machine.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from edgefleet.config import RuntimeSettings
from edgefleet.errors import ModelError
from edgefleet.runtime.schema import ONNX_TO_NUMPY, TensorSpec

__all__ = ["OpenVinoModel", "ir_bundle", "read_ir_bundle", "read_ir_files", "runtime_version"]

DEVICE = "CPU"
_IR_MEMBERS = ("model.bin", "model.xml")


def runtime_version() -> str:
    return str(ov.__version__).split("-", 1)[0]


def ir_bundle(xml: bytes, weights: bytes) -> bytes:
    """An IR as one reproducible blob: an uncompressed tar of ``model.xml`` and ``model.bin`` (mtime 0, 0:0)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in zip(_IR_MEMBERS, (weights, xml), strict=True):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_ir_files(xml_path: Path) -> bytes:
    """The bundle of an IR on disk: ``X.xml`` and the ``X.bin`` beside it."""
    weights = xml_path.with_suffix(".bin")
    if not weights.is_file():
        raise ModelError(f"{xml_path} is an OpenVINO IR graph, but its weights {weights.name} are not beside it")
    return ir_bundle(xml_path.read_bytes(), weights.read_bytes())


def read_ir_bundle(data: bytes) -> tuple[bytes, bytes]:
    """(xml, weights) from :func:`ir_bundle`'s blob; nothing is extracted to disk."""
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if info.name not in _IR_MEMBERS or not info.isreg():
                    raise ModelError(f"an OpenVINO IR bundle holds only model.xml and model.bin, not {info.name!r}")
                fh = tar.extractfile(info)
                out[info.name] = fh.read() if fh is not None else b""
    except tarfile.TarError as err:
        raise ModelError(f"the OpenVINO IR bundle is not a readable tar: {err}")
    if "model.xml" not in out:
        raise ModelError("the OpenVINO IR bundle has no model.xml")
    return out["model.xml"], out.get("model.bin", b"")


def _spec(port: Any) -> TensorSpec:
    dims: list[int | str | None] = [None if d.is_dynamic else int(d.get_length()) for d in port.get_partial_shape()]
    dtype = np.dtype(port.get_element_type().to_dtype()).name
    if dtype not in ONNX_TO_NUMPY.values():
        raise ModelError(f"tensor {port.get_any_name()!r} has element type {dtype}, which edgefleet does not carry")
    return TensorSpec(name=port.get_any_name(), dtype=dtype, shape=dims)


class OpenVinoModel:
    """A model compiled by OpenVINO for the CPU. ``run`` does no validation; :class:`edgefleet.runtime.Model` does."""

    name = "openvino"
    provider = DEVICE

    def __init__(self, model: bytes, model_format: str, settings: RuntimeSettings | None = None) -> None:
        s = settings or RuntimeSettings()
        core = ov.Core()
        try:
            if model_format == "openvino-ir":
                xml, weights = read_ir_bundle(model)
                graph = core.read_model(xml, ov.Tensor(np.frombuffer(weights, dtype=np.uint8)))
            else:
                graph = core.read_model(model)
            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
            if s.intra_op_threads:
                config["INFERENCE_NUM_THREADS"] = s.intra_op_threads
            self._compiled = core.compile_model(graph, DEVICE, config)
        except ModelError:
            raise
        except Exception as err:  # OpenVINO raises RuntimeError with a multi-line report
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            detail = next((ln for ln in lines if ln.startswith("--")), lines[0] if lines else type(err).__name__)
            raise ModelError(f"OpenVINO cannot load the model: {detail.lstrip('- ')}")
        self._request = self._compiled.create_infer_request()
        self.version = runtime_version()
        self.inputs = [_spec(p) for p in self._compiled.inputs]
        self.outputs = [_spec(p) for p in self._compiled.outputs]
        self._ports = {o.name: port for o, port in zip(self.outputs, self._compiled.outputs, strict=True)}

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        names = output_names or list(self._ports)
        try:
            unknown = [n for n in names if n not in self._ports]
            if unknown:
                raise ModelError(f"the model has no output {unknown[0]!r}")
            result = self._request.infer(feeds)
            # copies: the request reuses its output buffers on the next call
            return {n: np.array(result[self._ports[n]], copy=True) for n in names}
        except ModelError:
            raise
        except Exception as err:
            raise ModelError(f"inference failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
