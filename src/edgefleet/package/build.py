"""Build a ``.efpkg``: run the model on the user's samples (golden vectors) and reference data (drift reference),
describe it (manifest, ML-BOM), optionally encrypt it, and write a reproducible tar."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from edgefleet.data import CallData
from edgefleet.errors import ModelError, PackageError, UsageError
from edgefleet.package import golden as _golden
from edgefleet.package._tar import write_tar
from edgefleet.package.bom import build_bom
from edgefleet.package.crypto import encrypt_model
from edgefleet.package.keys import parse_public_key
from edgefleet.package.manifest import (
    MODEL_MEMBERS,
    GoldenTolerance,
    IOSchema,
    Lineage,
    Manifest,
    Requirements,
    validation_message,
)
from edgefleet.runtime import Model, Step, TensorSpec, detect_format
from edgefleet.runtime.backends import FORMATS, ModelFormat, RuntimeName
from edgefleet.telemetry.drift import build_reference

__all__ = ["FIXED_EPOCH", "build_package", "source_date_epoch"]

# 1980-01-01T00:00:00Z: the oldest time a zip can hold, the usual choice of reproducible-build tools.
FIXED_EPOCH = 315532800
DEFAULT_GOLDEN_CALLS = 8


def source_date_epoch() -> int:
    """``SOURCE_DATE_EPOCH`` (reproducible-builds.org) when set, else :data:`FIXED_EPOCH`."""
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None or raw.strip() == "":
        return FIXED_EPOCH
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"SOURCE_DATE_EPOCH={raw!r} is not an integer number of seconds")
    if value < 0:
        raise UsageError("SOURCE_DATE_EPOCH must not be negative")
    return value


def _opset(model_bytes: bytes) -> int | None:
    import onnx

    try:
        proto = onnx.load_from_string(model_bytes)
    except Exception as err:
        raise ModelError(f"the model is not a readable ONNX file: {err}")
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


# The runtime a model's format implies when the requirements name none.
_DEFAULT_RUNTIME: dict[ModelFormat, RuntimeName] = {
    "onnx": "onnxruntime",
    "tflite": "litert",
    "openvino-ir": "openvino",
}


def _read_model(model: Path | bytes) -> tuple[bytes, ModelFormat]:
    """The model's bytes and format; an OpenVINO IR ``.xml`` is bundled with its ``.bin`` (runtime/openvino.py)."""
    if isinstance(model, bytes):
        return model, detect_format(model)
    p = Path(model)
    if not p.is_file():
        raise UsageError(f"model file {p} does not exist")
    if p.suffix == ".xml":
        from edgefleet.runtime.backends import unavailable

        try:
            from edgefleet.runtime.openvino import read_ir_files
        except ImportError:
            raise unavailable("openvino")
        return read_ir_files(p), "openvino-ir"
    data = p.read_bytes()
    return data, detect_format(data)


def _requirements(req: Requirements | None, model_format: ModelFormat) -> Requirements:
    req = req or Requirements()
    if "runtime" not in req.model_fields_set:
        req = req.model_copy(update={"runtime": _DEFAULT_RUNTIME[model_format]})
    if model_format not in FORMATS[req.runtime]:
        raise UsageError(
            f"runtime {req.runtime} cannot run a {model_format} model (it reads {', '.join(FORMATS[req.runtime])})"
        )
    return req


def _golden_calls(model: Model, samples: CallData | None) -> CallData:
    if samples is not None:
        return samples if len(samples) <= _golden.MAX_GOLDEN_CALLS else samples.subset(range(_golden.MAX_GOLDEN_CALLS))
    feeds = [model.sample_feed(seed=i) for i in range(DEFAULT_GOLDEN_CALLS)]
    return CallData({name: np.stack([f[name] for f in feeds]) for name in feeds[0]})


def build_package(
    model: Path | bytes,
    out: Path,
    *,
    name: str,
    version: str,
    sample_inputs: CallData | None = None,
    reference_data: CallData | None = None,
    inputs: list[TensorSpec] | None = None,
    outputs: list[TensorSpec] | None = None,
    preprocessing: Sequence[Step] = (),
    postprocessing: Sequence[Step] = (),
    requirements: Requirements | None = None,
    lineage: Lineage | None = None,
    metrics: dict[str, Any] | None = None,
    golden: GoldenTolerance | None = None,
    recipients: list[str] | None = None,
) -> Path:
    """Write a ``.efpkg`` to ``out`` and return its path. Unencrypted packages rebuild byte-identically.

    ``model``: ONNX, ``.tflite``, or an OpenVINO IR ``.xml`` (its ``.bin`` beside it). Golden vectors come from the
    runtime the requirements name — by default the one the format implies (onnxruntime, litert, openvino)."""
    model_bytes, model_format = _read_model(model)
    req = _requirements(requirements, model_format)
    model_sha256 = hashlib.sha256(model_bytes).hexdigest()
    opset = _opset(model_bytes) if model_format == "onnx" else None
    runner = Model(
        model_bytes,
        inputs=inputs,
        outputs=outputs,
        preprocessing=preprocessing,
        postprocessing=postprocessing,
        runtime=req.runtime,
        model_format=model_format,
        providers=req.execution_providers,
    )

    calls = _golden_calls(runner, sample_inputs)
    try:
        golden_out = _golden.run_calls(runner, calls)
    except ModelError as err:
        if sample_inputs is not None:
            raise  # already names the input and the schema
        raise PackageError(f"cannot compute golden vectors on random inputs ({err}); give real ones with --samples")

    reference_json: bytes | None = None
    if reference_data is not None:
        ref_out = [runner.run(feed) for feed in reference_data]
        ref = build_reference(zip(reference_data, ref_out, strict=True))
        reference_json = (ref.model_dump_json(indent=2) + "\n").encode()

    if req.opset is None and opset is not None:
        req = req.model_copy(update={"opset": opset})
    epoch = source_date_epoch()
    created = datetime.fromtimestamp(epoch, tz=UTC)
    try:
        manifest = Manifest(
            name=name,
            version=version,
            created=created,
            lineage=lineage or Lineage(),
            io=IOSchema(inputs=runner.inputs, outputs=runner.outputs),
            preprocessing=list(preprocessing),
            postprocessing=list(postprocessing),
            requirements=req,
            metrics=metrics or {},
            golden=golden or GoldenTolerance(),
            model_format=model_format,
            model_sha256=model_sha256,
            model_size=len(model_bytes),
        )
    except ValidationError as err:
        raise UsageError(f"invalid package settings: {validation_message(err)}")

    members: dict[str, bytes] = {}
    if recipients:
        keys = [parse_public_key(r) for r in recipients]
        ciphertext, info = encrypt_model(model_bytes, model_sha256, keys)
        manifest = manifest.model_copy(update={"encryption": info})
        members[f"{MODEL_MEMBERS[model_format]}.enc"] = ciphertext
    else:
        members[MODEL_MEMBERS[model_format]] = model_bytes
    members["golden.npz"] = _golden.write_golden(calls.inputs, golden_out)
    if reference_json is not None:
        members["reference.json"] = reference_json
    members["bom.cdx.json"] = build_bom(manifest, created=created)
    files = {k: hashlib.sha256(v).hexdigest() for k, v in sorted(members.items())}
    manifest = manifest.model_copy(update={"files": files})
    members["manifest.json"] = manifest.to_json()
    out = Path(out)
    write_tar(out, members, mtime=epoch)
    return out
