"""Task metrics of the optimizer: ``ctc`` (1 - CER of the greedy decode), ``cosine-min`` (the worst call) and the
user's ``module:function`` — on real ONNX models built here, quantized by the optimizer itself, run in onnxruntime.

Latency verdicts are injected (``compare_latency``) so which candidate is chosen depends only on the metric."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from edgefleet.cli.main import app
from edgefleet.data import CallData, save_calls
from edgefleet.errors import DataError
from edgefleet.examples import OPSET
from edgefleet.gate.production import evaluation_of
from edgefleet.optimize import LatencyResult, OptimizeReport, Recipe, optimize
from edgefleet.optimize.evaluate import metric_values
from edgefleet.optimize.metrics import (
    MetricSpec,
    character_error_rate,
    ctc_decode,
    ctc_score,
    ctc_sequences,
    edit_distance,
    resolve_metric,
)
from edgefleet.runtime.onnxruntime import OrtSession

T, F, C = 12, 16, 6  # frames per call, features per frame, classes (blank included)
DYNAMIC = Recipe(kind="dynamic", op_types=("MatMul",))
STATIC = Recipe(kind="static", op_types=("MatMul",))


# --- models and data ---------------------------------------------------------------------------------------------


def _weights(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((F, C)).astype(np.float32)


def _linear_model(softmax: bool, blank_meta: str | None = None) -> bytes:
    """``X [T, F] @ W [F, C]`` per call (then Softmax over classes for the CTC recognizer)."""
    nodes = [helper.make_node("MatMul", ["X", "W"], ["logits"], name="mm")]
    out = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1))
        out = "probs"
    graph = helper.make_graph(
        nodes,
        "ctc" if softmax else "linear",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [T, F])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [T, C])],
        initializer=[numpy_helper.from_array(_weights(), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    if blank_meta is not None:
        helper.set_model_props(model, {"ctc_blank": blank_meta})
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _ctc_calls(n: int, seed: int, blank: int = 0) -> np.ndarray:
    """Inputs whose logits spell symbols as ``s, s|blank, blank``: the middle frame is a near tie (blank ahead by
    0.001) that quantization noise flips either way — a repeat or a blank, the same text."""
    rng = np.random.default_rng(seed)
    symbols = [k for k in range(C) if k != blank]
    pinv = np.linalg.pinv(_weights().astype(np.float64))  # X @ W reproduces the target logits
    xs = []
    for _ in range(n):
        target = np.zeros((T, C))
        for k, s in enumerate(rng.choice(symbols, size=T // 3)):
            target[3 * k, s] = 4.0
            target[3 * k + 1, s], target[3 * k + 1, blank] = 4.0, 4.001
            target[3 * k + 2, blank] = 4.0
        xs.append(target @ pinv)
    return np.asarray(xs, dtype=np.float32)


def _ratio_by_output(base: OrtSession, cand: OrtSession, quiet: np.ndarray | None = None) -> float:
    """Which candidate this is, told from what it computes: the prepared float model reproduces the input (0.9), a
    static model zeroes the quiet call (0.5), anything else (dynamic INT8) 0.7."""
    if quiet is not None and not np.any(cand.run({"X": quiet})["logits"]):
        return 0.5
    feed = {"X": quiet if quiet is not None else _ctc_calls(1, 99)[0]}
    same = all(
        np.allclose(a, b, atol=1e-5) for a, b in zip(base.run(feed).values(), cand.run(feed).values(), strict=True)
    )
    return 0.9 if same else (0.7 if quiet is not None else 0.5)


def _verdict(ratio: float) -> LatencyResult:
    return LatencyResult(
        median_ratio=ratio, ci_low=ratio - 0.01, ci_high=ratio + 0.01, verdict="faster", n_pairs=300, reason="set"
    )


# --- CTC: pure ---------------------------------------------------------------------------------------------------


def _onehot(best: list[int], classes: int = 4) -> np.ndarray:
    return np.eye(classes)[best]


def test_ctc_decode_collapses_repeats_then_drops_blanks() -> None:
    assert ctc_decode(_onehot([0, 1, 1, 0, 1, 2, 2, 0]), blank=0) == [1, 1, 2]
    assert ctc_decode(_onehot([1, 1, 2, 2]), blank=0) == [1, 2]
    assert ctc_decode(_onehot([0, 0, 0]), blank=0) == []
    assert ctc_decode(_onehot([3, 1, 3, 3, 1]), blank=3) == [1, 1]
    assert ctc_decode(np.zeros((0, 4)), blank=0) == []
    # a flip on a repeated or a blank frame changes nothing; a flip on a lone symbol frame does
    assert ctc_decode(_onehot([1, 0, 0, 2]), 0) == ctc_decode(_onehot([1, 1, 0, 2]), 0) == [1, 2]
    assert ctc_decode(_onehot([1, 0, 2]), 0) != ctc_decode(_onehot([1, 0, 0]), 0)


def test_ctc_sequences_reads_each_call_layout() -> None:
    calls = np.stack([_onehot([0, 1, 1, 2]), _onehot([2, 0, 2, 0])])  # [n, T, C]
    want = [[1, 2], [2, 2]]
    assert ctc_sequences(calls, 0) == want
    assert ctc_sequences(calls[:, :, None, :], 0) == want  # [n, T, 1, C]
    assert ctc_sequences(calls[:, None, :, :], 0) == want  # [n, 1, T, C]
    with pytest.raises(DataError, match=r"\[T, C\], \[T, 1, C\] or \[1, T, C\].*\[2, 2, 4, 4\]"):
        ctc_sequences(np.zeros((1, 2, 2, 4, 4)), 0)
    with pytest.raises(DataError, match="blank index 4 is not one of the output's 4 classes"):
        ctc_sequences(calls, 4)


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [
        ([], [], 0),
        ([1, 2, 3], [1, 2, 3], 0),
        ([1, 2, 3], [], 3),
        ([], [4, 5], 2),
        ([1, 2, 3], [1, 3], 1),  # deletion
        ([1, 3], [1, 2, 3], 1),  # insertion
        ([1, 2, 3], [1, 4, 3], 1),  # substitution
        ([1, 2, 3, 4], [2, 1, 4, 3], 3),
        ([5, 1, 2, 3], [1, 2, 3, 5], 2),
    ],
)
def test_edit_distance(a: list[int], b: list[int], d: int) -> None:
    assert edit_distance(a, b) == d == edit_distance(b, a)


def test_edit_distance_matches_the_textbook_recurrence() -> None:
    def slow(a: list[int], b: list[int]) -> int:
        row = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            prev, row[0] = row[0], i
            for j, y in enumerate(b, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
        return row[-1]

    rng = np.random.default_rng(3)
    for _ in range(200):
        a = [int(v) for v in rng.integers(0, 4, size=rng.integers(0, 12))]
        b = [int(v) for v in rng.integers(0, 4, size=rng.integers(0, 12))]
        assert edit_distance(a, b) == slow(a, b)


def test_cer_and_score() -> None:
    assert character_error_rate([1, 2, 3, 4], [1, 2, 4]) == 0.25
    assert character_error_rate([1, 2], [3, 4, 5, 6, 7]) == 1.0  # capped: one call costs at most one call
    assert character_error_rate([], []) == 0.0 and character_error_rate([], [1]) == 1.0
    score, same = ctc_score([[1, 2, 3, 4], [1], [2, 2]], [[1, 2, 4], [1], [2, 2]])
    assert score == pytest.approx(1 - 0.25 / 3) and same == pytest.approx(2 / 3)


def test_ctc_metric_values_per_slice_and_sequence_match() -> None:
    ref = np.stack([_onehot([0, 1, 1, 2]), _onehot([1, 0, 2, 0]), _onehot([3, 3, 0, 0])])
    out = np.stack([_onehot([0, 1, 0, 2]), _onehot([1, 0, 0, 0]), _onehot([3, 0, 0, 0])])
    data = CallData({"X": np.zeros((3, 1))}, slices=np.array(["a", "a", "b"]))
    v = metric_values("ctc", ref, out, data)
    assert v.overall == pytest.approx(1 - 0.5 / 3) and v.sequence_match == pytest.approx(2 / 3)
    assert v.per_slice == {"a": pytest.approx(0.75), "b": 1.0}
    assert metric_values("agreement", ref, out, data).overall == pytest.approx(9 / 12)


def test_ctc_trim_strips_a_lines_ends_only() -> None:
    """A recognizer's text is stripped: a space (class 3 here) that quantization adds or drops at either end of a
    line changes no text, one in the middle does."""
    ref = np.stack([_onehot([1, 0, 2, 0]), _onehot([1, 0, 2, 0]), _onehot([1, 0, 2, 0])])
    out = np.stack([_onehot([3, 1, 0, 2]), _onehot([1, 0, 2, 3]), _onehot([1, 3, 0, 2])])
    data = CallData({"X": np.zeros((3, 1))})
    every_token = metric_values("ctc", ref, out, data)
    assert every_token.sequence_match == 0.0
    trimmed = metric_values(MetricSpec("ctc", blank=0, trim=(3,)), ref, out, data)
    assert trimmed.sequence_match == pytest.approx(2 / 3) and trimmed.overall == pytest.approx(1 - 0.5 / 3)
    assert ctc_sequences(np.stack([_onehot([3, 3, 0, 3])]), 0, (3,)) == [[]]  # only spaces: an empty line


# --- CTC: through optimize ---------------------------------------------------------------------------------------


def test_ctc_accepts_the_int8_recognizer_agreement_refuses(tmp_path: Path) -> None:
    """The dynamic INT8 recognizer flips frame argmaxes only where a repeat and a blank are near-tied: agreement
    counts a quarter of the frames as wrong and keeps the float model; ctc sees identical text and takes INT8."""
    raw = _linear_model(softmax=True)
    calib, ev = CallData({"X": _ctc_calls(16, 1)}), CallData({"X": _ctc_calls(40, 2)})

    def compare(base: OrtSession, cand: OrtSession, feed: dict[str, np.ndarray], budget: float) -> LatencyResult:
        return _verdict(_ratio_by_output(base, cand))

    chosen = {}
    for metric in ("agreement", "ctc"):
        rep = tmp_path / f"{metric}.json"
        report = optimize(
            raw, calib, ev, tmp_path / f"{metric}.onnx", metric=metric, max_accuracy_drop=0.01, recipes=[DYNAMIC],
            time_budget_s=60, compare_latency=compare, report_path=rep,
        )  # fmt: skip
        dyn = next(c for c in report.candidates if c.recipe.kind == "dynamic")
        assert dyn.metrics is not None and dyn.metrics.fidelity is not None
        assert dyn.metrics.fidelity.agreement < 0.9  # the same INT8 model under both metrics
        chosen[metric] = report.chosen.recipe.kind
        doc = json.loads(rep.read_text())
        assert OptimizeReport.model_validate(doc).metric == metric == doc["baseline_metrics"]["metric"]
        seen_by_gate = evaluation_of(doc, "chosen", "metrics")
        assert seen_by_gate is not None and seen_by_gate.metric == metric
        if metric == "agreement":
            assert dyn.status == "out_of_tolerance" and "agreement drops" in dyn.reason
            assert report.ctc_blank is None
        else:
            assert dyn.metrics.overall == 1.0 and dyn.metrics.sequence_match == 1.0
            assert report.ctc_blank == 0 and doc["ctc_blank"] == 0
    assert chosen == {"agreement": "float", "ctc": "dynamic"}


def test_ctc_blank_from_metadata_option_and_errors(tmp_path: Path) -> None:
    ev = CallData({"X": _ctc_calls(6, 3, blank=C - 1)})

    def run(raw: bytes, ctc_blank: int | None = None) -> OptimizeReport:
        return optimize(
            raw, ev, ev, tmp_path / "o.onnx", metric="ctc", ctc_blank=ctc_blank, recipes=[], time_budget_s=20,
            compare_latency=lambda *_: _verdict(1.0),
        )  # fmt: skip

    assert run(_linear_model(True, blank_meta=str(C - 1))).ctc_blank == C - 1
    assert run(_linear_model(True)).ctc_blank == 0
    assert run(_linear_model(True, blank_meta="5"), ctc_blank=2).ctc_blank == 2  # the option wins
    for raw, blank, needle in [
        (_linear_model(True, blank_meta="space"), None, "metadata ctc_blank='space' is not a class index"),
        (_linear_model(True), C, f"blank index {C} is not one of the output's {C} classes"),
        (_linear_model(True), -1, "--ctc-blank must be a class index >= 0"),
    ]:
        with pytest.raises(DataError, match=needle) as err:
            run(raw, blank)
        assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="--ctc-blank applies to --metric ctc only"):
        optimize(_linear_model(True), ev, ev, tmp_path / "o.onnx", metric="cosine", ctc_blank=1)


def test_ctc_trim_from_metadata_option_and_errors(tmp_path: Path) -> None:
    ev = CallData({"X": _ctc_calls(6, 3)})

    def run(raw: bytes, ctc_trim: tuple[int, ...] | None = None, metric: str = "ctc") -> OptimizeReport:
        return optimize(
            raw, ev, ev, tmp_path / "o.onnx", metric=metric, ctc_trim=ctc_trim, recipes=[], time_budget_s=20,
            compare_latency=lambda *_: _verdict(1.0),
        )  # fmt: skip

    def with_meta(trim: str) -> bytes:
        m = onnx.load_from_string(_linear_model(True))
        helper.set_model_props(m, {"ctc_trim": trim})
        return bytes(m.SerializeToString())

    assert run(_linear_model(True)).ctc_trim == []
    assert run(with_meta("5, 4")).ctc_trim == [4, 5]
    assert run(with_meta("5"), ctc_trim=(2,)).ctc_trim == [2]  # the option wins
    for raw, trim, needle in [
        (with_meta("space"), None, "metadata ctc_trim='space' is not a list of class indices"),
        (_linear_model(True), (C,), f"--ctc-trim {C}: not all of the output's {C} classes"),
        (_linear_model(True), (0,), "--ctc-trim 0: the blank never appears in a decoded line"),
    ]:
        with pytest.raises(DataError, match=needle) as err:
            optimize(
                raw, ev, ev, tmp_path / "o.onnx", metric="ctc", ctc_trim=trim, recipes=[], time_budget_s=20,
                ctc_blank=0 if trim == (0,) else None, compare_latency=lambda *_: _verdict(1.0),
            )  # fmt: skip
        assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="--ctc-trim applies to --metric ctc only"):
        run(_linear_model(True), (1,), metric="cosine")


# --- cosine-min ---------------------------------------------------------------------------------------------------


def test_cosine_min_catches_the_quiet_call_mean_cosine_hides(tmp_path: Path) -> None:
    """Static INT8 calibrated on ordinary inputs rounds one quiet call to zero: cosine over all calls barely moves
    (that call's norm is a thousandth of the others'), the worst call's cosine is 0. Dynamic INT8 scales per call."""
    raw = _linear_model(softmax=False)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, T, F)).astype(np.float32)
    x[7] *= 1e-3
    calib, ev = CallData({"X": rng.standard_normal((16, T, F)).astype(np.float32)}), CallData({"X": x})

    def compare(base: OrtSession, cand: OrtSession, feed: dict[str, np.ndarray], budget: float) -> LatencyResult:
        return _verdict(_ratio_by_output(base, cand, quiet=x[7]))

    got = {}
    for metric in ("cosine", "cosine-min"):
        report = optimize(
            raw, calib, ev, tmp_path / "o.onnx", metric=metric, recipes=[STATIC, DYNAMIC], time_budget_s=60,
            compare_latency=compare,
        )  # fmt: skip
        static = next(c for c in report.candidates if c.recipe.kind == "static")
        assert static.metrics is not None and static.metrics.fidelity is not None
        assert static.metrics.fidelity.cosine > 0.999  # the mean hides it under either metric
        got[metric] = (report.chosen.recipe.kind, static.status, static.metrics.overall)
    assert got["cosine"][:2] == ("static", "chosen")
    assert got["cosine-min"] == ("dynamic", "out_of_tolerance", 0.0)


