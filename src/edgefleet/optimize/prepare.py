"""Preparation real models need before any quantizer touches them (issue 3, step 1).

Each step here exists because a quantizer failed without it on a real model (FIELD_NOTES "onnxruntime 1.32
quantization"): weights held as ``Constant`` nodes make ``quantize_*`` raise or silently quantize nothing;
``quant_pre_process`` needs sympy and its symbolic shape inference fails on some real models; unnamed nodes cannot be
kept in float (``nodes_to_exclude`` matches names).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgefleet.errors import ModelError

__all__ = ["COMPUTE_OPS", "PreparedModel", "compute_nodes", "load_onnx", "prepare"]

# Ops that carry the arithmetic a quantizer can speed up; op coverage is reported over these.
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "Attention", "Einsum"})

log = logging.getLogger(__name__)


@dataclass
class PreparedModel:
    """The float model every candidate starts from: ``model`` (shape-inferred, Constants folded into initializers,
    every node named) and its bytes; ``notes`` say which workarounds were applied, for the report."""

    model: onnx.ModelProto
    notes: list[str] = field(default_factory=list)

    @property
    def data(self) -> bytes:
        return bytes(self.model.SerializeToString())

    @property
    def op_types(self) -> set[str]:
        return {n.op_type for n in _all_nodes(self.model.graph)}


def load_onnx(data: bytes, source: str = "model") -> onnx.ModelProto:
    """Parse ONNX bytes; a file that is not ONNX is a :class:`ModelError` with one clear line."""
    try:
        model = onnx.load_from_string(data)
    except Exception:
        raise ModelError(f"{source} is not an ONNX model (it does not parse as an ONNX protobuf)")
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{source} is not an ONNX model (the graph is empty)")
    return model


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    out: list[onnx.NodeProto] = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out.extend(_all_nodes(attr.g))
            for g in attr.graphs:
                out.extend(_all_nodes(g))
    return out


def compute_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every node of a compute op type, subgraphs included (the denominator of op coverage)."""
    return [n for n in _all_nodes(model.graph) if n.op_type in COMPUTE_OPS]


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move top-level tensor ``Constant`` nodes into initializers; returns how many moved.

    Subgraph Constants stay: an initializer of an ``If`` branch is legal but the quantizers handle them no better."""
    graph = model.graph
    keep: list[onnx.NodeProto] = []
    moved = 0
    for node in graph.node:
        if node.op_type == "Constant" and not node.domain and len(node.output) == 1:
            attr = {a.name: a for a in node.attribute}
            if "value" in attr:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(attr["value"].t)
                tensor.name = node.output[0]
                graph.initializer.append(tensor)
                moved += 1
                continue
            for key, make in (("value_float", float), ("value_int", int)):
                if key in attr:
                    value = attr[key].f if key == "value_float" else attr[key].i
                    graph.initializer.append(numpy_helper.from_array(_scalar(make(value)), node.output[0]))
                    moved += 1
                    break
            else:
                keep.append(node)
            continue
        keep.append(node)
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    return moved


def _scalar(value: float | int) -> np.ndarray:
    return np.array(value, dtype=np.float32 if isinstance(value, float) else np.int64)


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed node a unique name so it can be reported and kept in float; returns how many."""
    nodes = _all_nodes(model.graph)
    taken = {n.name for n in nodes if n.name}
    named = 0
    for i, node in enumerate(nodes):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            named += 1
    return named


def _pre_process(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """``quant_pre_process`` (ORT basic optimization + shape inference), falling back step by step."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="edgefleet-prep-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(src))
        attempts: list[tuple[str, dict[str, bool]]] = [
            ("symbolic shape inference", {}),
            ("ONNX shape inference (symbolic inference failed)", {"skip_symbolic_shape": True}),
        ]
        for label, kwargs in attempts:
            try:
                # quant_pre_process prints and logs freely; keep the user's terminal clean.
                with contextlib.redirect_stdout(io.StringIO()):
                    quant_pre_process(str(src), str(dst), **kwargs)
                notes.append(f"pre-processed with ORT graph optimization and {label}")
                return onnx.load(str(dst))
            except Exception as err:  # sympy missing, symbolic inference bugs: any failure means "try the next"
                log.debug("quant_pre_process (%s) failed: %s", label, err)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        notes.append("quant_pre_process failed; used plain ONNX shape inference")
        return inferred
    except Exception:
        notes.append("all shape inference failed; quantizing without shapes")
        return model


def prepare(data: bytes, source: str = "model") -> PreparedModel:
    """Parse, name, fold Constants, optimize and shape-infer a float model."""
    model = load_onnx(data, source)
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        raise ModelError(f"{source} is not a valid ONNX model: {str(err).splitlines()[0]}")
    notes: list[str] = []
    moved = constants_to_initializers(model)
    if moved:
        notes.append(f"moved {moved} Constant node(s) into initializers")
    model = _pre_process(model, notes)
    named = name_nodes(model)
    if named:
        notes.append(f"named {named} unnamed node(s)")
    # Older IR versions keep initializers in graph inputs, which quantizers treat as activations.
    init_names = {t.name for t in model.graph.initializer}
    if any(i.name in init_names for i in model.graph.input):
        kept = [i for i in model.graph.input if i.name not in init_names]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        notes.append("removed initializers from graph inputs")
    return PreparedModel(model=model, notes=notes)
