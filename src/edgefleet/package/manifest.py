"""The package manifest: one pydantic model per section; its JSON Schema is ``docs/manifest.schema.json``.

The manifest is plain data: what the model is, how to feed it, what it needs and how to check it. It says nothing
about authenticity; TUF signs the whole package.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from edgefleet.errors import ManifestError
from edgefleet.runtime import Step, TensorSpec
from edgefleet.runtime.backends import FORMATS, ModelFormat, RuntimeName

__all__ = [
    "MODEL_MEMBERS",
    "SCHEMA_VERSION",
    "AccuracyLineage",
    "EncryptionInfo",
    "GoldenTolerance",
    "IOSchema",
    "Lineage",
    "Manifest",
    "Recipient",
    "Requirements",
    "manifest_json_schema",
    "parse_manifest",
    "validation_message",
]

SCHEMA_VERSION = 1
_SHA256 = r"^[0-9a-f]{64}$"
# Semantic Versioning 2.0.0, the regex the spec recommends.
SEMVER = (
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
# Names end up in TUF target names and file names: keep them path- and URL-safe.
NAME = r"^[a-z0-9][a-z0-9._-]{0,99}$"
# The package member that holds the model, by its format (``.enc`` appended when encrypted). An OpenVINO IR is one
# uncompressed tar of model.xml and model.bin (runtime/openvino.py), so that one hash and one ciphertext cover it.
MODEL_MEMBERS = {"onnx": "model.onnx", "tflite": "model.tflite", "openvino-ir": "model.ir.tar"}


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Requirements(_Base):
    """What a device needs to run the model; ``check_requirements`` compares a device against it."""

    runtime: RuntimeName = Field(
        "onnxruntime", description="what runs the model: onnxruntime, litert (ai-edge-litert) or openvino"
    )
    min_runtime_version: str | None = Field(
        None, pattern=r"^\d+(\.\d+){0,2}$", examples=["1.17.0"], description="of `runtime`"
    )
    opset: int | None = Field(None, ge=1, description="default-domain ONNX opset the model imports")
    execution_providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="onnxruntime execution providers in order of preference (CUDA, TensorRT, OpenVINO, ...): a "
        "device uses the first it has, the CPU when it has none",
    )
    min_memory_mb: int | None = Field(None, ge=1)
    tiers: list[str] = Field(default_factory=list, description="allowed device tiers; empty means any")


class AccuracyLineage(_Base):
    """The accuracy the optimizer measured for the model against its parent, and the tolerance it was held to."""

    metric: str = Field(
        description="the metric: top1, agreement, cosine, cosine-min, sqnr, ctc, or a user metric's spec"
    )
    parent: float = Field(description="the parent's score (optimize report's baseline_metrics.overall)")
    value: float = Field(description="this model's score (chosen.metrics.overall)")
    drop: float = Field(description="parent - value: positive is worse")
    slice_drops: dict[str, float] = Field(default_factory=dict, description="parent - value per slice")
    max_drop: float | None = Field(None, description="the tolerance: optimize's --max-accuracy-drop")
    max_slice_drop: float | None = Field(None, description="optimize's --max-slice-drop")


class Lineage(_Base):
    """Where the model came from: the parent model, how it was optimized, what calibrated it, what it cost."""

    parent_sha256: str | None = Field(None, pattern=_SHA256)
    recipe: dict[str, Any] | None = Field(None, description="optimization recipe (optimize report's chosen.recipe)")
    calibration_sha256: str | None = Field(None, pattern=_SHA256)
    quantized_ops: list[str] | None = Field(
        None, description="the nodes that run quantized (optimize report's chosen.op_coverage.quantized)"
    )
    accuracy: AccuracyLineage | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A package without these fields serializes exactly as before they existed: its bytes (and so its hash)
        # do not change, and agents that predate them still read its manifest.
        data: dict[str, Any] = handler(self)
        for key in ("quantized_ops", "accuracy"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class GoldenTolerance(_Base):
    """How closely a device must reproduce the golden outputs: ``|got - want| <= atol + rtol * |want|``."""

    rtol: float = Field(1e-4, ge=0)
    atol: float = Field(1e-5, ge=0)


class Recipient(_Base):
    """The content key wrapped for one X25519 public key (ECDH with an ephemeral key, HKDF-SHA256, AES-256-GCM)."""

    key_id: str = Field(pattern=r"^[0-9a-f]{16,64}$", description="sha256 of the recipient's raw public key (hex)")
    ephemeral_public_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    nonce: str = Field(pattern=r"^[0-9a-f]{24}$")
    wrapped_key: str = Field(pattern=r"^[0-9a-f]{96}$", description="AES-256-GCM(content key) with its tag")


class EncryptionInfo(_Base):
    algorithm: Literal["AES-256-GCM"] = "AES-256-GCM"
    key_wrap: Literal["X25519-HKDF-SHA256-AES-256-GCM"] = "X25519-HKDF-SHA256-AES-256-GCM"
    nonce: str = Field(pattern=r"^[0-9a-f]{24}$", description="content nonce; the AAD is the model_sha256")
    recipients: list[Recipient] = Field(min_length=1)

    @property
    def key_ids(self) -> list[str]:
        return [r.key_id for r in self.recipients]


class IOSchema(_Base):
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)


class Manifest(_Base):
    """``manifest.json`` of a ``.efpkg``."""

    schema_version: Literal[1] = 1
    name: str = Field(pattern=NAME, description="lower-case; letters, digits, '.', '_', '-'")
    version: str = Field(pattern=SEMVER, description="semantic version")
    created: datetime = Field(description="SOURCE_DATE_EPOCH or a fixed epoch, so rebuilds are byte-identical")
    lineage: Lineage = Field(default_factory=Lineage)
    io: IOSchema
    preprocessing: list[Step] = Field(default_factory=list)
    postprocessing: list[Step] = Field(default_factory=list)
    requirements: Requirements = Field(default_factory=Requirements)
    metrics: dict[str, Any] = Field(default_factory=dict, description="accuracy, per-tier latency_p95_ms, ...")
    golden: GoldenTolerance = Field(default_factory=GoldenTolerance)
    encryption: EncryptionInfo | None = None
    model_format: ModelFormat = Field(
        "onnx", description="onnx, tflite, or openvino-ir (model.xml and model.bin in one uncompressed tar)"
    )
    model_sha256: str = Field(pattern=_SHA256, description="SHA-256 of the plaintext model bytes")
    model_size: int = Field(ge=0, description="bytes of the plaintext model")
    files: dict[str, str] = Field(
        default_factory=dict, description="SHA-256 of every other member of the package, by member name"
    )

    @model_validator(mode="after")
    def _runtime_reads_format(self) -> Manifest:
        runtime = self.requirements.runtime
        if self.model_format not in FORMATS[runtime]:
            raise ValueError(
                f"requirements.runtime {runtime} cannot run a {self.model_format} model "
                f"(it reads {', '.join(FORMATS[runtime])})"
            )
        return self

    @model_serializer(mode="wrap")
    def _omit_onnx_format(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # An ONNX package serializes exactly as before model_format existed: same bytes, same hash, and agents
        # that predate it (and refuse unknown fields) still read it.
        data: dict[str, Any] = handler(self)
        if data.get("model_format") == "onnx":
            data.pop("model_format")
        return data

    @property
    def target_name(self) -> str:
        """The TUF target name of this package."""
        return f"{self.name}-{self.version}.efpkg"

    @property
    def model_member(self) -> str:
        name = MODEL_MEMBERS[self.model_format]
        return f"{name}.enc" if self.encryption else name

    def summary(self) -> dict[str, Any]:
        """What ``publish`` signs into the TUF target's custom field: enough to decide without downloading.
        (TUF's canonical JSON has no floats, so free-form metrics stay in the manifest.)"""
        return {
            "name": self.name,
            "version": self.version,
            "created": self.created.isoformat(),
            "model_sha256": self.model_sha256,
            "model_size": self.model_size,
            "requirements": self.requirements.model_dump(mode="json"),
            "encrypted": self.encryption is not None,
            "key_ids": self.encryption.key_ids if self.encryption else [],
        }

    def to_json(self) -> bytes:
        """Canonical bytes: sorted keys, fixed separators, so equal manifests serialize identically."""
        data = self.model_dump(mode="json")
        return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def parse_manifest(data: bytes | str | dict[str, Any]) -> Manifest:
    """Parse and validate a manifest; a schema violation becomes one :class:`ManifestError` line."""
    try:
        obj = json.loads(data) if isinstance(data, bytes | str) else data
    except (ValueError, UnicodeDecodeError) as err:
        raise ManifestError(f"manifest.json is not valid JSON: {err}")
    if isinstance(obj, dict) and obj.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise ManifestError(
            f"manifest schema_version {obj.get('schema_version')!r} is not supported (this edgefleet reads "
            f"{SCHEMA_VERSION}); upgrade edgefleet"
        )
    try:
        return Manifest.model_validate(obj)
    except ValidationError as err:
        raise ManifestError(f"manifest.json breaks the schema at {validation_message(err)}")


_FORMATS = {
    "version": "must be a semantic version such as 1.2.0",
    "name": "must be lower-case letters, digits, '.', '_' or '-' (at most 100)",
    "min_runtime_version": "must look like 1.17 or 1.17.0",
}


def validation_message(err: ValidationError) -> str:
    """One line for a pydantic error: where, what, and how many more (regexes are not shown to users)."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    where = ".".join(loc) or "(root)"
    msg = first["msg"]
    if first["type"] == "string_pattern_mismatch":
        field = loc[-1] if loc else ""
        if field.endswith("sha256"):
            msg = "must be 64 lower-case hex characters"
        else:
            msg = _FORMATS.get(field, "does not have the expected format")
        msg = f"{first['input']!r} {msg}"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {msg}{more}"


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema of :class:`Manifest` (``docs/manifest.schema.json``)."""
    schema = Manifest.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://edgefleet.dev/schemas/manifest.schema.json"
    return schema
