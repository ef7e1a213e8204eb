"""Agent rollouts: the agent bundle moved in the waves, and judged by the judgement, of a model rollout
(docs/operations.md, "Updating the agent").

A rollout of kind ``agent`` has ``model`` :data:`AGENT_MODEL` and ``version`` the agent version; the bundle
``edgefleet-agent-<version>-<platform>.tar`` must be a target of the repository (``edgefleet agent-bundle
publish``). A device the wave moves gets that version in its own desired state (``Device.desired_agent_version``,
rendered into its configuration document's ``agent_version`` over its group's), and keeps it once the rollout
ends; a rollback gives each moved device the agent version it reported when it was moved.

What judges a wave is :func:`~edgefleet.controlplane.rollout.judge`, unchanged:

* update outcomes come from the agent's own events of model :data:`AGENT_MODEL` (``committed`` once the new agent
  came up healthy; ``rolled_back``, ``refused`` or ``health_check_failed`` are failures), and a moved device silent
  past the device timeout fails as for a model;
* the telemetry of the served model judges the agent that serves it: crash-free rate, error rate and latency of the
  treatment (from each device's agent commit on) against the eligible devices still on their old agent, compared
  like for like per tier *and served model version* (:func:`stratum`), so a canary that happens to serve another
  model is not a regression;
* drift and field accuracy apply as usual; drift only when the treatment serves one model version (its package's
  reference bins the counts; windows of other versions are left out), otherwise it is not judged.

Everything here is pure but :func:`agent_facts`, which reads the devices.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.controlplane.db import Device, DeviceGroup
from edgefleet.controlplane.rollout import DeviceFacts

__all__ = [
    "AGENT_MODEL",
    "KIND_AGENT",
    "KIND_MODEL",
    "agent_facts",
    "agent_problems",
    "bundle_versions",
    "normal_arch",
    "platform_arch",
    "single_served",
    "stratum",
]

# the ``model`` of the agent's own update events (edgefleet.agent.selfupdate.AGENT_MODEL; the control plane does
# not import the agent layer)
AGENT_MODEL = "edgefleet-agent"
KIND_MODEL = "model"
KIND_AGENT = "agent"

_PLATFORM = re.compile(r"^manylinux(?:_\d+_\d+|\d+)_(\w+)$")
_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}


def normal_arch(arch: str) -> str:
    """An architecture as wheel tags spell it (``arm64`` → ``aarch64``)."""
    a = arch.strip().lower()
    return _ARCH_ALIASES.get(a, a)


def platform_arch(platform: str) -> str | None:
    """The architecture of a bundle's wheel platform (``manylinux_2_28_aarch64`` → ``aarch64``), None for a tag
    this does not read."""
    m = _PLATFORM.match(platform)
    return normal_arch(m.group(1)) if m else None


def bundle_versions(targets: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, frozenset[str]]:
    """Agent version → the platforms its bundle is published for, from the repository's targets ``(name,
    custom)``: those whose custom metadata ``agent_bundle`` names a version and platform (as ``edgefleet
    agent-bundle publish`` signs them)."""
    out: dict[str, set[str]] = {}
    for _name, custom in targets:
        b = custom.get("agent_bundle") if isinstance(custom, Mapping) else None
        if isinstance(b, Mapping) and b.get("version") and b.get("platform"):
            out.setdefault(str(b["version"]), set()).add(str(b["platform"]))
    return {v: frozenset(p) for v, p in out.items()}


def agent_problems(*, arch: str, agent_version: str, version: str, platforms: frozenset[str] | None) -> list[str]:
    """Why a device cannot take agent ``version``: it never reported its agent version (a rollback would have no
    version to return it to), or no bundle of the version is published for its architecture (``platforms`` None:
    not known, not checked)."""
    out: list[str] = []
    if not agent_version:
        out.append("reports no agent version: a rollback would have none to return it to")
    if platforms is not None:
        archs = {a for p in platforms if (a := platform_arch(p)) is not None}
        if normal_arch(arch or "unknown") not in archs:
            have = ", ".join(sorted(platforms)) or "none"
            out.append(f"no agent bundle {version} for {arch or 'an unreported architecture'} (published: {have})")
    return out


def stratum(tier: str | None, model: str | None, version: str | None) -> str | None:
    """The unit an agent rollout compares latency in: the tier and the model version served, so an agent is
    compared with the old agent serving the same model on the same hardware."""
    if model is None and version is None:
        return tier
    return f"{tier or '?'} · {model or '?'} {version or '?'}"


def single_served(pairs: Iterable[tuple[str | None, str | None]]) -> tuple[str, str] | None:
    """The one (model, version) the treatment served, or None when it served none or several (drift is then not
    judged: the counts of two packages' references cannot be merged)."""
    ps = {(m, v) for m, v in pairs if m is not None and v is not None}
    if len(ps) != 1:
        return None
    m, v = next(iter(ps))
    return m, v


def agent_facts(
    s: Session, version: str, platforms: frozenset[str] | None
) -> tuple[list[DeviceFacts], dict[str, Device]]:
    """Targeting facts of every device for a rollout of agent ``version``: ``version`` of the facts is the agent
    version the device reported (a device that runs ``version`` already is not moved), and a model pin does not
    exclude a device (it pins the model, not the agent)."""
    groups = {g.name: g for g in s.scalars(select(DeviceGroup))}
    devs = {d.id: d for d in s.scalars(select(Device))}
    out = []
    for d in devs.values():
        g = groups.get(d.group) if d.group else None
        arch = str((d.hardware or {}).get("arch") or "")
        out.append(
            DeviceFacts(
                device_id=d.id,
                tier=d.tier,
                runtime_version=d.runtime_version,
                memory_mb=d.memory_mb,
                channel=g.channel if g else "stable",
                pinned=False,
                revoked=d.revoked_at is not None or d.decommissioned_at is not None,
                model=AGENT_MODEL,
                version=d.agent_version or None,
                compat_problems=tuple(
                    agent_problems(arch=arch, agent_version=d.agent_version, version=version, platforms=platforms)
                ),
            )
        )
    return out, devs
