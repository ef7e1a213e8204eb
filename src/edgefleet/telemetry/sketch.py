"""Mergeable latency sketches (DDSketch, 1 % relative accuracy). Fleet quantiles are merged, never averaged.

A sketch's wire form comes from devices, so :class:`SketchData` refuses whatever could not have come from a
:class:`LatencySketch`: another accuracy (the fleet could not merge it), bucket keys outside the range that
latencies of 1 ps .. 1 year map to (a far key makes the dense store allocate every bucket in between), keys and
counts that do not pair up, and a ``count`` the buckets do not hold.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated

from ddsketch import DDSketch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

__all__ = [
    "MAX_KEY",
    "MAX_LATENCY_S",
    "MAX_SKETCH_COUNT",
    "MIN_KEY",
    "MIN_LATENCY_S",
    "RELATIVE_ACCURACY",
    "LatencySketch",
    "SketchData",
]

RELATIVE_ACCURACY = 0.01
MIN_LATENCY_S = 1e-12
MAX_LATENCY_S = 365.25 * 86400.0
# The keys those latencies map to, from the mapping the sketch itself uses (about -1381 .. 864 at 1 %).
_MAPPING = DDSketch(RELATIVE_ACCURACY)._mapping
MIN_KEY: int = _MAPPING.key(MIN_LATENCY_S)
MAX_KEY: int = _MAPPING.key(MAX_LATENCY_S)
_MAX_BUCKETS = MAX_KEY - MIN_KEY + 1
# Counts stay exact integers in a float up to here.
MAX_SKETCH_COUNT = float(2**53)

_Count = Annotated[float, Field(ge=0, le=MAX_SKETCH_COUNT)]
_Latency = Annotated[float, Field(ge=0, le=MAX_LATENCY_S)]


class SketchData(BaseModel):
    """Wire form of a sketch: sparse bucket keys and counts of the positive store (latencies are > 0)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    relative_accuracy: float = Field(RELATIVE_ACCURACY, gt=0, lt=1)
    keys: list[Annotated[int, Field(ge=MIN_KEY, le=MAX_KEY)]] = Field(default_factory=list, max_length=_MAX_BUCKETS)
    counts: list[_Count] = Field(default_factory=list, max_length=_MAX_BUCKETS)
    zero_count: _Count = 0.0
    count: _Count = 0.0
    sum: float = Field(0.0, ge=0, le=MAX_SKETCH_COUNT * MAX_LATENCY_S)
    min: _Latency | None = None
    max: _Latency | None = None

    @field_validator("relative_accuracy")
    @classmethod
    def _fleet_accuracy(cls, v: float) -> float:
        # DDSketch merges only sketches of the same gamma: any other accuracy would break every fleet quantile.
        if v != RELATIVE_ACCURACY:
            raise ValueError(f"must be {RELATIVE_ACCURACY} (the fleet's), not {v!r}")
        return v

    @field_validator("counts")
    @classmethod
    def _paired(cls, v: list[float], info: ValidationInfo) -> list[float]:
        keys = info.data.get("keys")
        if keys is not None and len(keys) != len(v):
            raise ValueError(f"{len(v)} counts for {len(keys)} keys: each key needs exactly one count")
        return v

    @field_validator("count")
    @classmethod
    def _held(cls, v: float, info: ValidationInfo) -> float:
        counts, zero = info.data.get("counts"), info.data.get("zero_count")
        if counts is None or zero is None:
            return v  # already refused for its own reasons
        held = math.fsum(counts) + zero
        # exact when the buckets are empty: a tiny count over no bucket has no quantile
        if not math.isclose(v, held, rel_tol=1e-9, abs_tol=0.0):
            raise ValueError(f"{v:g} is not what the buckets hold ({held:g})")
        return v

    @field_validator("max")
    @classmethod
    def _ordered(cls, v: float | None, info: ValidationInfo) -> float | None:
        lo = info.data.get("min")
        if v is not None and lo is not None and v < lo:
            raise ValueError(f"max ({v:g}) is below min ({lo:g})")
        return v


class LatencySketch:
    """Latencies in seconds."""

    def __init__(self, relative_accuracy: float = RELATIVE_ACCURACY) -> None:
        self.relative_accuracy = relative_accuracy
        self._s = DDSketch(relative_accuracy)

    def add(self, seconds: float) -> None:
        if math.isnan(seconds):
            return  # not a duration; anything else is clamped, so the wire form always validates
        self._s.add(min(max(seconds, MIN_LATENCY_S), MAX_LATENCY_S))

    def extend(self, values: Iterable[float]) -> None:
        for v in values:
            self.add(v)

    def merge(self, other: LatencySketch) -> None:
        if self._s.count == 0 and other.count == 0:
            return
        self._s.merge(other._s)

    @property
    def count(self) -> float:
        return float(self._s.count)

    def quantile(self, q: float) -> float | None:
        if self._s.count == 0:
            return None
        v = self._s.get_quantile_value(q)
        return None if v is None else float(v)

    def to_data(self) -> SketchData:
        store = self._s._store
        keys: list[int] = []
        counts: list[float] = []
        for i, c in enumerate(store.bins):
            if c:
                keys.append(i + store.offset)
                counts.append(float(c))
        n = self._s.count
        return SketchData(
            relative_accuracy=self.relative_accuracy,
            keys=keys,
            counts=counts,
            zero_count=float(self._s._zero_count),
            count=float(n),
            sum=float(self._s.sum),
            min=float(self._s._min) if n else None,
            max=float(self._s._max) if n else None,
        )

    @classmethod
    def from_data(cls, data: SketchData) -> LatencySketch:
        sk = cls(data.relative_accuracy)
        inner = sk._s
        for key, c in zip(data.keys, data.counts, strict=True):
            inner._store.add(key, c)
        inner._zero_count = data.zero_count
        inner._count = data.count
        inner._sum = data.sum
        if data.count:
            inner._min = data.min if data.min is not None else 0.0
            inner._max = data.max if data.max is not None else 0.0
        return sk

    @classmethod
    def merged(cls, items: Iterable[SketchData]) -> LatencySketch:
        out = cls()
        for d in items:
            out.merge(cls.from_data(d))
        return out
