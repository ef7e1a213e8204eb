"""Device tier profiles: a class of device a model is benchmarked for and rolled out to."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgefleet.errors import ConfigError, yaml_error_message

__all__ = [
    "ISA_FLAGS",
    "TierProfile",
    "default_tiers",
    "emulation_reason",
    "get_tier",
    "host_isa_features",
    "host_tier",
    "is_emulated",
    "known_tier",
    "load_tiers",
    "normalize_arch",
]

# The CPU flags edgefleet reads from /proc/cpuinfo (``flags`` on x86, ``Features`` on Arm). A tier's isa_features
# outside this list can never be seen on a host, so such a tier always counts as emulated: unsure means emulated.
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "neon",
    "asimd",
    "asimdhp",
    "asimddp",
    "asimdrdm",
    "fp16",
    "fphp",
    "bf16",
    "i8mm",
    "sve",
    "sve2",
)

# Names a profile may use for a feature that /proc/cpuinfo spells otherwise: 64-bit Arm kernels call NEON
# "asimd", and half-precision arithmetic "fphp"/"asimdhp".
_ISA_ALIASES = {"neon": ("neon", "asimd"), "fp16": ("fp16", "fphp", "asimdhp")}

# What uname and package managers call the same architecture.
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64", "armv8l": "aarch64"}


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
    # Every runtime the tier's devices can load, name → version (as devices report ``Hardware.runtimes``): a
    # LiteRT or OpenVINO package is judged against these. Unset: ``runtime`` at ``runtime_version`` alone.
    runtimes: dict[str, str] = Field(default_factory=dict)
    execution_providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    chipset: str | None = None
    isa_features: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _primary_runtime_listed(self) -> TierProfile:
        listed = self.runtimes.get(self.runtime)
        if listed is not None and listed != self.runtime_version:
            raise ValueError(
                f"runtimes lists {self.runtime} {listed} but runtime_version is {self.runtime_version}: give one"
            )
        # frozen model: fill the primary in once, so every reader sees the whole set
        object.__setattr__(self, "runtimes", {self.runtime: self.runtime_version, **self.runtimes})
        return self

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


@lru_cache(maxsize=1)
def _shipped() -> tuple[TierProfile, ...]:
    # parsed once: the control plane looks a tier up at every enrollment
    text = resources.files("edgefleet.bench").joinpath("profiles/default.yaml").read_text()
    return tuple(_parse(yaml.safe_load(text), "default tiers"))


def default_tiers() -> dict[str, TierProfile]:
    return {t.name: t for t in _shipped()}


def load_tiers(path: str | os.PathLike[str]) -> dict[str, TierProfile]:
    """Every tier in a YAML file (one tier, or a list like the shipped profiles): the tiers a fleet adds."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"tier file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{yaml_error_message(str(p), err)} (not valid YAML)")
    return {t.name: t for t in _parse(raw, str(p))}


def known_tier(name: str, extra: Mapping[str, TierProfile] | None = None) -> None:
    """Refuse a tier name that is neither shipped nor in ``extra`` (tiers a server or a user added), naming the
    known ones: a typo such as ``arm-a99`` must not become a tier nothing can ever match."""
    tiers = {**default_tiers(), **(extra or {})}
    if name not in tiers:
        raise ConfigError(f"unknown tier {name!r}; known tiers: {', '.join(sorted(tiers))}")


def get_tier(name_or_path: str | os.PathLike[str]) -> TierProfile:
    """A shipped tier by name, or the (single) tier in a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"tier file {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{yaml_error_message(str(p), err)} (not valid YAML)")
        parsed = _parse(raw, str(p))
        if len(parsed) != 1:
            raise ConfigError(f"{p} holds {len(parsed)} tiers; give one tier per file")
        return parsed[0]
    known_tier(str(name_or_path))
    return default_tiers()[str(name_or_path)]


def host_isa_features() -> list[str]:
    """This host's CPU flags of interest (from /proc/cpuinfo; empty where it does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in ISA_FLAGS if f in flags]
    return []


def normalize_arch(arch: str) -> str:
    a = arch.strip().lower()
    return _ARCH_ALIASES.get(a, a)


def emulation_reason(tier: TierProfile, arch: str, isa_features: Iterable[str] | None) -> str | None:
    """Why a machine of ``arch`` with ``isa_features`` is not the tier's hardware, or None when it is.

    Pure. ``isa_features`` None means the machine's features are unknown (an older agent): only the architecture
    is judged. A measurement where this is not None emulates the tier and is labelled so everywhere."""
    if normalize_arch(arch) != normalize_arch(tier.arch):
        return f"host is {arch}, tier {tier.name} is {tier.arch}"
    if isa_features is None:
        return None
    have = set(isa_features)
    missing = [f for f in tier.isa_features if not have.intersection(_ISA_ALIASES.get(f, (f,)))]
    if missing:
        return f"host lacks {', '.join(missing)} of tier {tier.name}"
    return None


def is_emulated(tier: TierProfile, arch: str, isa_features: Iterable[str] | None) -> bool:
    return emulation_reason(tier, arch, isa_features) is not None


def host_tier() -> TierProfile:
    """This machine as a tier (the default of ``edgefleet bench`` when no ``--tier`` is given)."""
    import platform

    import psutil

    from edgefleet.runtime import runtime_version
    from edgefleet.runtime.backends import available_runtimes

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return TierProfile(
        name="host",
        arch=platform.machine() or "unknown",
        cpu_threads=cores,
        memory_mb=int(psutil.virtual_memory().total // (1024 * 1024)),
        runtime_version=runtime_version(),
        runtimes=available_runtimes(),
        chipset=None,
        isa_features=host_isa_features(),
    )
