"""The model registry: models, versions, lineage, gate verdicts and bench results attached to a version, channels
(``dev → canary → stable``) and promotion."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.controlplane import compat
from edgefleet.controlplane.db import ModelVersion
from edgefleet.errors import ConflictError, NotFoundError, UsageError
from edgefleet.package.manifest import Manifest
from edgefleet.telemetry.drift import DriftReference

__all__ = [
    "CHANNELS",
    "attach_bench",
    "attach_gate",
    "get_version",
    "list_models",
    "manifest_of",
    "promote",
    "register_version",
    "version_dict",
]

CHANNELS = ("dev", "canary", "stable")


def version_dict(mv: ModelVersion, *, full: bool = False) -> dict[str, Any]:
    d: dict[str, Any] = {
        "model": mv.model,
        "version": mv.version,
        "channel": mv.channel,
        "target": mv.target,
        "package_sha256": mv.package_sha256,
        "model_sha256": mv.model_sha256,
        "length": mv.length,
        "requirements": mv.requirements,
        "lineage": mv.lineage,
        "gate": (mv.gate or {}).get("verdict", (mv.gate or {}).get("passed")) if not full else mv.gate,
        "created_at": mv.created_at.isoformat(),
    }
    d["drift_features"] = (
        None if mv.drift_reference is None else [f.get("name") for f in mv.drift_reference.get("features", [])]
    )
    if full:
        d["bench"] = mv.bench
        d["manifest"] = mv.manifest
    return d


def register_version(
    s: Session,
    manifest: Manifest,
    *,
    target: str,
    package_sha256: str,
    length: int,
    reference: DriftReference | None = None,
) -> ModelVersion:
    """Add a published package; re-publishing the identical package is a no-op, a different one a conflict.

    The package's drift reference (``reference.json``) is kept with the version: the fleet's merged per-bin counts
    are scored against it on the server."""
    existing = s.scalar(
        select(ModelVersion).where(ModelVersion.model == manifest.name, ModelVersion.version == manifest.version)
    )
    if existing is not None:
        if existing.package_sha256 == package_sha256:
            if existing.drift_reference is None and reference is not None:
                existing.drift_reference = reference.model_dump(mode="json")  # registered before it was kept
            return existing
        raise ConflictError(
            f"{manifest.name} {manifest.version} is already registered with another package; bump the version"
        )
    mv = ModelVersion(
        model=manifest.name,
        version=manifest.version,
        target=manifest.target_name,
        package_sha256=package_sha256,
        model_sha256=manifest.model_sha256,
        length=length,
        channel="dev",
        requirements=manifest.requirements.model_dump(mode="json"),
        lineage=manifest.lineage.model_dump(mode="json"),
        manifest=manifest.model_dump(mode="json"),
        drift_reference=None if reference is None else reference.model_dump(mode="json"),
    )
    s.add(mv)
    s.flush()
    return mv


def get_version(s: Session, model: str, version: str) -> ModelVersion:
    mv = s.scalar(select(ModelVersion).where(ModelVersion.model == model, ModelVersion.version == version))
    if mv is None:
        raise NotFoundError(f"no version {version} of model {model}: publish it with `edgefleet publish --server`")
    return mv


def manifest_of(mv: ModelVersion) -> Manifest | None:
    try:
        return Manifest.model_validate(mv.manifest)
    except ValueError:
        return None


def list_models(s: Session, name: str | None = None) -> list[dict[str, Any]]:
    q = select(ModelVersion).order_by(ModelVersion.model, ModelVersion.created_at)
    if name is not None:
        q = q.where(ModelVersion.model == name)
    out: dict[str, dict[str, Any]] = {}
    for mv in s.scalars(q):
        m = out.setdefault(mv.model, {"model": mv.model, "versions": [], "channels": {}})
        m["versions"].append(version_dict(mv))
        m["channels"][mv.channel] = mv.version  # the newest version in each channel
    if name is not None and not out:
        raise NotFoundError(f"no model named {name}")
    return list(out.values())


def attach_gate(s: Session, mv: ModelVersion, verdict: dict[str, Any]) -> None:
    mv.gate = verdict


def attach_bench(s: Session, mv: ModelVersion, bench: dict[str, Any]) -> int:
    mv.bench = bench
    return compat.record_bench(s, mv.model, mv.version, bench)


def promote(s: Session, mv: ModelVersion, to: str | None = None) -> tuple[str, str]:
    """One step along the channels, or to ``to``; never backwards (demote by promoting another version)."""
    if mv.channel not in CHANNELS:
        raise ConflictError(f"{mv.model} {mv.version} is in unknown channel {mv.channel}")
    cur = CHANNELS.index(mv.channel)
    if to is None:
        if cur == len(CHANNELS) - 1:
            raise ConflictError(f"{mv.model} {mv.version} is already in {mv.channel}")
        new = CHANNELS[cur + 1]
    else:
        if to not in CHANNELS:
            raise UsageError(f"unknown channel {to!r}; channels are {', '.join(CHANNELS)}")
        if CHANNELS.index(to) <= cur:
            raise ConflictError(f"{mv.model} {mv.version} is already in {mv.channel}; promotion only moves forward")
        new = to
    gate = mv.gate or {}
    if new == "stable" and gate and gate.get("passed") is False:
        raise ConflictError(f"{mv.model} {mv.version} failed its gate; it cannot be promoted to stable")
    old, mv.channel = mv.channel, new
    return old, new
