"""Does a device fit a package? A pure function over the manifest's requirements and the device's facts."""

from __future__ import annotations

import re
from collections.abc import Mapping

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
    runtimes: Mapping[str, str] | None = None,
) -> list[str]:
    """Reasons the device cannot run the package; ``[]`` means compatible. ``runtimes``: what the device can load,
    name → version; ``None`` (a device that does not say) means onnxruntime ``runtime_version`` alone."""
    req = manifest.requirements
    have = dict(runtimes) if runtimes is not None else {"onnxruntime": runtime_version}
    reasons: list[str] = []
    if req.tiers and tier not in req.tiers:
        reasons.append(f"tier {tier or '(none)'} is not among the package's tiers {', '.join(req.tiers)}")
    version = have.get(req.runtime)
    if version is None:
        reasons.append(
            f"the package runs on {req.runtime}, which the device does not have (it has {', '.join(sorted(have))})"
        )
    elif req.min_runtime_version and version_tuple(version) < version_tuple(req.min_runtime_version):
        reasons.append(f"{req.runtime} {version} is older than the required {req.min_runtime_version}")
    if req.min_memory_mb is not None and memory_mb is not None and memory_mb < req.min_memory_mb:
        reasons.append(f"{memory_mb} MB of memory is less than the required {req.min_memory_mb} MB")
    if req.opset is not None and max_opset is not None and req.runtime == "onnxruntime" and req.opset > max_opset:
        reasons.append(f"the model needs ONNX opset {req.opset}; the runtime supports up to {max_opset}")
    return reasons
