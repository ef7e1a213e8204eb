"""Mergeable latency sketches (DDSketch, 1 % relative accuracy). Fleet quantiles are merged, never averaged."""

from __future__ import annotations

from collections.abc import Iterable

from ddsketch import DDSketch
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["RELATIVE_ACCURACY", "LatencySketch", "SketchData"]

RELATIVE_ACCURACY = 0.01


class SketchData(BaseModel):
    """Wire form of a sketch: sparse bucket keys and counts of the positive store (latencies are > 0)."""

    model_config = ConfigDict(extra="forbid")

    relative_accuracy: float = Field(RELATIVE_ACCURACY, gt=0, lt=1)
    keys: list[int] = Field(default_factory=list)
    counts: list[float] = Field(default_factory=list)
    zero_count: float = Field(0.0, ge=0)
    count: float = Field(0.0, ge=0)
    sum: float = 0.0
    min: float | None = None
    max: float | None = None


class LatencySketch:
    """Latencies in seconds."""

    def __init__(self, relative_accuracy: float = RELATIVE_ACCURACY) -> None:
        self.relative_accuracy = relative_accuracy
        self._s = DDSketch(relative_accuracy)

    def add(self, seconds: float) -> None:
        self._s.add(max(seconds, 0.0))

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
