"""Calibration said and computed once: ``--calib-limit`` is an option the report accounts for, and the activation
ranges are computed once per calibration method and reused by every static recipe (and fallback trial) of that
method — giving the very bytes ``quantize_static`` gives when it calibrates itself."""

from __future__ import annotations

import importlib
import json
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, quantize_static
from typer.testing import CliRunner

from edgefleet import examples
from edgefleet.cli.main import app
from edgefleet.data import CallData, save_calls
from edgefleet.errors import DataError
from edgefleet.optimize import LatencyResult, Recipe, calibration, optimize
from edgefleet.optimize import api as optimize_api
from edgefleet.optimize._models import digits_cnn, silero_calls
from edgefleet.optimize.calibration import (
    DEFAULT_CALIB_LIMIT,
    CalibrationCache,
    CallDataReader,
    calibration_indices,
    limit_calls,
)
from edgefleet.optimize.candidates import Region
from edgefleet.optimize.prepare import PreparedModel, prepare
from edgefleet.optimize.quantize import (
    build_candidate,
    float_outputs_for_float_readers,
    qgemm_float_outputs,
    static_options,
)
from edgefleet.optimize.report import calibration_summary
from edgefleet.runtime.onnxruntime import OrtSession

runner = CliRunner()
# the module, not the package's ``quantize`` function of the same name
ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")


# --- which calls -------------------------------------------------------------------------------------------------


def test_calibration_indices_spread_over_the_data() -> None:
    assert calibration_indices(5, 128) == [0, 1, 2, 3, 4]
    assert calibration_indices(128, 128) == list(range(128))
    idx = calibration_indices(1000, 16)
    assert len(idx) == len(set(idx)) == 16 and idx == sorted(idx)
    assert idx[0] == 0 and idx[-1] == 999
    assert calibration_indices(7, 1) == [0]
    data = CallData({"X": np.arange(10, dtype=np.float32).reshape(10, 1)})
    assert limit_calls(data, 10) is data
    assert limit_calls(data, 4).inputs["X"][:, 0].tolist() == [0.0, 3.0, 6.0, 9.0]


@pytest.mark.parametrize("limit", [0, -3])
def test_calib_limit_below_one_is_refused(limit: int) -> None:
    with pytest.raises(DataError, match="--calib-limit must be at least 1"):
        calibration_indices(10, limit)


# --- counting calibration passes ---------------------------------------------------------------------------------


class _Feeds(CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _spy(monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[str, int]], list[str]]:
    """Record every calibration pass ours makes — (method, calls fed) — and every one onnxruntime's
    ``quantize_static`` would make on its own (there must be none: it is handed the ranges)."""
    ours: list[tuple[str, int]] = []
    theirs: list[str] = []
    real = calibration.create_calibrator

    def ours_spy(*args: Any, **kw: Any) -> Any:
        cal = real(*args, **kw)
        collect = cal.collect_data

        def counted(reader: CalibrationDataReader) -> None:
            feeds = list(iter(reader.get_next, None))
            ours.append((kw["calibrate_method"].name, len(feeds)))
            collect(_Feeds(feeds))

        cal.collect_data = counted
        return cal

    def theirs_spy(*args: Any, **kw: Any) -> Any:
        theirs.append(kw.get("calibrate_method", "?"))
        return real(*args, **kw)

    monkeypatch.setattr(calibration, "create_calibrator", ours_spy)
    monkeypatch.setattr(ort_quantize, "create_calibrator", theirs_spy)
    return ours, theirs


def _verdict(ratio: float) -> Any:
    def compare(base: OrtSession, cand: OrtSession, feed: dict[str, np.ndarray], budget_s: float) -> LatencyResult:
        verdict = "faster" if ratio < 0.97 else "same"
        return LatencyResult(
            median_ratio=ratio, ci_low=ratio - 0.01, ci_high=ratio + 0.01, verdict=verdict, n_pairs=300, reason="set"
        )

    return compare