def test_cosine_min_per_slice_is_the_slice_worst() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 3, 5))
    out = ref.copy()
    out[3] = -ref[3]
    data = CallData({"X": np.zeros((4, 1))}, slices=np.array([0, 0, 1, 1]))
    v = metric_values("cosine-min", ref, out, data)
    assert v.overall == pytest.approx(-1.0) and v.per_slice == {"0": pytest.approx(1.0), "1": pytest.approx(-1.0)}
    assert metric_values("cosine", ref, out, data).overall > -0.5


# --- user metrics --------------------------------------------------------------------------------------------------

_USER_MODULE = """
import numpy as np

SEEN = []
NOT_CALLABLE = 3


def score(ref, out, labels):
    SEEN.append((ref.shape, out.shape, None if labels is None else labels.tolist()))
    return 1.0 - float(np.max(np.abs(ref - out)))


def text(ref, out, labels):
    return "high"


def boom(ref, out, labels):
    raise ValueError("no\\nluck")


def nan(ref, out, labels):
    return float("nan")
"""


def test_user_metric_from_module_path_is_called_per_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "optA_user_metric_mod.py").write_text(_USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "optA_user_metric_mod", raising=False)
    x = _ctc_calls(6, 4)
    ev = CallData({"X": x}, labels=np.arange(6), slices=np.array(["a", "a", "b", "b", "b", "a"]))
    rep = tmp_path / "r.json"
    report = optimize(
        _linear_model(True), ev, ev, tmp_path / "o.onnx", metric="optA_user_metric_mod:score", recipes=[],
        time_budget_s=20, compare_latency=lambda *_: _verdict(1.0), report_path=rep,
    )  # fmt: skip
    mod = sys.modules["optA_user_metric_mod"]
    # baseline and the float candidate: overall, then slice a, slice b — stacked [n, T, C], labels subset alike
    assert mod.SEEN[:3] == [
        ((6, T, C), (6, T, C), list(range(6))),
        ((3, T, C),) * 2 + ([0, 1, 5],),
        ((3, T, C),) * 2 + ([2, 3, 4],),
    ]
    assert len(mod.SEEN) == 6
    assert report.metric == "optA_user_metric_mod:score" and report.baseline_metrics.overall == 1.0
    assert set(report.baseline_metrics.per_slice) == {"a", "b"}
    assert report.metric_sha256 == hashlib.sha256((tmp_path / "optA_user_metric_mod.py").read_bytes()).hexdigest()
    assert json.loads(rep.read_text())["metric"] == "optA_user_metric_mod:score"


