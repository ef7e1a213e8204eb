"""Closed-loop evaluation of recurrent models: every call fed the model's own previous state, per stream.

A small Elman RNN (h' = tanh(W·x + U·h), decision sigmoid(v·h')) whose recurrence has a gain large enough that a
small error in the state grows over a stream: dynamic INT8 agrees with float on every call when each call is fed the
recorded state, and on about three calls in four when it feeds itself, as deployed. Silero VAD is the real one.
Latency verdicts are injected, never measured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from edgefleet.cli.main import app
from edgefleet.data import CallData, load_calls, save_calls
from edgefleet.errors import DataError
from edgefleet.optimize import LatencyResult, OptimizeReport, Recipe, optimize
from edgefleet.optimize._models import silero_calls
from edgefleet.optimize.report import CandidateReport
from edgefleet.optimize.stateful import (
    parse_state_pairs,
    replay_states,
    resolve_state_pairs,
    run_closed_loop,
    stream_groups,
    wire_state,
    with_initial_state,
)
from edgefleet.runtime.onnxruntime import OrtSession

HIDDEN, FEATURES, STREAMS, STEPS = 16, 4, 3, 40
DYNAMIC = Recipe(kind="dynamic", op_types=("MatMul",))


def _rnn(metadata: str | None = None, gain: float = 5.0, seed: int = 0) -> bytes:
    """x float32[1, 4], h float32[1, 16] -> prob float32[1, 1] (a decision), h_next float32[1, 16]."""
    rng = np.random.default_rng(seed)
    w = (0.5 * rng.standard_normal((FEATURES, HIDDEN))).astype(np.float32)
    u = (gain * rng.standard_normal((HIDDEN, HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32)
    v = rng.standard_normal((HIDDEN, 1)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"], name="in_proj"),
        helper.make_node("MatMul", ["h", "U"], ["hu"], name="recurrent"),
        helper.make_node("Add", ["xw", "hu"], ["pre"], name="add"),
        helper.make_node("Tanh", ["pre"], ["h_next"], name="tanh"),
        helper.make_node("MatMul", ["h_next", "v"], ["logit"], name="readout"),
        helper.make_node("Sigmoid", ["logit"], ["prob"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "elman",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, FEATURES]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, HIDDEN]),
        ],
        [
            helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 1]),
            helper.make_tensor_value_info("h_next", TensorProto.FLOAT, [1, HIDDEN]),
        ],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(u, "U"), numpy_helper.from_array(v, "v")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.ir_version = 8
    if metadata is not None:
        helper.set_model_props(model, {"edgefleet.state": metadata})
    return model.SerializeToString()


def _rnn_data(raw: bytes, seed: int = 1) -> CallData:
    """STREAMS streams of STEPS calls, interleaved call by call, each with the state float fed itself (recorded)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((STREAMS, STEPS, 1, FEATURES)).astype(np.float32)
    sess = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])
    h = np.zeros((STREAMS, STEPS, 1, HIDDEN), np.float32)
    for s in range(STREAMS):
        for t in range(STEPS - 1):
            h[s, t + 1] = sess.run(["h_next"], {"x": x[s, t], "h": h[s, t]})[0]
    order = lambda a: a.transpose(1, 0, 2, 3).reshape(STREAMS * STEPS, *a.shape[2:])  # noqa: E731
    return CallData({"x": order(x), "h": order(h)}, streams=np.tile(np.arange(STREAMS), STEPS))


def _quantized_is_faster(
    base: OrtSession, cand: OrtSession, feed: dict[str, np.ndarray], budget: float
) -> LatencyResult:
    """Quantized candidates (the quantizer's producer name) measure 0.6x the input, the rest the same: selection
    then prefers the quantized model whenever it is within tolerance."""
    ratio = 0.6 if cand.session.get_modelmeta().producer_name == "onnx.quantize" else 1.0
    verdict = "faster" if ratio < 0.97 else "same"
    return LatencyResult(
        median_ratio=ratio, ci_low=ratio - 0.01, ci_high=ratio + 0.01, verdict=verdict, n_pairs=300, reason="set"
    )


def _optimize(raw: bytes, data: CallData, out: Path, state: list[str] | None) -> tuple[OptimizeReport, CandidateReport]:
    report = optimize(
        raw, data, data, out, max_accuracy_drop=0.05, recipes=[DYNAMIC], time_budget_s=30,
        max_fallback_iterations=1, compare_latency=_quantized_is_faster, state=state,
    )  # fmt: skip
    dyn = next(c for c in report.candidates if c.name == DYNAMIC.name)
    return report, dyn


