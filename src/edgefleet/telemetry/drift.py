"""Drift statistics: a reference of per-feature histograms, on-device accumulation, PSI.

Features of one call, from raw inputs and outputs (no raw input ever leaves the device, only histograms):

* each input tensor: per-call ``mean``, ``std``, ``min``, ``max``; and each element when the call's input has at
  most 64 elements;
* each output: integer outputs give a class histogram; float outputs give the arg-max class (more than one
  value) or a value histogram (a single value) — classifiers and regressors alike.

PSI rule of thumb: < 0.1 stable, 0.1–0.25 moderate, > 0.25 major.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "MIN_DRIFT_SAMPLE",
    "PSI_ALERT",
    "DriftAccumulator",
    "DriftReference",
    "DriftSummary",
    "FeatureReference",
    "build_reference",
    "call_features",
    "fleet_psi",
    "merge_counts",
    "psi",
]

MAX_ELEMENTS = 64
BINS = 10
PSI_ALERT = 0.25
# Below this many calls a feature's PSI is sampling noise (its expected value alone is about
# (bins - 1) * (1/n_ref + 1/n_live)): the fleet shows "not enough data", never 0.
MIN_DRIFT_SAMPLE = 200
# Wire bounds: a categorical feature has one bin per known class plus "other"; no reference has more.
MAX_BINS = 1024
MAX_FEATURE_NAME = 256
_EPS = 1e-4


class FeatureReference(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["numeric", "categorical"]
    edges: list[float] = Field(default_factory=list, description="inner bin edges (numeric)")
    categories: list[int] = Field(default_factory=list, description="known classes (categorical)")
    counts: list[float] = Field(description="reference counts per bin; categorical has one extra 'other' bin")
    quantiles: dict[str, float] = Field(default_factory=dict)
    n: int


class DriftReference(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    features: list[FeatureReference]


class DriftSummary(BaseModel):
    """What a device reports per feature and interval: the counts per reference bin (what the fleet merges) and the
    device's own PSI over them (informative only: fleet figures are computed on the merged counts)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    feature: str = Field(min_length=1, max_length=MAX_FEATURE_NAME)
    psi: float = Field(ge=0, le=1e6)
    n: int = Field(ge=0, le=2**53)
    counts: list[float] = Field(default_factory=list, max_length=MAX_BINS)

    @field_validator("counts")
    @classmethod
    def _counts(cls, v: list[float]) -> list[float]:
        if any(not 0 <= c <= 2**53 for c in v):
            raise ValueError("bin counts must be finite and non-negative")
        return v

    @model_validator(mode="after")
    def _n_matches(self) -> DriftSummary:
        if self.counts and abs(sum(self.counts) - self.n) > 0.5:
            raise ValueError(f"n ({self.n}) is not the sum of the bin counts ({sum(self.counts):g})")
        return self


def call_features(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> dict[str, float]:
    feats: dict[str, float] = {}
    for name, arr in inputs.items():
        a = np.asarray(arr)
        if a.size == 0 or a.dtype == bool:
            continue
        f = a.astype(np.float64, copy=False)
        feats[f"in.{name}.mean"] = float(f.mean())
        feats[f"in.{name}.std"] = float(f.std())
        feats[f"in.{name}.min"] = float(f.min())
        feats[f"in.{name}.max"] = float(f.max())
        if 1 < a.size <= MAX_ELEMENTS:
            for i, v in enumerate(f.reshape(-1)):
                feats[f"in.{name}[{i}]"] = float(v)
    for name, arr in outputs.items():
        a = np.asarray(arr)
        if a.size == 0:
            continue
        if np.issubdtype(a.dtype, np.integer):
            feats[f"out.{name}.class"] = float(a.reshape(-1)[0])
        elif a.size == 1:
            feats[f"out.{name}"] = float(a.reshape(-1)[0])
        elif np.issubdtype(a.dtype, np.floating):
            feats[f"out.{name}.argmax"] = float(np.argmax(a.reshape(-1)))
    return feats


def _categorical(name: str) -> bool:
    return name.endswith(".class") or name.endswith(".argmax")


def build_reference(
    calls: Iterable[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]],
) -> DriftReference:
    """Reference histograms from (raw inputs, outputs) pairs, e.g. the calibration or evaluation data."""
    columns: dict[str, list[float]] = {}
    for inputs, outputs in calls:
        for k, v in call_features(inputs, outputs).items():
            columns.setdefault(k, []).append(v)
    features = []
    for name, values in columns.items():
        x = np.asarray(values)
        if _categorical(name):
            cats = sorted({int(v) for v in x})
            counts = [float(np.sum(x == c)) for c in cats] + [0.0]
            features.append(FeatureReference(name=name, kind="categorical", categories=cats, counts=counts, n=len(x)))
            continue
        edges = sorted(set(np.quantile(x, np.linspace(0, 1, BINS + 1)[1:-1]).round(12).tolist()))
        hist = np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1)
        qs = {f"p{int(q * 100):02d}": float(np.quantile(x, q)) for q in (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)}
        features.append(
            FeatureReference(
                name=name, kind="numeric", edges=edges, counts=hist.astype(float).tolist(), quantiles=qs, n=len(x)
            )
        )
    return DriftReference(features=features)


