"""Turn the prepared float model into one candidate per recipe with onnxruntime's quantizers.

The pinned workarounds live here, each with the failure it avoids; everything that can go wrong in a quantizer
becomes a :class:`QuantizeFailed` carrying one line, so one broken recipe never stops the search. Static recipes
take their activation ranges from a :class:`~edgefleet.optimize.calibration.CalibrationCache` (one calibration pass
per method, not per recipe).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.calibrate import save_tensors_data

from edgefleet.data import CallData
from edgefleet.optimize.calibration import CALIBRATION_METHODS, CalibrationCache, CalibrationFailed, CallDataReader
from edgefleet.optimize.candidates import Recipe
from edgefleet.optimize.prepare import COMPUTE_OPS, PreparedModel, compute_nodes

__all__ = [
    "CallDataReader",
    "Coverage",
    "QuantizeFailed",
    "build_candidate",
    "float_outputs_for_float_readers",
    "op_coverage",
    "qgemm_float_outputs",
    "static_options",
]

_QTYPE = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
# Ops that only exist in a quantized graph: a node of one of these types is quantized compute.
_QUANT_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "DynamicQuantizeLSTM",
        "QGemm",
        "QAttention",
        "QLinearConvTranspose",
    }
)


class QuantizeFailed(Exception):
    """A recipe the quantizer could not apply to this model (the candidate is reported as failed)."""


@dataclass(frozen=True)
class Coverage:
    quantized: list[str]
    float: list[str]


def op_coverage(model: onnx.ModelProto) -> Coverage:
    """Which compute nodes run quantized (a quantized op, or fed by ``DequantizeLinear`` in QDQ form) and which
    stay float. Names are the candidate graph's node names (QDQ keeps the float model's names)."""
    produced_by_dq: set[str] = set()
    nodes = compute_nodes(model)
    all_nodes = _walk(model.graph)
    for n in all_nodes:
        if n.op_type == "DequantizeLinear":
            produced_by_dq.update(n.output)
    quantized: list[str] = []
    floating: list[str] = []
    for n in all_nodes:
        if n.op_type in _QUANT_OPS:
            quantized.append(n.name or n.op_type)
    for n in nodes:
        # QDQ: data and weight both dequantized (what onnxruntime fuses into a quantized kernel); a float node
        # fed by one DequantizeLinear (a mixed recipe's float MatMul after a quantized Flatten) stays float.
        if n.op_type in COMPUTE_OPS and n.input and all(i in produced_by_dq for i in n.input[:2]):
            quantized.append(n.name)
        else:
            floating.append(n.name)
    return Coverage(sorted(quantized), sorted(floating))


def _walk(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    out: list[onnx.NodeProto] = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out.extend(_walk(attr.g))
    return out


def build_candidate(prepared: PreparedModel, recipe: Recipe, calib: CallData | CalibrationCache) -> bytes:
    """The candidate model's bytes for ``recipe``; raises :class:`QuantizeFailed` with one line. ``calib`` is a
    run's :class:`CalibrationCache` (ranges reused across recipes), or calls to calibrate on for this recipe alone."""
    if recipe.kind == "float":
        return prepared.data
    if recipe.kind == "input":
        raise QuantizeFailed("the input model is the baseline, not a recipe to build")
    # The quantizers mutate a ModelProto they are given (weights moved to external data): give each a copy.
    model = onnx.ModelProto()
    model.CopyFrom(prepared.model)
    try:
        with _quiet(), tempfile.TemporaryDirectory(prefix="edgefleet-q-") as tmp:
            if recipe.kind == "fp16":
                return _fp16(model)
            out = Path(tmp) / "candidate.onnx"
            if recipe.kind == "mixed":
                return _mixed(prepared, model, recipe, calib, Path(tmp))
            if recipe.kind == "dynamic":
                _dynamic(model, recipe, out)
                return out.read_bytes()
            cache = calib if isinstance(calib, CalibrationCache) else CalibrationCache(prepared, calib)
            _static(model, recipe, cache, out)
            quantized = onnx.load(str(out))
            if recipe.format == "QDQ":
                float_outputs_for_float_readers(quantized, prepared.model)
            else:
                qgemm_float_outputs(quantized, prepared.model)
            return bytes(quantized.SerializeToString())
    except QuantizeFailed:
        raise
    except CalibrationFailed as err:
        raise QuantizeFailed(f"{recipe.calibration} calibration failed: {err}")
    except Exception as err:  # onnxruntime's quantizers raise anything from KeyError to RuntimeError
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise QuantizeFailed(f"{type(err).__name__}: {first[:300]}")


