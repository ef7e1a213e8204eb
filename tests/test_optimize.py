"""The optimizer end to end on real models and real onnxruntime sessions: digits MLP and CNN, Silero VAD, a model
whose naive INT8 breaks accuracy, one where INT8 (ConvInteger) is several times slower, and an embedding model.

No timing thresholds here: speed figures belong in benchmarks/optimize.py. Where a test asserts a paired verdict,
it is because selection itself is defined by that verdict; where a test needs a given verdict, it injects it
(``compare_latency``) rather than hoping the machine's load produces it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgefleet import examples
from edgefleet.data import CallData
from edgefleet.errors import UsageError
from edgefleet.optimize import CompareLatency, LatencyResult, OptimizeReport, Recipe, optimize
from edgefleet.optimize._models import conv_stack, digits_cnn, outlier_mlp, silero_calls, tiny_encoder, with_outlier
from edgefleet.optimize.prepare import prepare
from edgefleet.runtime.onnxruntime import OrtSession


def _check_invariants(report: OptimizeReport, out: Path) -> None:
    """What selection means, whatever the machine's load: the output is within tolerance and, unless it is the input
    itself (byte for byte), both paired A/Bs against the input called it faster; the file on disk is the chosen
    model."""
    chosen = report.chosen
    assert out.is_file()
    assert hashlib_of(out) == report.output_sha256
    assert chosen.status == "chosen" and chosen.within_tolerance
    assert chosen.metrics is not None
    assert report.baseline_metrics.overall - chosen.metrics.overall <= report.max_accuracy_drop + 1e-12
    assert report.baseline == "input" and report.candidates[0].recipe.kind == "input"
    if report.kept_input:
        assert chosen.recipe.kind == "input" and report.output_sha256 == report.model_sha256
        assert report.reason.startswith("kept the input: no candidate was measured faster")
    else:
        assert chosen.latency is not None and chosen.latency.verdict == "faster" and chosen.latency.confirmed
        assert "faster than your input model" in report.reason
    assert sum(c.status == "chosen" for c in report.candidates) == 1
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # the written model loads


def test_mlp_512_chooses_int8(tmp_path: Path, digits: examples.Digits) -> None:
    model = tmp_path / "mlp.onnx"
    model.write_bytes(examples.train_digits_mlp(hidden=(512, 512)))
    calib = CallData({"X": digits.x_train[:64, None, :]})
    ev = CallData({"X": digits.x_test[:200, None, :]}, labels=digits.y_test[:200])
    out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
    report = optimize(model, calib, ev, out, time_budget_s=60, report_path=rep)
    _check_invariants(report, out)
    assert report.chosen.recipe.kind in ("static", "dynamic"), report.reason
    assert report.chosen.op_coverage is not None and report.chosen.op_coverage.quantized
    # Report shape the gate reads.
    doc = json.loads(rep.read_text())
    assert set(doc["baseline_metrics"]) >= {"overall", "per_slice", "metric"}
    assert len(doc["baseline_metrics"]["per_slice"]) == 10  # per class
    assert set(doc["chosen"]) >= {"recipe", "metrics", "latency", "size_bytes", "op_coverage", "nodes_excluded"}
    assert set(doc["chosen"]["latency"]) >= {"median_ratio", "ci_low", "ci_high", "verdict"}
    assert set(doc["chosen"]["metrics"]["fidelity"]) >= {"agreement", "flip_rate", "cosine", "sqnr_db", "max_abs_error"}
    assert doc["reason"] and doc["time_spent_s"] > 0
    assert all("status" in c and "reason" in c for c in doc["candidates"])
    assert OptimizeReport.model_validate(doc).chosen.name == report.chosen.name
    assert hashlib_of(out) == report.output_sha256


def hashlib_of(p: Path) -> str:
    import hashlib

    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_digits_cnn_within_tolerance_never_slower(tmp_path: Path, digits: examples.Digits) -> None:
    raw = digits_cnn(digits)
    x_test = digits.x_test.reshape(-1, 1, 1, 8, 8)
    sess = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])
    acc = np.mean(np.argmax(sess.run(None, {"X": x_test[:, 0]})[0], 1) == digits.y_test)
    assert acc > 0.9  # genuinely trained
    calib = CallData({"X": digits.x_train[:64].reshape(-1, 1, 1, 8, 8)})
    ev = CallData({"X": x_test[:150]}, labels=digits.y_test[:150])
    out = tmp_path / "cnn.onnx"
    recipes = [
        Recipe(kind="static", op_types=("Conv", "Gemm", "Relu", "MaxPool", "Flatten")),
        Recipe(kind="dynamic", op_types=("MatMul", "Gemm")),
    ]
    report = optimize(raw, calib, ev, out, time_budget_s=30, recipes=recipes)
    _check_invariants(report, out)
    static = next(c for c in report.candidates if c.recipe.kind == "static")
    assert static.op_coverage is not None and set(static.op_coverage.quantized) == {"conv", "classifier"}
    assert static.within_tolerance


def test_silero_vad_within_tolerance_never_slower(tmp_path: Path, silero_path: Path) -> None:
    calls = silero_calls(str(silero_path), 80)
    calib = CallData({k: v[::2] for k, v in calls.items()})
    ev = CallData({k: v[1::2] for k, v in calls.items()})
    out = tmp_path / "vad.onnx"
    recipes = [Recipe(kind="static", op_types=("Conv",)), Recipe(kind="dynamic", op_types=("LSTM",))]
    report = optimize(
        silero_path, calib, ev, out, metric="cosine", time_budget_s=30, recipes=recipes, max_fallback_iterations=3
    )
    _check_invariants(report, out)
    assert any("Constant" in n for n in report.preparation)  # its weights are Constant nodes
    # Feeding the written model a recurrent state and a scalar sr works, and it agrees with the original.
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, ev.feed(0) | {"sr": np.array(16000)}
    )
    want = ort.InferenceSession(str(silero_path), providers=["CPUExecutionProvider"]).run(
        None, ev.feed(0) | {"sr": np.array(16000)}
    )
    assert np.allclose(got[0], want[0], atol=0.05)


def test_fallback_keeps_outlier_layer_in_float(tmp_path: Path, digits: examples.Digits) -> None:
    raw = outlier_mlp(digits)
    calib = CallData({"X": with_outlier(digits.x_train[:64])[:, None]})
    ev = CallData({"X": with_outlier(digits.x_test[:200], 1)[:, None]}, labels=digits.y_test[:200])
    out = tmp_path / "out.onnx"
    recipes = [Recipe(kind="static", op_types=("Gemm", "Relu"))]
    report = optimize(raw, calib, ev, out, time_budget_s=60, recipes=recipes)
    _check_invariants(report, out)
    naive = next(c for c in report.candidates if c.name == "static/QDQ/U8S8/minmax/per-tensor/Gemm")
    assert naive.status == "out_of_tolerance" and naive.metrics is not None and naive.metrics.overall < 0.5
    fb = next(c for c in report.candidates if c.derived_from == naive.name)
    assert fb.within_tolerance and fb.nodes_excluded == ["dense0"]
    assert fb.sensitivity is not None and fb.sensitivity[0].node == "dense0"
    assert fb.op_coverage is not None and "dense0" in fb.op_coverage.float and "dense1" in fb.op_coverage.quantized
    # The report names the node kept in float wherever the fallback candidate is the output.
    if report.chosen is fb:
        assert report.chosen.nodes_excluded == ["dense0"]


def test_dynamic_conv_refused_by_measurement(tmp_path: Path) -> None:
    raw = conv_stack(channels=16, size=24)
    x = np.random.default_rng(0).standard_normal((30, 1, 16, 24, 24)).astype(np.float32)
    out = tmp_path / "out.onnx"
    recipe = Recipe(kind="dynamic", op_types=("Conv",))
    report = optimize(
        raw, CallData({"X": x[:10]}), CallData({"X": x[10:]}), out, time_budget_s=30, prune=False, recipes=[recipe]
    )
    _check_invariants(report, out)
    assert report.chosen.recipe.kind in ("input", "float")
    dyn = next(c for c in report.candidates if c.recipe == recipe)
    assert dyn.status == "slower" and dyn.latency is not None and dyn.latency.verdict == "slower"
    assert "ConvInteger" in " ".join(n.op_type for n in onnx.load_from_string(_rebuild(raw, recipe)).graph.node)
    # With the rules on, the same recipe is refused before any measurement.
    pruned = optimize(raw, CallData({"X": x[:10]}), CallData({"X": x[10:]}), out, time_budget_s=30, recipes=[recipe])
    assert next(c for c in pruned.candidates if c.recipe == recipe).status == "pruned"


def _rebuild(raw: bytes, recipe: Recipe) -> bytes:
    from edgefleet.optimize.quantize import build_candidate

    return build_candidate(prepare(raw), recipe, CallData({"X": np.zeros((1, 1, 16, 24, 24), np.float32)}))


def _injected(ratio: float) -> tuple[list[OrtSession], CompareLatency]:
    """A ``compare_latency`` that calls every candidate ``ratio`` times the input's latency (the verdict follows
    the paired rule: faster below 0.97, slower above 1.05), recording the baseline session of each call."""
    baselines: list[OrtSession] = []

    def compare(base: OrtSession, cand: OrtSession, feed: dict[str, np.ndarray], budget_s: float) -> LatencyResult:
        baselines.append(base)
        assert cand is not base
        verdict = "faster" if ratio < 0.97 else ("slower" if ratio > 1.05 else "same")
        return LatencyResult(
            median_ratio=ratio, ci_low=ratio - 0.01, ci_high=ratio + 0.01, verdict=verdict, n_pairs=300, reason="set"
        )

    return baselines, compare


def test_input_kept_byte_for_byte_when_candidates_are_refused(
    tmp_path: Path, mlp_path: Path, digits: examples.Digits
) -> None:
    """Quantized candidates refused on fidelity (no cosine drop allowed), the prepared float model not faster:
    the output is the input file, byte for byte, and the report says why."""
    calib = CallData({"X": digits.x_train[:32, None, :]})
    ev = CallData({"X": digits.x_test[:60, None, :]})
    out = tmp_path / "out.onnx"
    baselines, compare = _injected(1.0)
    recipes = [Recipe(kind="dynamic", op_types=("MatMul", "Gemm")), Recipe(kind="static", op_types=("Gemm", "Relu"))]
    report = optimize(
        mlp_path, calib, ev, out, metric="cosine", max_accuracy_drop=0.0, recipes=recipes, time_budget_s=60,
        max_fallback_iterations=2, compare_latency=compare,
    )  # fmt: skip
    _check_invariants(report, out)
    assert out.read_bytes() == mlp_path.read_bytes()
    assert report.kept_input and report.chosen.name == "input"
    by_kind = {c.recipe.kind: c for c in report.candidates if c.derived_from is None}
    assert by_kind["dynamic"].status == by_kind["static"].status == "out_of_tolerance"
    assert by_kind["float"].status in ("not_faster", "out_of_tolerance")
    # Every A/B ran against one session: the input's, not the prepared float model's.
    assert baselines and all(b is baselines[0] for b in baselines)


@pytest.mark.parametrize(("ratio", "kind"), [(0.8, "float"), (1.0, "input"), (1.2, "input")])
def test_prepared_float_written_only_when_faster(
    tmp_path: Path, mlp_path: Path, digits: examples.Digits, ratio: float, kind: str
) -> None:
    raw = mlp_path.read_bytes()
    calib = CallData({"X": digits.x_train[:16, None, :]})
    ev = CallData({"X": digits.x_test[:40, None, :]}, labels=digits.y_test[:40])
    out = tmp_path / "out.onnx"
    _, compare = _injected(ratio)
    report = optimize(raw, calib, ev, out, recipes=[], time_budget_s=30, compare_latency=compare)
    _check_invariants(report, out)
    assert report.metric == "top1" and report.chosen.recipe.kind == kind
    float_cand = next(c for c in report.candidates if c.recipe.kind == "float")
    if kind == "float":
        assert out.read_bytes() == prepare(raw).data != raw
        assert float_cand.latency is not None and float_cand.latency.confirmed
    else:
        assert out.read_bytes() == raw
        assert float_cand.status == ("not_faster" if ratio == 1.0 else "slower")


def test_embedding_output_needs_a_metric(tmp_path: Path) -> None:
    raw = tiny_encoder()
    x = np.random.default_rng(0).standard_normal((24, 1, 8, 32)).astype(np.float32)
    calib, ev = CallData({"X": x[:8]}), CallData({"X": x[8:]})
    with pytest.raises(UsageError, match=r"'last_hidden_state' \[1, 8, 32\] has no class axis.*--metric"):
        optimize(raw, calib, ev, tmp_path / "out.onnx", time_budget_s=10)
    assert not (tmp_path / "out.onnx").exists()
    _, compare = _injected(1.0)
    recipes = [Recipe(kind="dynamic", op_types=("MatMul",))]
    out = tmp_path / "out.onnx"
    report = optimize(raw, calib, ev, out, metric="cosine", recipes=recipes, time_budget_s=20, compare_latency=compare)
    _check_invariants(report, out)
    dyn = next(c for c in report.candidates if c.recipe.kind == "dynamic")
    assert report.metric == "cosine" and dyn.within_tolerance  # dynamic INT8 keeps a 32-wide layer's cosine > 0.99


@pytest.mark.slow
def test_mlp_512_full_space_default_budget(tmp_path: Path, digits: examples.Digits) -> None:
    model = tmp_path / "mlp.onnx"
    model.write_bytes(examples.train_digits_mlp(hidden=(512, 512)))
    calib = CallData({"X": digits.x_train[:128, None, :]})
    ev = CallData({"X": digits.x_test[:, None, :]}, labels=digits.y_test)
    report = optimize(model, calib, ev, tmp_path / "out.onnx")
    _check_invariants(report, tmp_path / "out.onnx")
