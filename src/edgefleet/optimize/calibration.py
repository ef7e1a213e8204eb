"""Calibration, said and computed once: which calibration calls are used, and activation ranges per method.

``quantize_static`` calibrates on every call: one pass over the calibration data per static recipe, and the
fallback search re-quantizes the same recipe a dozen times with other nodes kept in float. The range of a float
model's tensor depends only on the model, the calls and the calibration method — not on per-channel weights,
reduce-range, the output format, the op types or the nodes a recipe quantizes — so :class:`CalibrationCache`
computes the ranges once per method over the prepared float model and hands each recipe the ranges of exactly the
tensors ``quantize_static`` would have calibrated for it, through onnxruntime's own calibration cache
(``quantize_static(calibration_cache_path=...)``): the quantizer code path stays onnxruntime's, only the pass over
the data is skipped.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
from onnxruntime.quantization.calibrate import TensorsData, create_calibrator
from onnxruntime.quantization.quant_utils import load_model_with_shape_infer
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from edgefleet.data import CallData
from edgefleet.errors import DataError
from edgefleet.optimize.candidates import Recipe
from edgefleet.optimize.evaluate import call_feed
from edgefleet.optimize.prepare import PreparedModel

__all__ = [
    "CALIBRATION_METHODS",
    "DEFAULT_CALIB_LIMIT",
    "CalibrationCache",
    "CalibrationFailed",
    "CallDataReader",
    "calibration_indices",
    "check_calib_limit",
    "limit_calls",
    "op_types_to_calibrate",
]

# Calibration keeps every calibration call's activations in memory (the histogram methods keep all of them until
# the pass ends); 128 evenly spaced calls bound that while covering the data's spread.
DEFAULT_CALIB_LIMIT = 128
# Entropy and percentile calibration keep a histogram of every calibrated tensor: measured 20-25x the minmax pass on
# an 860-node text recognizer (62 s against about 2.7 s). The search skips such a pass the budget cannot hold.
HISTOGRAM_COST = 20.0

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
# What quantize_static quantizes (and so calibrates) when it is given no op types.
_ALL_QUANTIZABLE = frozenset(QLinearOpsRegistry) | frozenset(QDQRegistry)
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16})


class CalibrationFailed(Exception):
    """Calibrating the float model with one method failed (one line); every recipe of that method fails with it."""


def check_calib_limit(limit: int) -> None:
    if limit < 1:
        raise DataError(f"--calib-limit must be at least 1 (got {limit})")


def calibration_indices(n_calls: int, limit: int) -> list[int]:
    """Which of ``n_calls`` calibration calls are used: all of them up to ``limit``, else ``limit`` evenly spaced
    ones, first and last included (recordings drift: the first ``limit`` calls would miss the end's ranges)."""
    check_calib_limit(limit)
    if n_calls <= limit:
        return list(range(n_calls))
    return [int(i) for i in np.linspace(0, n_calls - 1, limit).astype(np.int64)]


def limit_calls(data: CallData, limit: int) -> CallData:
    """``data`` with at most ``limit`` calls (:func:`calibration_indices`); ``data`` itself when it has no more."""
    idx = calibration_indices(len(data), limit)
    return data if len(idx) == len(data) else data.subset(idx)


class CallDataReader(CalibrationDataReader):
    """Feeds calibration calls one by one: each call is exactly what the model receives."""

    def __init__(self, data: CallData, input_names: list[str]) -> None:
        self._data = data
        self._names = input_names
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._data):
            return None
        feed = call_feed(self._data, self._i, self._names)
        self._i += 1
        return feed

    def rewind(self) -> None:
        self._i = 0


def op_types_to_calibrate(recipe: Recipe) -> frozenset[str]:
    """The op types whose tensors ``quantize_static`` calibrates for ``recipe`` (every quantizable one when the
    recipe names none)."""
    return frozenset(recipe.op_types) if recipe.op_types else _ALL_QUANTIZABLE


@dataclass(frozen=True)
class _Graph:
    """What tensor selection needs of the shape-inferred float model: each node's op type and tensors, and which
    tensors are float activations (typed float by shape inference, not initializers)."""

    nodes: tuple[tuple[str, tuple[str, ...]], ...]
    float_activations: frozenset[str]

    def tensors(self, op_types: frozenset[str]) -> set[str]:
        """The tensors onnxruntime's calibrators select for ``op_types`` (``select_tensors_to_calibrate``)."""
        return {t for op, ts in self.nodes if op in op_types for t in ts if t in self.float_activations}


