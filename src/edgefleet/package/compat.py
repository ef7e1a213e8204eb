"""Does a device fit a package? A pure function over the manifest's requirements and the device's facts."""

from __future__ import annotations

import re

from edgefleet.package.manifest import Manifest

__all__ = ["check_requirements", "version_tuple"]


def version_tuple(version: str) -> tuple[int, ...]:
    """``"1.17.3"`` → ``(1, 17, 3)``; trailing non-numeric parts (``rc1``, ``+cpu``) are ignored."""
    parts: list[int] = []
    for piece in version.split("."):
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)


def check_requirements(
    manifest: Manifest,
    *,
    tier: str | None,
    runtime_version: str,
    memory_mb: int | None,
    max_opset: int | None = None,
) -> list[str]:
    """Reasons the device cannot run the package; ``[]`` means compatible."""
    req = manifest.requirements
    reasons: list[str] = []
    if req.tiers and tier not in req.tiers:
        reasons.append(f"tier {tier or '(none)'} is not among the package's tiers {', '.join(req.tiers)}")
    if req.min_runtime_version and version_tuple(runtime_version) < version_tuple(req.min_runtime_version):
        reasons.append(f"{req.runtime} {runtime_version} is older than the required {req.min_runtime_version}")
    if req.min_memory_mb is not None and memory_mb is not None and memory_mb < req.min_memory_mb:
        reasons.append(f"{memory_mb} MB of memory is less than the required {req.min_memory_mb} MB")
    if req.opset is not None and max_opset is not None and req.opset > max_opset:
        reasons.append(f"the model needs ONNX opset {req.opset}; the runtime supports up to {max_opset}")
    return reasons