def _mixed(
    prepared: PreparedModel, model: onnx.ModelProto, recipe: Recipe, calib: CallData | CalibrationCache, tmp: Path
) -> bytes:
    """One quantizer pass per region, each on its own nodes only (every other compute node excluded), static
    first: its ranges are the float model's tensors, which a dynamic pass before it could rename."""
    names = [n.name for n in compute_nodes(prepared.model)]
    known = _names(prepared.model)
    regions = sorted(recipe.regions, key=lambda g: g.recipe.kind != "static")
    if not regions or any(g.recipe.kind not in ("static", "dynamic") for g in regions):
        raise QuantizeFailed("a mixed recipe needs static or dynamic regions")
    for i, region in enumerate(regions):
        others = set(names) - set(region.nodes)
        part = region.recipe.model_copy(
            update={"nodes_to_exclude": tuple(sorted(others | set(recipe.nodes_to_exclude)))}
        )
        out = tmp / f"part{i}.onnx"
        if part.kind == "dynamic":
            _dynamic(model, part, out)
            model = onnx.load(str(out))
            continue
        cache = calib if isinstance(calib, CalibrationCache) else CalibrationCache(prepared, calib)
        _static(model, part, cache, out)
        model = onnx.load(str(out))
        if part.format == "QDQ":
            float_outputs_for_float_readers(model, prepared.model)
        else:
            qgemm_float_outputs(model, prepared.model)
        # Both quantizers name what they add after the tensor they quantize (a Flatten output ``f`` becomes
        # ``f_quantized`` in either), so the next pass would define a name twice: tag this pass's names.
        _tag_new_names(model, known, f"__p{i}")
        known = _names(model)
    return bytes(model.SerializeToString())


def _names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    tensors = {t for n in g.node for t in (*n.input, *n.output)}
    return tensors | {n.name for n in g.node} | {t.name for t in g.initializer} | {i.name for i in g.input}


def _tag_new_names(model: onnx.ModelProto, known: set[str], tag: str) -> None:
    """Append ``tag`` to every tensor and node name of the main graph not in ``known`` (graph inputs and outputs
    keep theirs: callers feed and read them by name)."""
    g = model.graph
    keep = known | {i.name for i in g.input} | {o.name for o in g.output} | {""}

    def new(name: str) -> str:
        return name if name in keep else name + tag

    for n in g.node:
        n.input[:] = [new(t) for t in n.input]
        n.output[:] = [new(t) for t in n.output]
        n.name = new(n.name)
    for t in g.initializer:
        t.name = new(t.name)
    for vi in g.value_info:
        vi.name = new(vi.name)


@contextlib.contextmanager
def _quiet() -> Any:
    """The quantizers print progress and log warnings per node; the report says what matters."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _fp16(model: onnx.ModelProto) -> bytes:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types: callers keep feeding float32 (the raw input schema must not change with the recipe).
    converted = convert_float_to_float16(model, keep_io_types=True)
    return bytes(converted.SerializeToString())


def _dynamic(model: onnx.ModelProto, r: Recipe, out: Path) -> None:
    # The dynamic quantizer rewrites a Gemm ``g`` as MatMul ``g_MatMul`` + Add before it matches nodes_to_exclude:
    # without the second name an excluded Gemm was quantized all the same.
    excluded = [*r.nodes_to_exclude, *(f"{n}_MatMul" for n in r.nodes_to_exclude)]
    quantize_dynamic(
        model,
        out,
        op_types_to_quantize=list(r.op_types) if r.op_types is not None else None,
        per_channel=r.per_channel,
        reduce_range=r.reduce_range,
        weight_type=_QTYPE[r.weight_type],
        nodes_to_exclude=excluded,
        # Quantizing a MatMul between two activations would need a second dynamic range; not worth it on CPU.
        extra_options={"MatMulConstBOnly": True},
    )


def _static(model: onnx.ModelProto, r: Recipe, cache: CalibrationCache, out: Path) -> None:
    # onnxruntime's calibration cache file: quantize_static loads these ranges instead of calibrating again.
    ranges = out.with_name("ranges.json")
    save_tensors_data(cache.ranges(r), ranges)
    model, options = static_options(model, r)
    quantize_static(model, out, None, calibration_cache_path=ranges, **options)


def static_options(model: onnx.ModelProto, r: Recipe) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The model to hand ``quantize_static`` for ``r`` and its keyword arguments, calibration data aside."""
    extra: dict[str, Any] = {}
    if r.per_channel:
        # Per-channel Gemm crashes in _adjust_weight_scale_for_int32_bias (onnxruntime #24815).
        extra["QDQDisableWeightAdjustForInt32Bias"] = True
        if r.format == "QDQ" and _opset(model) < 13:
            # Per-channel DequantizeLinear needs opset 13's axis attribute; on 12 the graph comes out invalid.
            model = onnx.version_converter.convert_version(model, 13)
    return model, dict(
        quant_format=QuantFormat.QDQ if r.format == "QDQ" else QuantFormat.QOperator,
        op_types_to_quantize=list(r.op_types) if r.op_types is not None else None,
        per_channel=r.per_channel,
        reduce_range=r.reduce_range,
        activation_type=_QTYPE[r.activation_type],
        weight_type=_QTYPE[r.weight_type],
        nodes_to_exclude=list(r.nodes_to_exclude),
        calibrate_method=CALIBRATION_METHODS[r.calibration],
        extra_options=extra,
    )