def _graph(model: onnx.ModelProto) -> _Graph:
    infos = [*model.graph.value_info, *model.graph.output, *model.graph.input]
    inits = {t.name for t in model.graph.initializer}
    floats = frozenset(
        vi.name
        for vi in infos
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type in _FLOAT_TYPES and vi.name not in inits
    )
    nodes = tuple((n.op_type, tuple(itertools.chain(n.input, n.output))) for n in model.graph.node)
    return _Graph(nodes, floats)


class CalibrationCache:
    """Activation ranges of the prepared float model per calibration method, computed on first use and reused by
    every static recipe of that method within one optimization. ``passes`` counts passes over the data."""

    def __init__(self, prepared: PreparedModel, data: CallData) -> None:
        self.prepared = prepared
        self.data = data
        self.passes: Counter[str] = Counter()
        self.seconds: dict[str, float] = {}  # wall time of each method's shared pass
        self._ranges: dict[tuple[str, frozenset[str] | None], TensorsData | CalibrationFailed] = {}
        self._graph: _Graph | None = None

    def ranges(self, recipe: Recipe) -> TensorsData:
        """The ranges ``quantize_static`` would compute for ``recipe``: the tensors it would calibrate, no more."""
        wanted = op_types_to_calibrate(recipe)
        # One pass over every quantizable op type serves every recipe of the method; when that pass fails (a
        # tensor the recipe never quantizes that the calibrator cannot reduce, say), the recipe's own op types
        # are calibrated alone, as quantize_static would, so sharing never fails a recipe that would have built.
        shared = self._computed(recipe.calibration, None, _ALL_QUANTIZABLE | wanted)
        if isinstance(shared, CalibrationFailed) or not self._graph_of().tensors(wanted) <= set(shared.keys()):
            own = self._computed(recipe.calibration, wanted, wanted)
            if isinstance(own, CalibrationFailed):
                raise own
            shared = own
        keep = self._graph_of().tensors(wanted)
        return TensorsData(shared.calibration_method, {k: v for k, v in shared.items() if k in keep})

    def estimate_s(self, method: str) -> float | None:
        """Seconds a first pass of ``method`` would take: 0 once computed; for the histogram methods (entropy,
        percentile) HISTOGRAM_COST times the minmax pass, once that one was timed; None when nothing says."""
        if method in self.seconds:
            return 0.0
        if method != "minmax" and "minmax" in self.seconds:
            return self.seconds["minmax"] * HISTOGRAM_COST
        return None

    def _computed(
        self, method: str, key: frozenset[str] | None, op_types: frozenset[str]
    ) -> TensorsData | CalibrationFailed:
        if (method, key) not in self._ranges:
            t0 = time.perf_counter()
            try:
                self._ranges[(method, key)] = self._calibrate(method, op_types)
            except Exception as err:  # onnxruntime's calibrators raise anything from ValueError to RuntimeError
                first = (str(err).splitlines() or [type(err).__name__])[0]
                self._ranges[(method, key)] = CalibrationFailed(f"{type(err).__name__}: {first[:300]}")
            self.seconds.setdefault(method, time.perf_counter() - t0)
        return self._ranges[(method, key)]

    def _graph_of(self) -> _Graph:
        if self._graph is None:
            with tempfile.TemporaryDirectory(prefix="edgefleet-cal-") as tmp:
                self._graph = _graph(load_model_with_shape_infer(self._save(Path(tmp))))
        return self._graph

    def _save(self, tmp: Path) -> Path:
        # As quantize_static hands its calibrator the model: a file with external data, shape-inferred on load.
        # Saving with external data empties the proto's tensors: save a copy.
        model = onnx.ModelProto()
        model.CopyFrom(self.prepared.model)
        path = tmp / "model_input.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True)
        return path

    def _calibrate(self, method: str, op_types: frozenset[str]) -> TensorsData:
        self.passes[method] += 1
        with tempfile.TemporaryDirectory(prefix="edgefleet-cal-") as tmp:
            path = self._save(Path(tmp))
            if self._graph is None:
                self._graph = _graph(load_model_with_shape_infer(path))
            calibrator = create_calibrator(
                path,
                sorted(op_types),
                augmented_model_path=str(Path(tmp) / "augmented_model.onnx"),
                calibrate_method=CALIBRATION_METHODS[method],
                extra_options={},
            )
            names = [i.name for i in self.prepared.model.graph.input]
            calibrator.collect_data(CallDataReader(self.data, names))
            ranges = calibrator.compute_data()
            del calibrator  # its session holds the augmented model open until released
        if not isinstance(ranges, TensorsData):
            raise TypeError(f"calibration returned {type(ranges).__name__}, not TensorsData")
        return ranges