def test_user_metric_from_file_path(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "my_metric.py"
    path.parent.mkdir()
    path.write_text(_USER_MODULE)
    ev = CallData({"X": _ctc_calls(4, 5)})
    spec = f"{path}:score"
    report = optimize(
        _linear_model(True), ev, ev, tmp_path / "o.onnx", metric=spec, recipes=[DYNAMIC], time_budget_s=30,
        compare_latency=lambda *_: _verdict(1.0),
    )  # fmt: skip
    assert report.metric == spec and report.baseline_metrics.metric == spec and report.baseline_metrics.overall == 1.0
    dyn = next(c for c in report.candidates if c.recipe.kind == "dynamic")
    assert dyn.metrics is not None and 0.9 < dyn.metrics.overall < 1.0  # 1 - max |error| of INT8 probabilities
    assert resolve_metric(spec).fn is resolve_metric(spec).fn  # one import per file content


def test_user_metric_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "optA_user_metric_err.py").write_text(_USER_MODULE)
    (tmp_path / "broken.py").write_text("def score(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ev = CallData({"X": _ctc_calls(3, 6)})
    raw = _linear_model(True)
    m = "optA_user_metric_err"
    cases = [
        (
            "top5",
            "unknown metric 'top5'; use one of top1, agreement, cosine, cosine-min, sqnr, ctc, or module:function",
        ),
        (f"{m}:", "is not module:function or path/to/file.py:function"),
        (":score", "is not module:function or path/to/file.py:function"),
        ("optA_no_such_module_xyz:score", "cannot import optA_no_such_module_xyz: ModuleNotFoundError"),
        (f"{m}:missing", "has no attribute 'missing'"),
        (f"{m}:NOT_CALLABLE", "is a int, not a function"),
        (f"{tmp_path}/nope.py:score", "nope.py does not exist"),
        (f"{tmp_path}/broken.py:score", "cannot import"),
        (f"{m}:text", "returned str 'high', not a float"),
        (f"{m}:boom", "raised ValueError: no luck"),
        (f"{m}:nan", "scores the input model itself nan"),
    ]
    for spec, needle in cases:
        with pytest.raises(DataError) as err:
            optimize(raw, ev, ev, tmp_path / "o.onnx", metric=spec, recipes=[], time_budget_s=20)
        msg = str(err.value)
        assert needle in msg and "\n" not in msg, (spec, msg)
        assert spec == "top5" or repr(spec) in msg  # the error names the spec
    assert not (tmp_path / "o.onnx").exists()


def test_cli_metric_options(tmp_path: Path) -> None:
    model = tmp_path / "ctc.onnx"
    model.write_bytes(_linear_model(True))
    calls = save_calls(tmp_path / "calls.npz", {"X": _ctc_calls(6, 7)})
    base = ["optimize", str(model), "--calib", str(calls), "--eval", str(calls), "-o", str(tmp_path / "o.onnx")]
    runner = CliRunner()
    for extra, needle in [
        (["--metric", "ctc", "--ctc-blank", "9"], "blank index 9 is not one of the output's 6 classes"),
        (["--metric", "sqnr", "--ctc-blank", "1"], "--ctc-blank applies to --metric ctc only"),
        (["--metric", "ctc", "--ctc-trim", "a,b"], "--ctc-trim 'a,b': give class indices separated by commas"),
        (["--metric", "no_such_optA_mod:f"], "cannot import no_such_optA_mod"),
    ]:
        result = runner.invoke(app, [*base, *extra])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.output
    rep = tmp_path / "r.json"
    result = runner.invoke(
        app,
        [*base, "--metric", "ctc", "--ctc-blank", "0", "--ctc-trim", "5", "--time-budget", "6", "--report", str(rep)],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(rep.read_text())
    assert doc["metric"] == "ctc" and doc["ctc_blank"] == 0 and doc["max_accuracy_drop"] == 0.01
    assert doc["ctc_trim"] == [5]
