"""Drift counting on the serving path: the same features, bins and summaries as
:class:`edgefleet.telemetry.drift.DriftAccumulator`, at a fraction of its cost.

The accumulator computes every feature of a call as a Python float and bins each one with ``np.searchsorted`` on
a Python list: for a 64-pixel input that is ~70 array conversions per call, several times the model's own run.
:class:`DriftCounter` precomputes, per input tensor and size, a matrix of the numeric features' bin edges (rows
padded with +inf) and the offsets of their counts in one flat array, so a call costs one ``astype``, four
reductions, one comparison and one indexed increment per input tensor. It runs after the answer is sent, but it
still costs the device CPU on every request.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from edgefleet.telemetry.drift import MAX_BINS, MAX_ELEMENTS, DriftReference, DriftSummary, FeatureReference, psi

__all__ = ["DriftCounter"]

_NUMERIC_KINDS = frozenset("iuf")  # what call_features can turn into floats (bool is skipped there too)


class _Layout:
    """One input tensor of one size: which of its features the reference bins, and where their counts live."""

    __slots__ = ("base", "edges", "n_edges", "others", "pos", "values")

    def __init__(
        self, size: int, pos: list[int], edges: list[list[float]], base: list[int], others: list[tuple[int, str]]
    ) -> None:
        width = max((len(e) for e in edges), default=0)
        # Padding with +inf keeps "edges at or below the value" equal to searchsorted(side="right"); an infinite
        # value is clipped back to the feature's last bin below.
        matrix = np.full((len(edges), max(width, 1)), np.inf)
        for i, e in enumerate(edges):
            matrix[i, : len(e)] = e
        self.pos = np.asarray(pos, dtype=np.intp)
        self.edges = matrix
        self.n_edges = np.asarray([len(e) for e in edges], dtype=np.intp)
        self.base = np.asarray(base, dtype=np.intp)
        self.others = others  # (position, feature) binned one by one: categorical inputs, which are rare
        self.values = np.empty(4 + size)  # mean, std, min, max, then the elements: reused by every call


class _Output(NamedTuple):
    cls: str
    value: str
    argmax: str


class DriftCounter:
    """Counts a device's live features into the reference's bins. ``add`` never raises: a call it cannot
    featurise is counted in :attr:`skipped`, and serving goes on."""

    def __init__(self, reference: DriftReference) -> None:
        # A feature with more bins than a summary may carry could never be reported: not counted at all.
        self.features = [f for f in reference.features if len(f.counts) <= MAX_BINS]
        self._ref: dict[str, FeatureReference] = {f.name: f for f in self.features}
        self._offset: dict[str, int] = {}
        total = 0
        for f in self.features:
            self._offset[f.name] = total
            total += len(f.counts)
        self.counts = np.zeros(total)
        self._cat = {f.name: {c: i for i, c in enumerate(f.categories)} for f in self.features}
        self._layouts: dict[tuple[str, int], _Layout] = {}
        self._outputs: dict[str, _Output] = {}
        self.skipped = 0

    # ------------------------------------------------------------------ counting

    def add(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        try:
            for name, arr in inputs.items():
                self._add_input(name, np.asarray(arr))
            for name, arr in outputs.items():
                self._add_output(name, np.asarray(arr))
        except Exception:  # drift is a statistic: a malformed call must never take serving down
            self.skipped += 1

    def _add_input(self, name: str, a: np.ndarray) -> None:
        size = a.size
        if size == 0 or a.dtype.kind not in _NUMERIC_KINDS:
            return
        elements = 1 < size <= MAX_ELEMENTS
        layout = self._layout(name, size if elements else 0)
        f = a.astype(np.float64, copy=False).reshape(-1)
        # mean and std as np.mean and np.std compute them (the same pairwise sums, in the same order), so every
        # value lands in the bin the reference's own featurisation would give it, bit for bit.
        total = np.add.reduce(f)
        mean = total / size
        dev = f - mean
        values = layout.values
        values[0] = mean
        values[1] = math.sqrt(np.add.reduce(dev * dev) / size)
        values[2] = np.minimum.reduce(f)
        values[3] = np.maximum.reduce(f)
        if elements:
            values[4:] = f
        if layout.pos.size:
            x = values[layout.pos]
            idx = np.count_nonzero(layout.edges <= x[:, None], axis=1)
            if not (math.isfinite(total) and math.isfinite(values[1])):  # inf, NaN or overflow: rare, so only then
                idx = np.minimum(idx, layout.n_edges)
                nan = np.isnan(x)
                idx[nan] = layout.n_edges[nan]  # searchsorted sorts NaN after every edge
            self.counts[layout.base + idx] += 1
        for pos, feature in layout.others:
            self._count(feature, float(values[pos]))

    def _layout(self, name: str, size: int) -> _Layout:
        key = (name, size)
        layout = self._layouts.get(key)
        if layout is None:
            names = [f"in.{name}.mean", f"in.{name}.std", f"in.{name}.min", f"in.{name}.max"]
            names += [f"in.{name}[{i}]" for i in range(size)]
            pos: list[int] = []
            edges: list[list[float]] = []
            base: list[int] = []
            others: list[tuple[int, str]] = []
            for i, feature in enumerate(names):
                ref = self._ref.get(feature)
                if ref is None:
                    continue
                if ref.kind == "numeric":
                    pos.append(i)
                    edges.append(list(ref.edges))
                    base.append(self._offset[feature])
                else:
                    others.append((i, feature))
            layout = self._layouts[key] = _Layout(size, pos, edges, base, others)
        return layout

    def _add_output(self, name: str, a: np.ndarray) -> None:
        if a.size == 0:
            return
        names = self._outputs.get(name)
        if names is None:
            names = self._outputs[name] = _Output(f"out.{name}.class", f"out.{name}", f"out.{name}.argmax")
        kind = a.dtype.kind
        if kind in "iu":
            self._count(names.cls, float(a.item(0)))
        elif a.size == 1:
            self._count(names.value, float(a.item(0)))
        elif kind == "f":
            self._count(names.argmax, float(a.argmax()))

    def _count(self, feature: str, value: float) -> None:
        ref = self._ref.get(feature)
        if ref is None:
            return
        if ref.kind == "categorical":
            known = self._cat[feature]
            idx = known.get(int(value), len(ref.categories)) if math.isfinite(value) else len(ref.categories)
        else:
            idx = bisect.bisect_right(ref.edges, value)
        self.counts[self._offset[feature] + idx] += 1

    # ------------------------------------------------------------------ reporting

    def summaries(self, min_count: int = 1) -> list[DriftSummary]:
        out = []
        for f in self.features:
            off = self._offset[f.name]
            c = self.counts[off : off + len(f.counts)]
            n = int(c.sum())
            if n >= min_count:
                out.append(DriftSummary(feature=f.name, psi=psi(f.counts, c), n=n, counts=c.tolist()))
        return out

    def reset(self) -> None:
        self.counts[:] = 0