def test_closed_loop_refuses_a_candidate_that_passes_per_call(tmp_path: Path) -> None:
    raw = _rnn()
    data = _rnn_data(raw)
    # Teacher-forced (no state pairs): dynamic INT8 agrees on (nearly) every call and is chosen.
    report, dyn = _optimize(raw, data, tmp_path / "tf.onnx", None)
    assert report.evaluation == "per_call" and report.eval_streams is None and report.metric == "agreement"
    assert dyn.within_tolerance and dyn.metrics is not None and dyn.metrics.overall >= 0.97
    assert report.chosen.name == DYNAMIC.name and not report.kept_input
    # Closed loop: the same candidate, fed its own state, drifts from float and is refused.
    report, dyn = _optimize(raw, data, tmp_path / "cl.onnx", ["h=h_next"])
    assert report.evaluation == "closed_loop" and report.eval_streams == STREAMS and report.state_pairs == ["h=h_next"]
    assert dyn.status == "out_of_tolerance" and dyn.metrics is not None and dyn.metrics.overall < 0.9
    assert report.chosen.name != DYNAMIC.name
    assert report.chosen.within_tolerance and report.chosen.metrics is not None
    assert report.baseline_metrics.overall - report.chosen.metrics.overall <= 0.05
    # The float model fed its own state reproduces the recorded data exactly: the reference is closed-loop float.
    float_cand = next(c for c in report.candidates if c.recipe.kind == "float")
    assert float_cand.within_tolerance


def test_state_pairs_from_model_metadata(tmp_path: Path) -> None:
    raw = _rnn(metadata="h=h_next")
    data = _rnn_data(raw)
    report, dyn = _optimize(raw, data, tmp_path / "meta.onnx", None)
    assert report.evaluation == "closed_loop" and report.state_pairs == ["h=h_next"] and not dyn.within_tolerance
    report, dyn = _optimize(raw, data, tmp_path / "off.onnx", [])  # [] turns the metadata's pairs off
    assert report.evaluation == "per_call" and dyn.within_tolerance


def test_missing_state_starts_from_zeros_and_calibration_replays_it(tmp_path: Path) -> None:
    raw = _rnn()
    data = _rnn_data(raw)
    session = OrtSession(raw)
    stateless = CallData({"x": data.inputs["x"]}, streams=data.streams)
    filled = with_initial_state(stateless, [("h", "h_next")], session.inputs)
    assert not filled.inputs["h"].any()
    # The recorded data started every stream from zeros too, so closed-loop outputs are equal.
    got, n = run_closed_loop(session, filled, "prob", [("h", "h_next")])
    want, _ = run_closed_loop(session, data, "prob", [("h", "h_next")])
    assert n == STREAMS and np.array_equal(got, want)
    assert np.array_equal(replay_states(session, filled, [("h", "h_next")]).inputs["h"], data.inputs["h"])
    report = optimize(
        raw, stateless, stateless, tmp_path / "z.onnx", recipes=[], time_budget_s=20,
        compare_latency=_quantized_is_faster, state=["h=h_next"],
    )  # fmt: skip
    assert report.evaluation == "closed_loop" and report.kept_input


def test_silero_closed_loop_equals_state_fed_back_by_hand(tmp_path: Path, silero_path: Path) -> None:
    a, b = silero_calls(str(silero_path), 24, seed=0), silero_calls(str(silero_path), 24, seed=1)
    # Two streams interleaved call by call, every recorded state zero: only each stream's first call may read it.
    inputs = {k: np.stack([a[k], b[k]], axis=1).reshape(48, *a[k].shape[1:]) for k in a}
    inputs["state"] = np.zeros_like(inputs["state"])
    data = CallData(inputs, streams=np.tile(np.array(["a", "b"]), 24))
    got, n = run_closed_loop(OrtSession(str(silero_path)), data, "output", [("state", "stateN")])
    assert n == 2 and got.shape == (48, 1, 1)
    sess = ort.InferenceSession(str(silero_path), providers=["CPUExecutionProvider"])
    for k, calls in enumerate((a, b)):
        state = np.zeros((2, 1, 128), np.float32)
        for t in range(24):
            out, state = sess.run(None, {"input": calls["input"][t], "state": state, "sr": np.array(16000)})
            assert np.array_equal(got[2 * t + k], out.astype(np.float64))
    # Teacher-forced with zero states differs: the loop really feeds the state back.
    assert not np.allclose(got, run_closed_loop(OrtSession(str(silero_path)), data, "output", [])[0])
    report = optimize(
        silero_path, data, data, tmp_path / "vad.onnx", metric="cosine", recipes=[], time_budget_s=20,
        compare_latency=_quantized_is_faster, state=["state=stateN"],
    )  # fmt: skip
    assert report.evaluation == "closed_loop" and report.eval_streams == 2 and report.eval_calls == 48


