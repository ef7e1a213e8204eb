"""Exact graph rewrites the optimizer applies for batch-1 latency (ADR 0070): the skl2onnx label chain and output
Identity folded in the float model, and the QuantizeLinear/DequantizeLinear pair (QDQ) or the DequantizeLinear
(QOperator) after a classifier's last quantized Gemm dropped. Each must leave the outputs exactly as they were (float
model) or closer to float (quantized model), and must not touch a pair that carries a folded Relu."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet import examples
from edgefleet.data import CallData
from edgefleet.optimize.candidates import Recipe
from edgefleet.optimize.prepare import prepare, simplify_outputs
from edgefleet.optimize.quantize import build_candidate


def _run(model: bytes, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"X": x})


def _ops(model: bytes) -> list[str]:
    return [n.op_type for n in onnx.load_from_string(model).graph.node]


def _session_ops(model: bytes) -> list[str]:
    """Op types of the graph onnxruntime actually runs (after its own fusions)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def test_sklearn_label_chain_folds_exactly(digits: examples.Digits) -> None:
    raw = examples.train_digits_mlp(hidden=(32,))
    prepared = prepare(raw)
    ops = _ops(prepared.data)
    assert "ArrayFeatureExtractor" not in ops and "Identity" not in ops and "Cast" not in ops
    assert any("label chain" in n for n in prepared.notes)
    x = digits.x_test
    before, after = _run(raw, x), _run(prepared.data, x)
    assert [o.name for o in onnx.load_from_string(prepared.data).graph.output] == ["label", "probabilities"]
    assert before[0].dtype == after[0].dtype == np.int64 and before[0].shape == after[0].shape
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_allclose(before[1], after[1], rtol=1e-5, atol=1e-6)


def _label_chain(classes: np.ndarray, cast_to: int | None) -> onnx.ModelProto:
    nodes = [
        helper.make_node("ArgMax", ["X"], ["am"], name="am", axis=1, keepdims=1),
        helper.make_node("ArrayFeatureExtractor", ["classes", "am"], ["afe"], name="afe", domain="ai.onnx.ml"),
        helper.make_node("Reshape", ["afe", "shape"], ["r" if cast_to is not None else "label"], name="reshape"),
    ]
    if cast_to is not None:
        nodes.append(helper.make_node("Cast", ["r"], ["label"], name="cast", to=cast_to))
    out_type = cast_to if cast_to is not None else helper.np_dtype_to_tensor_dtype(classes.dtype)
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("label", out_type, ["N"])],
        initializer=[
            numpy_helper.from_array(classes, "classes"),
            numpy_helper.from_array(np.array([-1], np.int64), "shape"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])


def test_label_chain_left_alone_unless_exact() -> None:
    # Classes that are not 0..C-1 (the label is a lookup, not the index) and an int32 label without a Cast (the
    # folded ArgMax would change the output type) must stay as they are.
    for classes, cast_to in (
        (np.array([3, 1, 2, 0], np.int64), TensorProto.INT64),
        (np.arange(4, dtype=np.int32), None),
    ):
        m = _label_chain(classes, cast_to)
        assert simplify_outputs(m) == []
        assert "ArrayFeatureExtractor" in [n.op_type for n in m.graph.node]
    m = _label_chain(np.arange(4, dtype=np.int64), TensorProto.INT64)
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    before = _run(m.SerializeToString(), x)[0]
    assert simplify_outputs(m)
    assert [n.op_type for n in m.graph.node] == ["ArgMax"]
    np.testing.assert_array_equal(before, _run(m.SerializeToString(), x)[0])


def test_last_gemm_writes_float_and_relus_are_kept(digits: examples.Digits) -> None:
    raw = examples.train_digits_mlp(hidden=(64, 64))
    prepared = prepare(raw)
    calib = CallData({"X": digits.x_train[:64, None, :]})
    x = digits.x_test
    ref = _run(prepared.data, x)[1]
    for fmt in ("QDQ", "QOperator"):
        cand = build_candidate(prepared, Recipe(kind="static", format=fmt, op_types=("Gemm", "Relu")), calib)
        ops = _session_ops(cand)
        # One QuantizeLinear for the input, three quantized Gemms, and nothing dequantized before Softmax.
        assert ops == ["QuantizeLinear", "QGemm", "QGemm", "QGemm", "Softmax", "ArgMax"], (fmt, ops)
        out = _run(cand, x)
        # The hidden Relus still act (dropping the pair that carries a folded Relu would break accuracy).
        assert np.mean(np.argmax(out[1], axis=1) == np.argmax(ref, axis=1)) > 0.97, fmt
        np.testing.assert_allclose(out[1].sum(axis=1), 1.0, rtol=1e-4)


def test_preparation_leaves_the_working_directory_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime saves a debugging copy of a model whose symbolic shape inference is incomplete (an op it does not
    know) into the current directory, weights and all: preparing must not leave it in the user's directory."""
    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Mystery", ["h"], ["y"], domain="example.custom", name="mystery"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])], [w],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)]
    )
    monkeypatch.chdir(tmp_path)
    prepared = prepare(model.SerializeToString())
    assert any("symbolic inference failed" in n for n in prepared.notes), prepared.notes
    assert list(tmp_path.iterdir()) == []