# Compute ops whose QDQ group onnxruntime's CPU provider fuses with a *float* output (no QuantizeLinear after it):
# DQ → Gemm → float becomes QGemm with a float output (checked with onnxruntime 1.32's optimized graph).
_FLOAT_OUT_FUSABLE = frozenset({"Gemm"})


def float_outputs_for_float_readers(model: onnx.ModelProto, float_model: onnx.ModelProto) -> int:
    """Drop the QuantizeLinear → DequantizeLinear pair on a quantized Gemm's output when only float ops read it
    (a classifier's last layer feeding Softmax, say): the pair only adds rounding and two kernels, and without it
    onnxruntime fuses the Gemm into a QGemm that writes float. Returns how many pairs were dropped.

    A pair is kept when the Gemm's output is not the tensor the float model's node of that name produced: the QDQ
    quantizer folds a following Relu/Clip into that QuantizeLinear (renaming the tensor), and the pair then *is*
    the activation."""
    graph = model.graph
    float_out = {(n.name, o) for n in float_model.graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def fed_by_dq(n: onnx.NodeProto) -> bool:
        return any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input)

    def float_reader(n: onnx.NodeProto) -> bool:
        # A reader whose own outputs are quantized belongs to a QDQ group: it expects the DQ and is left alone.
        return n.op_type not in ("QuantizeLinear", "DequantizeLinear") and not any(
            r.op_type == "QuantizeLinear" for o in n.output for r in readers.get(o, [])
        )

    drop: list[onnx.NodeProto] = []
    pairs = 0
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.output[0] in outputs:
            continue
        src = q.input[0]
        gemm = producer.get(src)
        if gemm is None or gemm.op_type not in _FLOAT_OUT_FUSABLE or not fed_by_dq(gemm):
            continue
        if (gemm.name, src) not in float_out or len(readers.get(src, [])) != 1:
            continue
        dqs = readers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" or d.output[0] in outputs for d in dqs):
            continue
        users = [u for d in dqs for u in readers.get(d.output[0], [])]
        if not users or not all(float_reader(u) for u in users):
            continue
        dq_out = {d.output[0] for d in dqs}
        for u in users:
            u.input[:] = [src if i in dq_out else i for i in u.input]
        drop.extend([q, *dqs])
        pairs += 1
    if drop:
        ids = {id(n) for n in drop}
        kept = [n for n in graph.node if id(n) not in ids]
        del graph.node[:]
        graph.node.extend(kept)
        used = {i for n in graph.node for i in n.input}
        inits = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(inits)
    return pairs


def qgemm_float_outputs(model: onnx.ModelProto, float_model: onnx.ModelProto) -> int:
    """The QOperator twin of :func:`float_outputs_for_float_readers`: a ``QGemm`` whose only reader is a
    ``DequantizeLinear`` with the same scale and zero point writes float itself (its ``y_scale``/``y_zero_point`` are
    optional inputs), one kernel and one rounding less. Kept when the dequantized tensor is not a Gemm output of the
    float model (a Relu folded into the QGemm's output range would be lost). Returns how many were rewritten."""
    graph = model.graph
    gemm_out = {o for n in float_model.graph.node if n.op_type == "Gemm" for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    drop: list[onnx.NodeProto] = []
    for g in graph.node:
        if g.op_type != "QGemm" or g.domain != "com.microsoft" or len(g.input) != 9 or g.output[0] in outputs:
            continue
        users = readers.get(g.output[0], [])
        if len(users) != 1 or users[0].op_type != "DequantizeLinear":
            continue
        dq = users[0]
        if list(dq.input[1:]) != list(g.input[7:9]) or dq.output[0] not in gemm_out:
            continue
        del g.input[7:]
        g.output[0] = dq.output[0]
        drop.append(dq)
    if drop:
        ids = {id(n) for n in drop}
        kept = [n for n in graph.node if id(n) not in ids]
        del graph.node[:]
        graph.node.extend(kept)
    return len(drop)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
