"""Device tier profiles: a class of device a model is benchmarked for and rolled out to."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.errors import ConfigError

__all__ = ["TierProfile", "default_tiers", "get_tier", "host_isa_features", "host_tier"]


class TierProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    arch: str
    cpu_threads: int = Field(ge=1)
    # Threads per inference call, as the device's agent serves the model (``edgefleet agent
    # --intra-op-threads``, default 1): what bench and optimize measure, so their figures are what ships.
    # cpu_threads is the cores the tier has (the benchmark pins itself to that many).
    intra_op_threads: int = Field(1, ge=1)
    memory_mb: int = Field(ge=1)
    runtime: str = "onnxruntime"
    runtime_version: str
    execution_providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    chipset: str | None = None
    isa_features: list[str] = Field(default_factory=list)

    @property
    def has_vnni(self) -> bool:
        return any("vnni" in f for f in self.isa_features)

    @property
    def supports_fp16(self) -> bool:
        """Native FP16 arithmetic: ARMv8.2 fp16 or AVX512-FP16. Elsewhere FP16 only adds casts."""
        return any(f in ("fp16", "asimdhp", "avx512_fp16") for f in self.isa_features)


def _parse(raw: object, source: str) -> list[TierProfile]:
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for i, item in enumerate(items):
        try:
            out.append(TierProfile.model_validate(item))
        except ValidationError as err:
            e = err.errors()[0]
            field = ".".join(str(p) for p in e["loc"]) or "(root)"
            raise ConfigError(f"{source}: tier #{i} field {field!r}: {e['msg']}")
    return out


def default_tiers() -> dict[str, TierProfile]:
    text = resources.files("edgefleet.bench").joinpath("profiles/default.yaml").read_text()
    return {t.name: t for t in _parse(yaml.safe_load(text), "default tiers")}


def get_tier(name_or_path: str | os.PathLike[str]) -> TierProfile:
    """A shipped tier by name, or the (single) tier in a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"tier file {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{p} is not valid YAML: {err}")
        parsed = _parse(raw, str(p))
        if len(parsed) != 1:
            raise ConfigError(f"{p} holds {len(parsed)} tiers; give one tier per file")
        return parsed[0]
    tiers = default_tiers()
    if str(name_or_path) not in tiers:
        raise ConfigError(f"unknown tier {str(name_or_path)!r}; known tiers: {', '.join(sorted(tiers))}")
    return tiers[str(name_or_path)]


def host_isa_features() -> list[str]:
    """This host's CPU flags of interest (from /proc/cpuinfo; empty where it does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            wanted = (
                "sse4_2",
                "avx",
                "avx2",
                "fma",
                "avx512f",
                "avx512_vnni",
                "avx_vnni",
                "avx512_fp16",
                "neon",
                "asimd",
                "asimdhp",
                "fp16",
                "asimddp",
                "i8mm",
            )
            return [f for f in wanted if f in flags]
    return []


def host_tier() -> TierProfile:
    """This machine as a tier (the default of ``edgefleet bench`` when no ``--tier`` is given)."""
    import platform

    import psutil

    from edgefleet.runtime import runtime_version

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return TierProfile(
        name="host",
        arch=platform.machine() or "unknown",
        cpu_threads=cores,
        memory_mb=int(psutil.virtual_memory().total // (1024 * 1024)),
        runtime_version=runtime_version(),
        chipset=None,
        isa_features=host_isa_features(),
    )
