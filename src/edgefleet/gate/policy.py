"""The release policy (``policy.yaml``): what a candidate must satisfy to be published. Documented in docs/gate.md.

Every section is optional; a section that is present adds its checks. Unknown keys are errors (a typo such as
``p59_ms`` must not silently disable a check), and tiers must exist (shipped, or a tier YAML file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.bench.tiers import TierProfile, get_tier
from edgefleet.errors import ConfigError, yaml_error_message

__all__ = [
    "AccuracyPolicy",
    "ColdStartPolicy",
    "CompatibilityPolicy",
    "GatePolicy",
    "LatencyPolicy",
    "MemoryPolicy",
    "PackagePolicy",
    "ProductionPolicy",
    "RegressionPolicy",
    "ResolvedPolicy",
    "SizePolicy",
    "load_policy",
    "parse_policy",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AccuracyPolicy(_Section):
    """Accuracy drop from the float baseline, read from the optimize report (higher scores are better)."""

    max_drop: float | None = Field(None, ge=0, description="largest allowed overall drop (absolute, e.g. 0.01)")
    max_slice_drop: float | None = Field(None, ge=0, description="largest allowed drop on any one slice")


class LatencyPolicy(_Section):
    """p95 budget per tier (ms). Passes when the p95 CI's upper bound is within budget, fails when its lower
    bound is over it, and is inconclusive in between or with fewer than ``min_samples`` samples."""

    p95_ms: dict[str, float] = Field(description="tier name → p95 budget in milliseconds")
    min_samples: int = Field(100, ge=1)


class RegressionPolicy(_Section):
    """The paired comparison against the baseline: fails on a *practical* slowdown only."""

    max_slowdown: float = Field(0.05, gt=0, description="fail when the median-ratio CI lies above 1 + this")


class MemoryPolicy(_Section):
    max_peak_rss_mb: float | None = Field(None, gt=0, description="default: each tier's memory_mb")


class ColdStartPolicy(_Section):
    max_ms: float = Field(gt=0, description="session creation + first inference")


class SizePolicy(_Section):
    max_model_mb: float | None = Field(None, gt=0)
    max_package_mb: float | None = Field(None, gt=0)


class CompatibilityPolicy(_Section):
    """Every target tier: the bench verified the model there, its opset fits the tier's runtime, and (with
    ``--package``) the manifest's requirements admit the tier."""

    enabled: bool = True


class PackagePolicy(_Section):
    """The package is valid: manifest schema and member hashes, golden vectors reproduce, ML-BOM present."""

    golden: bool = True
    bom: bool = True


class ProductionPolicy(_Section):
    """The candidate against the version devices run today (``--production-report``), overall and per slice.
    Skipped without a production report unless ``required``."""

    max_drop: float = Field(0.0, ge=0, description="largest allowed overall drop below production (absolute)")
    max_slice_drop: float | None = Field(None, ge=0, description="largest allowed drop below production on a slice")
    required: bool = Field(False, description="fail, rather than skip, when the comparison cannot be made")


class GatePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    tiers: list[str] = Field(
        default_factory=list, description="target tiers (names or tier YAML files); empty = the tiers in the bench"
    )
    allow_inconclusive: bool = Field(False, description="let inconclusive checks pass the gate")
    allow_emulated: bool = Field(
        False,
        description="judge p95 and compatibility measured on a host that only emulates the tier (another "
        "architecture or ISA) as if measured on the tier; by default such results are inconclusive",
    )
    accuracy: AccuracyPolicy | None = None
    latency: LatencyPolicy | None = None
    regression: RegressionPolicy | None = None
    memory: MemoryPolicy | None = None
    cold_start: ColdStartPolicy | None = None
    size: SizePolicy | None = None
    compatibility: CompatibilityPolicy | None = None
    package: PackagePolicy | None = None
    production: ProductionPolicy | None = None


class ResolvedPolicy(BaseModel):
    """A policy whose tier names have been looked up."""

    model_config = ConfigDict(frozen=True)

    policy: GatePolicy
    tiers: dict[str, TierProfile]


def _field(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def parse_policy(raw: object, source: str = "policy", base_dir: Path | None = None) -> ResolvedPolicy:
    """Validate a policy document; :class:`ConfigError` names the offending field."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: a policy is a mapping of sections (accuracy, latency, ...), not {type(raw).__name__}"
        )
    try:
        policy = GatePolicy.model_validate(raw)
    except ValidationError as err:
        # A misspelt key also makes the key it was meant to be "missing"; name the misspelling first.
        e = sorted(err.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]
        what = "unknown field" if e["type"] == "extra_forbidden" else "field"
        raise ConfigError(f"{source}: {what} {_field(tuple(e['loc']))!r}: {e['msg']}")
    tiers: dict[str, TierProfile] = {}
    for i, name in enumerate(policy.tiers):
        ref = Path(name)
        if base_dir is not None and ref.suffix in (".yaml", ".yml") and not ref.is_absolute():
            ref = base_dir / ref
        try:
            tier = get_tier(ref if ref.suffix in (".yaml", ".yml") else name)
        except ConfigError as err:
            raise ConfigError(f"{source}: field 'tiers[{i}]': {err}")
        tiers[tier.name] = tier
    if policy.latency is not None and tiers:
        for name in policy.latency.p95_ms:
            if name not in tiers:
                raise ConfigError(
                    f"{source}: field 'latency.p95_ms.{name}': tier {name!r} is not among the policy's tiers "
                    f"({', '.join(tiers)})"
                )
    elif policy.latency is not None:
        for name in policy.latency.p95_ms:
            try:
                get_tier(name)
            except ConfigError as err:
                raise ConfigError(f"{source}: field 'latency.p95_ms.{name}': {err}")
    return ResolvedPolicy(policy=policy, tiers=tiers)


def load_policy(path: str | Path) -> ResolvedPolicy:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"policy file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{yaml_error_message(str(p), err)} (not valid YAML)")
    return parse_policy(raw, str(p), p.parent)