def test_ranges_computed_once_per_method(
    tmp_path: Path, digits: examples.Digits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five minmax recipes (per-channel, reduce-range, QOperator, op-type subsets) and two entropy ones, then a
    fallback search re-quantizing with nodes kept in float: one pass per method, none inside quantize_static."""
    ours, theirs = _spy(monkeypatch)
    x = digits.x_train.reshape(-1, 1, 1, 8, 8)
    calib = CallData({"X": x[:24]})
    ev = CallData({"X": digits.x_test[:40].reshape(-1, 1, 1, 8, 8)})
    ops = ("Conv", "Gemm", "Relu", "MaxPool", "Flatten")
    recipes = [
        Recipe(kind="static", op_types=ops),
        Recipe(kind="static", op_types=ops, per_channel=True, reduce_range=True),
        Recipe(kind="static", op_types=ops, format="QOperator"),
        Recipe(kind="static", op_types=("Conv", "Relu", "MaxPool")),
        Recipe(kind="static", op_types=("Gemm",)),
        Recipe(kind="static", op_types=ops, calibration="entropy"),
        Recipe(kind="static", op_types=ops, calibration="entropy", activation_type="int8"),
    ]
    report = optimize(
        digits_cnn(digits), calib, ev, tmp_path / "out.onnx", metric="cosine", max_accuracy_drop=0.0,
        recipes=recipes, time_budget_s=120, max_fallback_iterations=3, compare_latency=_verdict(0.8),
    )  # fmt: skip
    built = [c for c in report.candidates if c.recipe.kind == "static"]
    assert all(c.status != "failed" for c in built), [c.reason for c in built if c.status == "failed"]
    assert any(c.derived_from for c in report.candidates), "the fallback search ran"
    assert Counter(m for m, _ in ours) == {"MinMax": 1, "Entropy": 1}
    assert all(n == 24 for _, n in ours)
    assert theirs == []


# --- the same model as quantize_static ---------------------------------------------------------------------------


def _reference(prepared: PreparedModel, recipe: Recipe, calib: CallData) -> bytes:
    """What build_candidate made before ranges were shared: quantize_static calibrating for this recipe alone."""
    model = onnx.ModelProto()
    model.CopyFrom(prepared.model)
    model, options = static_options(model, recipe)
    names = [i.name for i in prepared.model.graph.input]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        quantize_static(model, out, CallDataReader(calib, names), **options)
        q = onnx.load(str(out))
    if recipe.format == "QDQ":
        float_outputs_for_float_readers(q, prepared.model)
    else:
        qgemm_float_outputs(q, prepared.model)
    return bytes(q.SerializeToString())


def _opset12_convnet() -> bytes:
    """Conv → Relu → Flatten → Gemm at opset 12: per-channel QDQ converts it to opset 13 before quantizing."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    g = numpy_helper.from_array(rng.standard_normal((10, 4 * 6 * 6)).astype(np.float32) * 0.1, "g")
    nodes = [
        helper.make_node("Conv", ["X", "w", "b"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "g"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [w, b, g],
    )
    return bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]).SerializeToString())


_RECIPES = [
    Recipe(kind="static", op_types=("Conv", "Gemm", "Relu", "Flatten")),
    Recipe(kind="static", op_types=("Conv", "Gemm", "Relu", "Flatten"), per_channel=True),
    Recipe(kind="static", op_types=("Conv", "Gemm", "Relu", "Flatten"), per_channel=True, reduce_range=True),
    Recipe(kind="static", op_types=("Conv", "Gemm", "Relu", "Flatten"), activation_type="int8"),
    Recipe(kind="static", op_types=("Conv", "Gemm", "Relu", "Flatten"), format="QOperator"),
    Recipe(kind="static", op_types=("Gemm",)),
    Recipe(kind="static"),  # every quantizable op type
    Recipe(kind="static", calibration="entropy"),
    Recipe(kind="static", calibration="entropy", per_channel=True, nodes_to_exclude=("fc",)),
    Recipe(kind="static", calibration="percentile"),
    Recipe(kind="static", calibration="percentile", format="QOperator"),
]


def test_shared_ranges_give_quantize_statics_model(digits: examples.Digits) -> None:
    prepared = prepare(_opset12_convnet())
    calib = CallData({"X": digits.x_train[:20].reshape(-1, 1, 1, 8, 8)})
    cache = CalibrationCache(prepared, calib)
    for recipe in _RECIPES:
        assert build_candidate(prepared, recipe, cache) == _reference(prepared, recipe, calib), recipe.name
    assert cache.passes == {"minmax": 1, "entropy": 1, "percentile": 1}


def test_shared_ranges_on_silero_vad(silero_path: Path) -> None:
    """A real pretrained model with recurrent state, If subgraphs and an STFT: still quantize_static's bytes."""
    prepared = prepare(silero_path.read_bytes())
    calib = CallData(silero_calls(str(silero_path), n=12))
    cache = CalibrationCache(prepared, calib)
    ops = ("Conv", "MatMul", "Gemm", "Relu")
    for recipe in [
        Recipe(kind="static", op_types=ops),
        Recipe(kind="static", op_types=ops, per_channel=True),
        Recipe(kind="static", op_types=ops, format="QOperator"),
        Recipe(kind="static", op_types=ops, calibration="entropy"),
    ]:
        assert build_candidate(prepared, recipe, cache) == _reference(prepared, recipe, calib), recipe.name
    assert cache.passes == {"minmax": 1, "entropy": 1}


