"""Accuracy of a candidate: the task metric overall and per slice, and label-free fidelity to the input model
(the user's model as given, which every candidate is measured against).

Pure functions over output arrays (no sessions) except :func:`run_calls`, the one place that runs a model on
per-call data. Per slice, because quantization often costs accuracy on one subset while the average barely moves.

Conventions (docs/optimize.md):

* the *primary output* is the model's first floating-point output; metrics read it;
* a call's *decision* is the argmax over the last axis, or ``value > 0.5`` when the last axis has size 1
  (a probability, e.g. voice activity) — meaningful only over a class axis, which is why the default metric is
  chosen by :mod:`edgefleet.optimize.default_metric`;
* ``cosine``, ``sqnr_db`` and ``max_abs_error`` compare the candidate's primary output with the input model's over
  all calls (flattened); SQNR is capped at 200 dB (identical outputs) so the report stays valid JSON;
* every metric is a score where higher is better and the input model scores ``baseline``: ``top1`` is accuracy
  against labels, ``agreement`` the share of decisions equal to the input model's, ``cosine`` the cosine
  similarity, ``sqnr`` is ``1 - noise/signal`` power (so a 0.01 drop means SQNR ≥ 20 dB);
* ``ctc``, ``cosine-min`` and the user's ``module:function`` live in :mod:`edgefleet.optimize.metrics`.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, Field

from edgefleet.data import CallData
from edgefleet.errors import DataError
from edgefleet.optimize.metrics import Metric, MetricSpec, call_user_metric, ctc_score, ctc_sequences, resolve_metric
from edgefleet.runtime.onnxruntime import OrtSession

__all__ = [
    "Fidelity",
    "Metric",
    "MetricSpec",
    "MetricValues",
    "baseline_values",
    "call_feed",
    "decisions",
    "fidelity",
    "metric_values",
    "run_calls",
    "slice_index",
    "within_tolerance",
]

SQNR_CAP_DB = 200.0


class Fidelity(BaseModel):
    """Label-free agreement of a candidate with the input model on the evaluation calls."""

    agreement: float = Field(description="share of calls whose decision equals the input model's")
    flip_rate: float
    cosine: float
    sqnr_db: float
    max_abs_error: float


class MetricValues(BaseModel):
    metric: str = Field(description="a built-in metric name, or the user's module:function spec")
    overall: float
    per_slice: dict[str, float] = Field(default_factory=dict)
    fidelity: Fidelity | None = None
    sequence_match: float | None = Field(
        None, description="ctc: share of calls whose decoded sequence equals the input model's"
    )

    @property
    def worst_slice(self) -> tuple[str, float] | None:
        if not self.per_slice:
            return None
        key = min(self.per_slice, key=lambda k: self.per_slice[k])
        return key, self.per_slice[key]


def run_calls(session: OrtSession, data: CallData, output: str) -> np.ndarray:
    """Run every call on its own and stack the ``output`` of each: ``[n_calls, ...]``."""
    names = [s.name for s in session.inputs]
    outs = [session.run(call_feed(data, i, names), [output])[output] for i in range(len(data))]
    shapes = {o.shape for o in outs}
    if len(shapes) != 1:
        raise DataError(f"output {output!r} changes shape between calls ({sorted(shapes)}); use one file per shape")
    return np.stack(outs).astype(np.float64)


def call_feed(data: CallData, i: int, names: list[str]) -> dict[str, np.ndarray]:
    """Call ``i``'s feed for the inputs in ``names``; a per-call scalar (``sr``) becomes a 0-d array, since indexing
    a 1-D array gives a numpy scalar that onnxruntime refuses."""
    return {k: np.asarray(v) for k, v in data.feed(i).items() if k in names}


def decisions(out: np.ndarray) -> np.ndarray:
    """Per-call decisions ``[n_calls, k]`` (k decisions per call: its batch)."""
    n = out.shape[0]
    if out.ndim >= 2 and out.shape[-1] > 1:
        return np.argmax(out, axis=-1).reshape(n, -1)
    return (out > 0.5).astype(np.int64).reshape(n, -1)


def slice_index(data: CallData) -> dict[str, np.ndarray]:
    """Call indices per slice: the slice array when given, else the label (per class), else none."""
    key = data.slices if data.slices is not None else data.labels
    if key is None:
        return {}
    flat = np.asarray(key).reshape(len(key), -1)[:, 0]
    return {str(v): np.flatnonzero(flat == v) for v in np.unique(flat)}


def _labels(data: CallData, preds: np.ndarray) -> np.ndarray:
    if data.labels is None:
        raise DataError("metric top1 needs labels: pass --labels KEY naming the labels array in the eval data")
    labels = np.asarray(data.labels).reshape(len(data.labels), -1)
    if labels.shape != preds.shape:
        raise DataError(
            f"labels hold {labels.shape[1]} value(s) per call but the model makes {preds.shape[1]} decision(s) per call"
        )
    return labels


def _score(
    spec: MetricSpec,
    ref: np.ndarray,
    out: np.ndarray,
    labels: np.ndarray | None,
    idx: np.ndarray,
    seqs: tuple[list[list[int]], list[list[int]]] | None = None,
) -> float:
    if idx.size == 0:
        return float("nan")
    metric = spec.name
    if spec.fn is not None:
        return call_user_metric(spec, ref[idx], out[idx], None if labels is None else labels[idx])
    if metric == "ctc":
        assert seqs is not None
        return ctc_score([seqs[0][i] for i in idx], [seqs[1][i] for i in idx])[0]
    if metric == "cosine-min":
        return min(_cosine(ref[i], out[i]) for i in idx)
    if metric == "top1":
        assert labels is not None
        return float(np.mean(decisions(out)[idx] == labels[idx]))
    if metric == "agreement":
        return float(np.mean(decisions(out)[idx] == decisions(ref)[idx]))
    if metric == "cosine":
        return _cosine(ref[idx], out[idx])
    signal = float(np.sum(ref[idx] ** 2))
    noise = float(np.sum((ref[idx] - out[idx]) ** 2))
    return 1.0 if noise == 0 else max(0.0, 1.0 - noise / signal) if signal > 0 else 0.0


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.ravel(), b.ravel()
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0 or ny == 0:
        return 1.0 if nx == ny else 0.0
    return float(np.dot(x, y) / (nx * ny))


def metric_values(metric: str | MetricSpec, ref: np.ndarray, out: np.ndarray, data: CallData) -> MetricValues:
    """Score ``out`` (a candidate's primary output) against labels or the input's ``ref``, overall and per slice.
    A user metric sees the labels as given (or None); ``top1`` needs them."""
    spec = metric if isinstance(metric, MetricSpec) else resolve_metric(metric)
    if spec.name == "top1":
        labels: np.ndarray | None = _labels(data, decisions(out))
    else:
        labels = None if spec.fn is None or data.labels is None else np.asarray(data.labels)
    seqs = None
    if spec.name == "ctc":
        blank, trim = (0 if spec.blank is None else spec.blank), spec.trim or ()
        seqs = (ctc_sequences(ref, blank, trim), ctc_sequences(out, blank, trim))
    everything = np.arange(len(out))
    overall = _score(spec, ref, out, labels, everything, seqs)
    per_slice = {k: _score(spec, ref, out, labels, idx, seqs) for k, idx in slice_index(data).items()}
    match = None if seqs is None else ctc_score(*seqs)[1]
    return MetricValues(
        metric=spec.name, overall=overall, per_slice=per_slice, fidelity=fidelity(ref, out), sequence_match=match
    )


def baseline_values(metric: MetricSpec, ref: np.ndarray, data: CallData) -> MetricValues:
    """The input model's own scores: every drop is measured from them, so a score that is not a finite number (a
    user metric returning NaN on identical outputs) would let any candidate through and is refused here."""
    values = metric_values(metric, ref, ref, data)
    if not math.isfinite(values.overall):
        raise DataError(f"metric {metric.name!r} scores the input model itself {values.overall}: no drop to measure")
    return values


def fidelity(ref: np.ndarray, out: np.ndarray) -> Fidelity:
    agree = float(np.mean(decisions(out) == decisions(ref)))
    noise = float(np.sum((ref - out) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0:
        sqnr = SQNR_CAP_DB
    elif signal == 0:
        sqnr = -SQNR_CAP_DB
    else:
        sqnr = min(SQNR_CAP_DB, 10 * math.log10(signal / noise))
    return Fidelity(
        agreement=agree,
        flip_rate=1 - agree,
        cosine=_cosine(ref, out),
        sqnr_db=sqnr,
        max_abs_error=float(np.max(np.abs(ref - out))) if ref.size else 0.0,
    )


def within_tolerance(
    baseline: MetricValues, candidate: MetricValues, max_drop: float, max_slice_drop: float | None = None
) -> tuple[bool, str]:
    """Is the candidate's drop from the baseline within tolerance, overall (and per slice when asked)?"""
    drop = baseline.overall - candidate.overall
    if not math.isfinite(candidate.overall) or drop > max_drop + 1e-12:
        return False, f"{candidate.metric} drops {drop:.4f} (from {baseline.overall:.4f}), over the {max_drop} allowed"
    if max_slice_drop is not None:
        worst = _worst_slice_drop(baseline.per_slice, candidate.per_slice)
        if worst is not None and worst[1] > max_slice_drop + 1e-12:
            return False, f"slice {worst[0]!r} drops {worst[1]:.4f}, over the {max_slice_drop} allowed per slice"
    return True, f"{candidate.metric} drop {drop:.4f} within {max_drop}"


def _worst_slice_drop(base: dict[str, float], cand: dict[str, float]) -> tuple[str, float] | None:
    drops = [(k, base[k] - cand.get(k, float("nan"))) for k in base]
    drops = [(k, d if math.isfinite(d) else math.inf) for k, d in drops]
    return max(drops, key=lambda kd: kd[1]) if drops else None
