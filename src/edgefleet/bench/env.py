"""The environment fingerprint recorded with every bench result: what ran, where, emulating which tier."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil
from pydantic import BaseModel, ConfigDict

from edgefleet import __version__
from edgefleet.bench.tiers import TierProfile, emulation_reason, host_isa_features

__all__ = ["Environment", "cpu_model", "describe_host", "emulation_of", "fingerprint"]


class Environment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hostname: str
    os: str
    arch: str
    cpu_model: str
    cpu_count: int
    isa_features: list[str]
    memory_total_mb: int
    python: str
    runtime: str
    runtime_version: str
    numpy_version: str
    edgefleet_version: str
    powercap: bool


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fingerprint() -> Environment:
    import numpy as np

    from edgefleet.runtime import runtime_version

    return Environment(
        hostname=platform.node(),
        os=f"{platform.system()} {platform.release()}",
        arch=platform.machine(),
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count() or 1,
        isa_features=host_isa_features(),
        memory_total_mb=int(psutil.virtual_memory().total // (1024 * 1024)),
        python=platform.python_version(),
        runtime="onnxruntime",
        runtime_version=runtime_version(),
        numpy_version=np.__version__,
        edgefleet_version=__version__,
        powercap=Path("/sys/class/powercap").is_dir(),
    )


def emulation_of(env: Environment, tier: TierProfile) -> str | None:
    """Why figures measured on ``env`` only emulate ``tier`` (None: this host is the tier's hardware). Pure."""
    return emulation_reason(tier, env.arch, env.isa_features)


def describe_host(env: Environment) -> str:
    return f"{env.arch}, {env.cpu_model}, {env.cpu_count} cores"