# --- --calib-limit through the CLI -------------------------------------------------------------------------------


@pytest.fixture()
def fast_cli(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Two static recipes and an injected latency verdict: the CLI runs in seconds; returns the calibration passes."""
    ours, _ = _spy(monkeypatch)
    monkeypatch.setattr(
        optimize_api,
        "recipe_space",
        lambda *_: [Recipe(kind="static", op_types=("Gemm", "Relu")), Recipe(kind="static", per_channel=True)],
    )
    monkeypatch.setattr(optimize_api, "paired_ab", _verdict(0.5))
    return ours


def _cli(tmp_path: Path, mlp: Path, digits: examples.Digits, n_calib: int, *extra: str) -> tuple[int, str]:
    calib = save_calls(tmp_path / "calib.npz", {"X": digits.x_train[:n_calib, None, :]})
    ev = save_calls(tmp_path / "eval.npz", {"X": digits.x_test[:30, None, :]}, labels=digits.y_test[:30])
    args = ["optimize", str(mlp), "--calib", str(calib), "--eval", str(ev), "-o", str(tmp_path / "out.onnx")]
    result = runner.invoke(app, [*args, "--labels", "labels", "--time-budget", "60", *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


@pytest.mark.parametrize(("n_calib", "used"), [(40, 16), (10, 10)])
def test_calib_limit_honoured_and_reported(
    tmp_path: Path, mlp_path: Path, digits: examples.Digits, fast_cli: list[tuple[str, int]], n_calib: int, used: int
) -> None:
    report = tmp_path / "r.json"
    code, out = _cli(tmp_path, mlp_path, digits, n_calib, "--calib-limit", "16", "--report", str(report))
    assert code == 0, out
    doc = json.loads(report.read_text())
    assert (doc["calib_calls"], doc["calib_calls_given"], doc["calib_limit"]) == (used, n_calib, 16)
    assert fast_cli == [("MinMax", used)]  # two minmax recipes, one pass over exactly the calls used
    limit = " (--calib-limit 16)" if used < n_calib else ""
    assert f"calibration: {used} of {n_calib} calls{limit}" in " ".join(out.split())


def test_calib_limit_default_is_in_help() -> None:
    result = runner.invoke(app, ["optimize", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert re.search(rf"--calib-limit <int> [^\[]*\[default: {DEFAULT_CALIB_LIMIT}\]", text), result.output


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_calib_limit_below_one_is_one_line(tmp_path: Path, mlp_path: Path, digits: examples.Digits, limit: str) -> None:
    code, out = _cli(tmp_path, mlp_path, digits, 10, "--calib-limit", limit)
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), out
    assert "--calib-limit must be at least 1" in lines[0]


def test_calibration_summary() -> None:
    assert calibration_summary(16, 40, 16) == "calibration: 16 of 40 calls (--calib-limit 16)"
    assert calibration_summary(10, 10, 16) == "calibration: 10 of 10 calls"
    assert calibration_summary(12, None, None) == "calibration: 12 calls"  # a report written before the field


def test_a_histogram_pass_the_budget_cannot_hold_is_skipped_with_its_estimate(digits: examples.Digits) -> None:
    """Entropy and percentile keep a histogram of every tensor: on a large model the first pass took minutes and
    broke the time budget. Once the minmax pass is timed, a histogram pass estimated past what the accuracy phase has
    left is skipped, and the reason gives the estimate; a method already computed costs nothing more."""
    from edgefleet.optimize.prepare import prepare

    x = digits.x_train.reshape(-1, 1, 1, 8, 8)
    cache = calibration.CalibrationCache(prepare(digits_cnn(digits)), CallData({"X": x[:16]}))
    entropy = Recipe(kind="static", calibration="entropy")
    minmax = Recipe(kind="static")
    assert optimize_api.calibration_too_slow(entropy, cache, 1.0) is None, "nothing timed yet: nothing to say"
    cache.ranges(minmax)
    assert set(cache.seconds) == {"minmax"}
    cache.seconds["minmax"] = 3.0  # as if the model were large: the estimate is HISTOGRAM_COST times this
    why = optimize_api.calibration_too_slow(entropy, cache, 30.0)
    assert why is not None and "entropy calibration estimated at 60 s" in why and "30 s left" in why, why
    assert optimize_api.calibration_too_slow(entropy, cache, 61.0) is None
    assert optimize_api.calibration_too_slow(minmax, cache, 0.5) is None, "computed already"
    mixed = Recipe(kind="mixed", regions=(Region(recipe=entropy, nodes=("a",)),))
    assert optimize_api.calibration_too_slow(mixed, cache, 30.0) is not None, "a mixed recipe's static part counts"
