"""The bench result file (``BENCH.json``): a pydantic schema published to ``docs/bench.schema.json``.

One :class:`ModelResult` per (model, tier). Absolute figures come from a fresh subprocess per model; the paired
comparison against ``--baseline`` comes from a subprocess running both models interleaved.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.bench.env import Environment
from edgefleet.bench.tiers import TierProfile
from edgefleet.errors import UsageError

__all__ = [
    "SCHEMA_VERSION",
    "BenchReport",
    "BenchSettings",
    "Comparison",
    "CompatEntry",
    "Emulation",
    "Energy",
    "LatencyQuantile",
    "LatencyStats",
    "ModelResult",
    "Throughput",
    "load_report",
    "schema_json",
]

SCHEMA_VERSION: Literal[1] = 1
StoppedBy = Literal["precision", "time_budget", "max_samples"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BenchSettings(_Strict):
    """How long and how precisely to measure. The defaults suit CI: a few seconds per model and tier."""

    time_budget_s: float = Field(10.0, gt=0, description="latency loop budget per model and tier")
    target_relative_half_width: float = Field(0.02, gt=0, description="stop once the p95 CI is within ±this")
    min_samples: int = Field(1000, ge=1, description="enough for a p99 interval")
    max_samples: int = Field(100_000, ge=1)
    warmup: int = Field(20, ge=0)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8, 32])
    throughput_time_s: float = Field(0.5, gt=0, description="Offline run per batch size")
    paired_time_budget_s: float = Field(10.0, gt=0)
    slower_threshold: float = Field(0.05, gt=0)
    faster_threshold: float = Field(0.03, gt=0)


class LatencyQuantile(_Strict):
    q: float
    value_ms: float | None
    ci_low_ms: float | None
    ci_high_ms: float | None
    n: int
    relative_half_width: float | None


class LatencyStats(_Strict):
    scenario: Literal["SingleStream"] = "SingleStream"
    n: int
    mean_ms: float
    quantiles: list[LatencyQuantile]
    stopped_by: StoppedBy
    target_relative_half_width: float
    duration_s: float

    def quantile(self, q: float) -> LatencyQuantile | None:
        return next((x for x in self.quantiles if abs(x.q - q) < 1e-9), None)


class Throughput(_Strict):
    scenario: Literal["Offline"] = "Offline"
    batch: int
    inferences_per_s: float | None
    runs: int
    duration_s: float
    error: str | None = None


class Energy(_Strict):
    cpu_seconds_per_inference: float
    joules_per_inference: float | None = Field(
        None, description="RAPL package energy, where /sys/class/powercap exists"
    )
    rapl_domains: list[str] = Field(default_factory=list)


class Emulation(_Strict):
    intra_op_threads: int
    affinity: list[int] | None = Field(None, description="cores the measurement was pinned to")
    memory_limit_mb: int
    rlimit_data_applied: bool
    notes: list[str] = Field(default_factory=list)


class CompatEntry(_Strict):
    tier: str
    runtime: str = Field("onnxruntime", description="the runtime the model ran on: onnxruntime, litert, openvino")
    runtime_version: str = Field(description="of that runtime")
    model_sha256: str
    result: Literal["verified", "emulated", "failed"] = Field(
        description="verified: ran on the tier's own hardware; emulated: ran, on a host that is not the tier's "
        "(never counts as verified); failed: did not run within the tier's budget"
    )
    reason: str | None = None


class Comparison(_Strict):
    """``bench.stats.PairedComparison`` against the baseline, plus what it was measured against."""

    baseline: str
    baseline_sha256: str
    n_pairs: int
    median_ratio: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float
    slower_threshold: float
    faster_threshold: float
    verdict: Literal["slower", "faster", "same", "inconclusive"]
    reason: str
    stopped_by: str


class ModelResult(_Strict):
    model: str
    model_sha256: str
    model_size_bytes: int
    package_sha256: str | None = None
    opset: dict[str, int] = Field(default_factory=dict, description="ONNX opset imports by domain ('' = ai.onnx)")
    tier: str
    tier_profile: TierProfile
    emulated: bool = Field(
        False, description="the host (environment) is not the tier's hardware: its architecture or ISA differs"
    )
    emulated_because: str | None = Field(None, description="why the host is not the tier's hardware")
    status: Literal["ok", "failed"]
    error: str | None = None
    inputs: Literal["data", "generated"]
    runtime: str = Field("onnxruntime", description="the runtime the model ran on: onnxruntime, litert, openvino")
    runtime_version: str | None = Field(None, description="of that runtime; null: the worker failed before it loaded")
    provider: str | None = Field(
        None,
        description="what ran the model in that runtime: the onnxruntime execution provider actually used (the "
        "tier's), OpenVINO's device, LiteRT's CPU; null: the worker failed before it loaded",
    )
    session_create_ms: float | None = None
    first_inference_ms: float | None = None
    cold_start_ms: float | None = None
    baseline_rss_mb: float | None = Field(None, description="the interpreter with runtime imported, before the model")
    peak_rss_mb: float | None = Field(None, description="absolute peak RSS of the measurement process")
    peak_rss_above_baseline_mb: float | None = None
    latency: LatencyStats | None = None
    throughput: list[Throughput] = Field(default_factory=list)
    energy: Energy | None = None
    emulation: Emulation | None = None
    comparison: Comparison | None = None
    compat: CompatEntry


class BenchReport(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    environment: Environment
    settings: BenchSettings
    results: list[ModelResult]

    @property
    def compat_matrix(self) -> list[CompatEntry]:
        return [r.compat for r in self.results]


def schema_json() -> str:
    """The published JSON Schema of ``BENCH.json`` (``docs/bench.schema.json``)."""
    schema: dict[str, Any] = BenchReport.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://edgefleet.dev/schemas/bench.schema.json"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def load_report(path: str | Path) -> BenchReport:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"bench file {p} does not exist")
    try:
        return BenchReport.model_validate_json(p.read_bytes())
    except ValidationError as err:
        e = err.errors()[0]
        field = ".".join(str(x) for x in e["loc"]) or "(root)"
        raise UsageError(f"{p} is not a bench report (field {field!r}: {e['msg']})")
