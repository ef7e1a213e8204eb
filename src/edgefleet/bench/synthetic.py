"""Real ONNX models built for checking the benchmark itself: a model holding a large initializer (peak-RSS
checks) and a *slower variant* of any model (the same outputs plus a branch of extra MatMul work), so the tests
and ``benchmarks/bench_stats.py`` can compare a model with a known-slower copy of itself."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["add_work", "big_initializer_model"]


def big_initializer_model(n_floats: int = 52_000_000, opset: int = 17) -> bytes:
    """``Y = ReduceSum(W + X)`` with ``W`` a float32 initializer of ``n_floats`` values (52M ≈ 208 MB)."""
    w = numpy_helper.from_array(np.full(n_floats, 0.5, dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Add", ["W", "X"], ["S"]), helper.make_node("ReduceSum", ["S"], ["Y"], keepdims=0)],
        "big_initializer",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [])],
        initializer=[w],
    )
    return bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString())


def add_work(model_bytes: bytes, *, matmuls: int, width: int = 256, input_name: str | None = None) -> bytes:
    """The model plus a side branch ``input → MatMul → (MatMul)×matmuls → ReduceSum`` exposed as an extra output
    ``edgefleet_work`` (an output, so graph optimization cannot prune it). The original outputs are unchanged."""
    model = onnx.load_from_string(model_bytes)
    g = model.graph
    inp = next(i for i in g.input if input_name is None or i.name == input_name)
    dims = inp.type.tensor_type.shape.dim
    features = dims[-1].dim_value
    if features <= 0:
        raise ValueError(f"input {inp.name!r} needs a fixed last dimension to add work to it")
    rng = np.random.default_rng(0)
    # Orthogonal weights keep the activations' scale, so the extra branch never overflows to inf.
    q, _ = np.linalg.qr(rng.standard_normal((width, width)))
    g.initializer.append(
        numpy_helper.from_array(rng.standard_normal((features, width)).astype(np.float32) / 8, "edgefleet_w0")
    )
    g.initializer.append(numpy_helper.from_array(q.astype(np.float32), "edgefleet_wq"))
    g.node.append(helper.make_node("MatMul", [inp.name, "edgefleet_w0"], ["edgefleet_h0"]))
    prev = "edgefleet_h0"
    for i in range(matmuls):
        g.node.append(helper.make_node("MatMul", [prev, "edgefleet_wq"], [f"edgefleet_h{i + 1}"]))
        prev = f"edgefleet_h{i + 1}"
    g.node.append(helper.make_node("ReduceSum", [prev], ["edgefleet_work"], keepdims=0))
    g.output.append(helper.make_tensor_value_info("edgefleet_work", TensorProto.FLOAT, []))
    return bytes(model.SerializeToString())