def psi(expected: Iterable[float], actual: Iterable[float]) -> float:
    """Population stability index between two histograms over the same bins (counts, not proportions)."""
    e = np.asarray(list(expected), dtype=np.float64)
    a = np.asarray(list(actual), dtype=np.float64)
    if e.shape != a.shape:
        raise ValueError(f"histograms differ in length ({e.size} vs {a.size})")
    if e.sum() <= 0 or a.sum() <= 0:
        return 0.0
    pe = np.clip(e / e.sum(), _EPS, None)
    pa = np.clip(a / a.sum(), _EPS, None)
    return float(np.sum((pa - pe) * np.log(pa / pe)))


class DriftAccumulator:
    """Counts a device's live features into the reference's bins; cheap enough for every request."""

    def __init__(self, reference: DriftReference) -> None:
        self.reference = {f.name: f for f in reference.features}
        self.counts = {f.name: np.zeros(len(f.counts)) for f in reference.features}
        self._cat_index = {f.name: {c: i for i, c in enumerate(f.categories)} for f in reference.features}

    def add(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        for name, value in call_features(inputs, outputs).items():
            ref = self.reference.get(name)
            if ref is None:
                continue
            if ref.kind == "categorical":
                idx = self._cat_index[name].get(int(value), len(ref.categories))
            else:
                idx = int(np.searchsorted(ref.edges, value, side="right"))
            self.counts[name][idx] += 1

    def summaries(self, min_count: int = 1) -> list[DriftSummary]:
        out = []
        for name, ref in self.reference.items():
            c = self.counts[name]
            n = int(c.sum())
            if n >= min_count:
                out.append(DriftSummary(feature=name, psi=psi(ref.counts, c), n=n, counts=c.tolist()))
        return out

    def reset(self) -> None:
        for c in self.counts.values():
            c[:] = 0


def merge_counts(summaries: Iterable[DriftSummary], reference: DriftReference) -> dict[str, list[float]]:
    """Sum per-feature bin counts across windows and devices. Counts whose length does not fit the reference's
    bins (an agent on another package, a feature the reference lacks) are left out, never guessed into place."""
    bins = {f.name: len(f.counts) for f in reference.features}
    out: dict[str, np.ndarray] = {}
    for s in summaries:
        size = bins.get(s.feature)
        if size is None or len(s.counts) != size:
            continue
        acc = out.get(s.feature)
        if acc is None:
            out[s.feature] = acc = np.zeros(size)
        acc += np.asarray(s.counts, dtype=np.float64)
    return {k: v.tolist() for k, v in out.items()}


def fleet_psi(
    reference: DriftReference, counts: Mapping[str, Iterable[float]], *, min_sample: int = MIN_DRIFT_SAMPLE
) -> dict[str, float | None]:
    """PSI per reference feature of merged live counts; None where the feature has fewer than ``min_sample``
    calls ("not enough data" — a PSI of a few calls is noise, and 0 would claim stability nobody measured)."""
    out: dict[str, float | None] = {}
    for f in reference.features:
        live = list(counts.get(f.name, ()))
        out[f.name] = psi(f.counts, live) if len(live) == len(f.counts) and sum(live) >= min_sample else None
    return out