def test_stream_groups() -> None:
    assert [g.tolist() for g in stream_groups(None, 3)] == [[0, 1, 2]]
    assert [g.tolist() for g in stream_groups(np.array([7, 3, 7, 3, 3]), 5)] == [[0, 2], [1, 3, 4]]
    assert [g.tolist() for g in stream_groups(np.array(["b", "b", "a"]), 3)] == [[0, 1], [2]]
    with pytest.raises(DataError, match="streams has 2 entries but the data holds 3 calls"):
        stream_groups(np.array([0, 1]), 3)
    with pytest.raises(DataError, match="streams must hold one id per call"):
        CallData({"x": np.zeros((3, 1, 4), np.float32)}, streams=np.array([0, 1]))
    data = CallData({"x": np.arange(4.0)[:, None]}, streams=np.array([0, 1, 0, 1]))
    sub = data.subset([2, 3]).streams
    assert sub is not None and sub.tolist() == [0, 1]


def test_wire_state_feeds_the_previous_output() -> None:
    rec = {"x": np.ones((1, 2), np.float32), "h": np.zeros((1, 3), np.float32)}
    assert wire_state(rec, None, [("h", "h_next")])["h"] is rec["h"]
    fed = wire_state(rec, {"h_next": np.full((1, 3), 2.0, np.float64)}, [("h", "h_next")])
    assert fed["h"].dtype == np.float32 and fed["h"].tolist() == [[2.0, 2.0, 2.0]] and fed["x"] is rec["x"]
    with pytest.raises(DataError, match=r"state output 'h_next' has shape \[1, 4\] but input 'h' takes \[1, 3\]"):
        wire_state(rec, {"h_next": np.zeros((1, 4))}, [("h", "h_next")])


def test_state_pair_parsing() -> None:
    assert parse_state_pairs(["a=b", "c = d,e=f"]) == [("a", "b"), ("c", "d"), ("e", "f")]
    for bad, msg in (("a", "not INPUT=OUTPUT"), ("=b", "not INPUT=OUTPUT"), ("a=b,a=c", "names state input 'a' twice")):
        with pytest.raises(DataError, match=msg):
            parse_state_pairs([bad])
    model = onnx.load_from_string(_rnn(metadata="h=h_next"))
    assert resolve_state_pairs(None, model) == [("h", "h_next")]
    assert resolve_state_pairs(["h=prob"], model) == [("h", "prob")] and resolve_state_pairs([], model) == []
    assert resolve_state_pairs(None, onnx.load_from_string(_rnn())) == []


@pytest.mark.parametrize(
    ("state", "needle"),
    [("hidden=h_next", "the model has no input 'hidden'"), ("h=h_out", "the model has no output 'h_out'")],
)
def test_state_pair_naming_a_missing_name_is_one_line(tmp_path: Path, state: str, needle: str) -> None:
    raw = _rnn()
    data = _rnn_data(raw)
    with pytest.raises(DataError, match=needle) as err:
        optimize(raw, data, data, tmp_path / "o.onnx", recipes=[], time_budget_s=10, state=[state])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "o.onnx").exists()


def _cli(tmp_path: Path, *extra: str, streams: np.ndarray | None = None) -> tuple[int, str]:
    raw = _rnn()
    model = tmp_path / "rnn.onnx"
    model.write_bytes(raw)
    data = _rnn_data(raw)
    ev = tmp_path / "eval.npz"
    arrays = {**data.inputs, "streams": np.asarray(data.streams if streams is None else streams)}
    np.savez(ev, **arrays)  # type: ignore[arg-type]  # not save_calls: it refuses a streams array of wrong length
    calib = save_calls(tmp_path / "calib.npz", {"x": data.inputs["x"]})  # no state: replayed from zeros
    args = ["optimize", str(model), "--calib", str(calib), "--eval", str(ev), "-o", str(tmp_path / "out.onnx")]
    result = CliRunner().invoke(app, [*args, *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def test_cli_state_option(tmp_path: Path) -> None:
    assert load_calls(save_calls(tmp_path / "s.npz", {"x": np.zeros((2, 1))}, streams=np.array([1, 2])),
                      input_names=["x"], streams_key="streams").streams is not None  # fmt: skip
    report = tmp_path / "r.json"
    code, out = _cli(tmp_path, "--state", "h=h_next", "--time-budget", "4", "--report", str(report))
    assert code == 0, out
    doc = json.loads(report.read_text())
    assert doc["evaluation"] == "closed_loop" and doc["eval_streams"] == STREAMS and doc["state_pairs"] == ["h=h_next"]
    code, out = _cli(tmp_path, "--state", "h=nope")
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "the model has no output 'nope'" in lines[0], out
    code, out = _cli(tmp_path, "--state", "h=h_next", streams=np.arange(5))
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "streams must hold one id per call" in lines[0], out
