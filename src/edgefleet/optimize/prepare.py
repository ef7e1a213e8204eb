"""Preparation real models need before any quantizer touches them.

Each step here exists because a quantizer failed without it on a real model with onnxruntime 1.32:
 weights held as ``Constant`` nodes make ``quantize_*`` raise or silently quantize nothing;
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

__all__ = ["COMPUTE_OPS", "PreparedModel", "compute_nodes", "load_onnx", "prepare", "simplify_outputs"]

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
                # quant_pre_process prints and logs freely; keep the user's terminal clean. When symbolic shape
                # inference comes out incomplete, onnxruntime saves a debugging copy of the model (and its weights,
                # as <uuid>.data) into the current directory: run it in ours, which goes away.
                with contextlib.redirect_stdout(io.StringIO()), contextlib.chdir(tmp):
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


def _has_subgraphs(model: onnx.ModelProto) -> bool:
    return any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute
    )


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _fold_output_identities(graph: onnx.GraphProto) -> int:
    """``producer -> t -> Identity -> output`` becomes ``producer -> output``: the producer writes the graph output
    itself (every reader of ``t`` reads ``output`` instead), so one kernel launch less per call."""
    outputs = {o.name for o in graph.output}
    inputs = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    produced = {o for n in graph.node for o in n.output}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "Identity" or node.domain or len(node.input) != 1 or len(node.output) != 1:
            continue
        src, dst = node.input[0], node.output[0]
        if dst not in outputs or src in outputs or src in inputs or src not in produced:
            continue
        graph.node.remove(node)
        for n in graph.node:
            n.output[:] = [dst if o == src else o for o in n.output]
            n.input[:] = [dst if i == src else i for i in n.input]
        kept = [v for v in graph.value_info if v.name != src]
        del graph.value_info[:]
        graph.value_info.extend(kept)
        folded += 1
    return folded


def _rank(graph: onnx.GraphProto, name: str) -> int | None:
    for v in (*graph.value_info, *graph.input, *graph.output):
        if v.name == name and v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            return len(v.type.tensor_type.shape.dim)
    return None


def _fold_label_lookup(graph: onnx.GraphProto) -> int:
    """scikit-learn classifiers exported by skl2onnx compute their label as
    ``ArgMax(keepdims=1) -> ArrayFeatureExtractor(classes) -> Reshape([-1]) [-> Cast(int64)]``. When ``classes`` is
    the integer range ``0..C-1``, the label comes out int64 and the ArgMax input has rank 2, that chain is exactly
    ``ArgMax(keepdims=0)``: four
    kernel launches become one, which matters at batch 1 where each launch costs about a microsecond here."""
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    cons = _consumers(graph)

    def only(t: str, op: str) -> onnx.NodeProto | None:
        users = cons.get(t, [])
        if t in outputs or len(users) != 1 or users[0].op_type != op:
            return None
        return users[0]

    def const(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    folded = 0
    for am in [n for n in graph.node if n.op_type == "ArgMax" and not n.domain]:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in am.attribute}
        axis, keep, last = attrs.get("axis", 0), attrs.get("keepdims", 1), attrs.get("select_last_index", 0)
        if keep != 1 or last != 0 or _rank(graph, am.input[0]) != 2 or axis not in (1, -1):
            continue
        afe = only(am.output[0], "ArrayFeatureExtractor")
        if afe is None or afe.domain != "ai.onnx.ml" or list(afe.input)[1:] != [am.output[0]]:
            continue
        classes = const(afe.input[0])
        if classes is None or classes.dtype not in (np.int32, np.int64):
            continue
        if classes.ndim != 1 or not np.array_equal(classes, np.arange(classes.size)):
            continue
        reshape = only(afe.output[0], "Reshape")
        if reshape is None or reshape.input[0] != afe.output[0]:
            continue
        shape = const(reshape.input[1])
        if shape is None or shape.tolist() != [-1]:
            continue
        last_node, final = reshape, reshape.output[0]
        cast = only(final, "Cast")
        if cast is not None:
            to = {a.name: onnx.helper.get_attribute_value(a) for a in cast.attribute}.get("to")
            if to != onnx.TensorProto.INT64:
                continue
            last_node, final = cast, cast.output[0]
        elif classes.dtype != np.int64:  # ArgMax yields int64; without a Cast the label's type would change
            continue
        at = list(graph.node).index(am)
        for n in {id(x): x for x in (am, afe, reshape, last_node)}.values():
            graph.node.remove(n)
        graph.node.insert(at, onnx.helper.make_node("ArgMax", [am.input[0]], [final], name=am.name, axis=1, keepdims=0))
        folded += 1
        cons = _consumers(graph)
    if folded:
        used = {i for n in graph.node for i in n.input}
        kept = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return folded


def simplify_outputs(model: onnx.ModelProto) -> list[str]:
    """Exact rewrites of bookkeeping around the outputs, applied to the float model and therefore to every
    candidate (the float baseline included, so the A/B stays like for like). Returns notes for the report."""
    if _has_subgraphs(model):
        return []
    notes: list[str] = []
    ids = _fold_output_identities(model.graph)
    if ids:
        notes.append(f"folded {ids} Identity node(s) in front of graph outputs")
    labels = _fold_label_lookup(model.graph)
    if labels:
        notes.append(f"folded {labels} ArgMax→ArrayFeatureExtractor→Reshape→Cast label chain(s) into one ArgMax")
    return notes


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
    notes.extend(simplify_outputs(model))
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
