"""The CycloneDX ML-BOM (``bom.cdx.json``): the model, its lineage, and the runtime it needs.

Deterministic: fixed bom-refs, the package timestamp, and a serial number derived from the content hash.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime
from typing import Any

from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output.json import JsonV1Dot6

from edgefleet.package.manifest import Manifest

__all__ = ["build_bom"]


def _serial(manifest: Manifest) -> uuid.UUID:
    # The BOM describes this exact content, so its serial is a name-based UUID of the content hashes.
    digest = hashlib.sha256(f"{manifest.model_sha256}:{manifest.name}:{manifest.version}".encode()).digest()
    return uuid.UUID(bytes=digest[:16], version=5)


_FORMAT_NAMES = {"onnx": "ONNX", "tflite": "TFLite", "openvino-ir": "OpenVINO IR"}


def build_bom(manifest: Manifest, *, created: datetime) -> bytes:
    """The ML-BOM of a package whose manifest is ``manifest`` (its ``files`` need not be filled in)."""
    props = [
        Property(name="edgefleet:io:inputs", value="; ".join(s.signature() for s in manifest.io.inputs)),
        Property(name="edgefleet:io:outputs", value="; ".join(s.signature() for s in manifest.io.outputs)),
        Property(name="edgefleet:golden:rtol", value=repr(manifest.golden.rtol)),
        Property(name="edgefleet:golden:atol", value=repr(manifest.golden.atol)),
        Property(name="edgefleet:encrypted", value="true" if manifest.encryption else "false"),
    ]
    lin = manifest.lineage
    if lin.parent_sha256:
        props.append(Property(name="edgefleet:lineage:parent_sha256", value=lin.parent_sha256))
    if lin.calibration_sha256:
        props.append(Property(name="edgefleet:lineage:calibration_sha256", value=lin.calibration_sha256))
    if lin.recipe is not None:
        props.append(Property(name="edgefleet:lineage:recipe", value=json.dumps(lin.recipe, sort_keys=True)))
    if manifest.requirements.opset is not None:
        props.append(Property(name="edgefleet:requirements:opset", value=str(manifest.requirements.opset)))
    if manifest.requirements.tiers:
        props.append(Property(name="edgefleet:requirements:tiers", value=",".join(manifest.requirements.tiers)))
    for key, value in sorted(_flat(manifest.metrics).items()):
        props.append(Property(name=f"edgefleet:metrics:{key}", value=value))

    model = Component(
        type=ComponentType.MACHINE_LEARNING_MODEL,
        name=manifest.name,
        version=manifest.version,
        bom_ref=f"model:{manifest.name}@{manifest.version}",
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=manifest.model_sha256)],
        properties=props,
        description=f"{_FORMAT_NAMES[manifest.model_format]} model packaged by edgefleet",
    )
    req = manifest.requirements
    runtime_version = req.min_runtime_version or ""
    runtime = Component(
        type=ComponentType.LIBRARY,
        name=req.runtime,
        version=f">={runtime_version}" if runtime_version else None,
        bom_ref=f"runtime:{req.runtime}",
        properties=[Property(name="edgefleet:execution_providers", value=",".join(req.execution_providers))],
    )
    bom = Bom(serial_number=_serial(manifest))
    bom.metadata.timestamp = created
    bom.metadata.component = model
    bom.components.add(runtime)
    if lin.parent_sha256:
        parent = Component(
            type=ComponentType.MACHINE_LEARNING_MODEL,
            name=f"{manifest.name}-parent",
            bom_ref=f"model:parent:{lin.parent_sha256[:16]}",
            hashes=[HashType(alg=HashAlgorithm.SHA_256, content=lin.parent_sha256)],
            description="the model this one was derived from",
        )
        bom.components.add(parent)
        bom.register_dependency(model, [runtime, parent])
    else:
        bom.register_dependency(model, [runtime])
    text = JsonV1Dot6(bom).output_as_string(indent=2)
    # Re-dump with sorted keys: the library's key order is stable today, sorted is stable for good.
    return (json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n").encode()


def _flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _flat(value, f"{name}.")
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out
