"""Mixed recipes (static convolutions, dynamic MatMuls, sensitive nodes in float), a search that keeps looking for a
faster qualified candidate after the first, and screening on a subset of the eval calls (successive halving).

Which candidate is *faster* is decided by an injected ``compare_latency`` driven by a deterministic cost model of
the candidate graph (float MACs cost most, quantized ones less), so the choice can be asserted; one real paired A/B
only checks the promise (never slower, never out of tolerance), never a speed figure."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet import examples
from edgefleet.config import RuntimeSettings
from edgefleet.data import CallData
from edgefleet.optimize import LatencyResult, OptimizeReport, Recipe, optimize
from edgefleet.optimize import api as api_module
from edgefleet.optimize._models import outlier_mlp, with_outlier
from edgefleet.optimize.candidates import Region, prune
from edgefleet.optimize.mixed import describe, keep_float, mixed_recipes, most_sensitive, split_regions, with_mixed
from edgefleet.optimize.prepare import prepare
from edgefleet.optimize.quantize import build_candidate, op_coverage
from edgefleet.optimize.report import CandidateReport, NodeSensitivity
from edgefleet.optimize.select import (
    MIN_SCREEN_CALLS,
    CandidateLine,
    candidate_line,
    far_out_of_tolerance,
    screen_indices,
)
from edgefleet.runtime.onnxruntime import OrtSession

# ---------------------------------------------------------------- models


def conv_matmul(seed: int = 0) -> bytes:
    """Two conv stages (4→16→16 channels on 16×16) then three MatMuls (1024→512→512→10): the shape of a recognizer
    whose convolutions want static INT8 and whose large MatMuls want dynamic INT8. Input ``X`` float32[1, 4, 16, 16]."""
    rng = np.random.default_rng(seed)

    def he(*shape: int, fan: int) -> np.ndarray:
        return (rng.standard_normal(shape) * math.sqrt(2 / fan)).astype(np.float32)

    inits = [
        numpy_helper.from_array(he(16, 4, 3, 3, fan=36), "w1"),
        numpy_helper.from_array(he(16, 16, 3, 3, fan=144), "w2"),
        numpy_helper.from_array(he(1024, 512, fan=1024), "m1"),
        numpy_helper.from_array(he(512, 512, fan=512), "m2"),
        numpy_helper.from_array(he(512, 10, fan=512), "m3"),
    ]
    nodes = [
        helper.make_node("Conv", ["X", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "m1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu3"),
        helper.make_node("MatMul", ["a1", "m2"], ["h2"], name="fc2"),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu4"),
        helper.make_node("MatMul", ["a2", "m3"], ["logits"], name="fc3"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_matmul",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def outlier_weight(seed: int = 0) -> bytes:
    """One MatMul 32 → 10 whose weight holds one huge value: per-tensor INT8 rounds every other weight to zero (far
    out of tolerance), per-channel INT8 only costs column 0 its small weights (within tolerance)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((32, 10)) * 0.3).astype(np.float32)
    w[0, 0] = 1e4
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["logits"], name="fc")],
        "outlier_weight",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString())


# ---------------------------------------------------------------- a cost model standing in for the clock

_STATIC_OPS = {"QLinearConv", "QLinearMatMul", "QGemm"}
_DYNAMIC_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
_FLOAT_OPS = {"Conv", "MatMul", "Gemm"}


def float_macs(raw: bytes) -> dict[str, int]:
    """Multiply-accumulates per compute node of the float model (batch 1): weight size, times the output's
    spatial size for a Conv."""
    model = onnx.shape_inference.infer_shapes(onnx.load_from_string(raw))
    inits = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    dims = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in model.graph.value_info}
    dims |= {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    out: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in _FLOAT_OPS:
            spatial = int(np.prod(dims[n.output[0]][2:])) if n.op_type == "Conv" else 1
            out[n.name] = inits[n.input[1]] * spatial
    return out


def graph_cost(data: bytes, macs: dict[str, int], factors: dict[str, float]) -> float:
    """Cost of a candidate graph: each compute node's float-model MACs times the factor of how it runs —
    ``float``, ``static_conv``, ``static_matmul`` or ``dynamic`` (a quantizer keeps the float node's name as a
    prefix: ``conv1_quant``, ``fc1_MatMul_quant``)."""
    model = onnx.load_from_string(data)
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    total = 0.0
    for n in model.graph.node:
        owner = max((name for name in macs if n.name.startswith(name)), key=len, default=None)
        if owner is None:
            continue
        conv = "Conv" in n.op_type
        if n.op_type in _STATIC_OPS or (
            n.op_type in _FLOAT_OPS and any(producer.get(i) == "DequantizeLinear" for i in n.input)
        ):
            how = "static_conv" if conv else "static_matmul"
        elif n.op_type in _DYNAMIC_OPS:
            how = "dynamic"
        elif n.op_type in _FLOAT_OPS:
            how = "float"
        else:
            continue
        total += macs[owner] * factors[how]
    return total


class _KeepsBytes(OrtSession):
    """The real onnxruntime session, remembering the model it was made from (for the cost model and call counts)."""

    runs: ClassVar[Counter[str]] = Counter()

    def __init__(self, model: bytes | str, settings: RuntimeSettings | None = None) -> None:
        super().__init__(model, settings)
        assert isinstance(model, bytes)
        self.model_bytes = model
        self.sha = hashlib.sha256(model).hexdigest()

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        type(self).runs[self.sha] += 1
        return super().run(feeds, output_names)


def cost_compare(macs: dict[str, int], factors: dict[str, float]) -> api_module.CompareLatency:
    """A ``compare_latency`` whose ratio is the cost model's (candidate / input), judged by the paired rule's
    thresholds (faster below 0.97, slower above 1.05)."""

    def compare(base: OrtSession, cand: OrtSession, feed: dict[str, np.ndarray], budget_s: float) -> LatencyResult:
        assert isinstance(base, _KeepsBytes) and isinstance(cand, _KeepsBytes)
        ratio = graph_cost(cand.model_bytes, macs, factors) / graph_cost(base.model_bytes, macs, factors)
        verdict = "faster" if ratio < 0.97 else ("slower" if ratio > 1.05 else "same")
        return LatencyResult(
            median_ratio=ratio, ci_low=ratio * 0.99, ci_high=ratio * 1.01, verdict=verdict, n_pairs=300, reason="cost"
        )

    return compare


@pytest.fixture()
def keeps_bytes(monkeypatch: pytest.MonkeyPatch) -> type[_KeepsBytes]:
    monkeypatch.setattr(api_module, "OrtSession", _KeepsBytes)
    monkeypatch.setattr(_KeepsBytes, "runs", Counter())
    return _KeepsBytes


def _check_promise(report: OptimizeReport, out: Path, raw: bytes) -> None:
    """Never out of tolerance, never slower (both A/Bs said faster), else the input byte for byte."""
    chosen = report.chosen
    assert chosen.status == "chosen" and chosen.within_tolerance and chosen.metrics is not None
    assert report.baseline_metrics.overall - chosen.metrics.overall <= report.max_accuracy_drop + 1e-12
    assert hashlib.sha256(out.read_bytes()).hexdigest() == report.output_sha256
    if report.kept_input:
        assert out.read_bytes() == raw
    else:
        assert chosen.latency is not None and chosen.latency.verdict == "faster" and chosen.latency.confirmed
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def _calls(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 4, 16, 16)).astype(np.float32)


# ---------------------------------------------------------------- pure parts

NODES = [("conv1", "Conv"), ("conv2", "Conv"), ("fc1", "MatMul"), ("fc2", "MatMul"), ("fc3", "Gemm"), ("e", "Einsum")]


def test_regions_split_by_op_type() -> None:
    assert split_regions(NODES) == (("conv1", "conv2"), ("fc1", "fc2", "fc3"))
    assert mixed_recipes([("fc1", "MatMul")], {"MatMul"}) == []  # one region: a single recipe covers it
    assert mixed_recipes([("c", "Conv")], {"Conv"}) == []


def test_mixed_recipes_static_convs_dynamic_matmuls() -> None:
    recipes = mixed_recipes(NODES, {"Conv", "MatMul", "Gemm", "Einsum", "Relu", "Flatten"})
    assert len(recipes) == 4 and all(r.kind == "mixed" for r in recipes)
    first = recipes[0]
    assert first.name == "mixed[static/QOperator/U8S8/minmax/per-channel/Conv; dynamic/U8S8/per-tensor/MatMul+Gemm]"
    static, dynamic = first.regions
    assert static.recipe.op_types == ("Conv", "Relu", "Flatten") and static.nodes == ("conv1", "conv2")
    assert dynamic.recipe.op_types == ("MatMul", "Gemm") and dynamic.nodes == ("fc1", "fc2", "fc3")
    assert len({r.name for r in recipes}) == 4  # names tell the variants apart
    # Names are stable: rebuilt from the same facts, the same names.
    assert [r.name for r in mixed_recipes(NODES, {"Conv", "MatMul", "Gemm", "Relu", "Flatten", "Einsum"})] == [
        r.name for r in recipes
    ]
    # Gemm alone is quantized dynamically only with MatMul listed (the quantizer rewrites it as MatMul + Add).
    gemm_only = mixed_recipes([("c", "Conv"), ("g", "Gemm")], {"Conv", "Gemm"})[0]
    assert gemm_only.regions[1].recipe.op_types == ("MatMul", "Gemm")


def test_keep_float_and_describe() -> None:
    r = mixed_recipes(NODES, {"Conv", "MatMul", "Gemm"})[0]
    kept = keep_float(r, ["conv1", "not-in-model"])
    assert kept.nodes_to_exclude == ("conv1",) and kept.name.endswith("]/excl1")
    assert keep_float(r, ["e"]) == r  # Einsum is in no region: nothing to keep in float
    assert keep_float(kept, ["conv1"]) == kept
    assert describe(kept) == [
        "static/QOperator/U8S8/minmax/per-channel/Conv: conv2",
        "dynamic/U8S8/per-tensor/MatMul+Gemm: fc1, fc2, fc3",
        "float: conv1",
    ]
    single = Recipe(kind="static")
    assert keep_float(single, ["a"]).nodes_to_exclude == ("a",)


def test_most_sensitive_by_gain_then_sqnr() -> None:
    ranking = [
        NodeSensitivity(node="a", sqnr_db=10.0, loo_gain=0.01),
        NodeSensitivity(node="b", sqnr_db=30.0, loo_gain=0.2),
        NodeSensitivity(node="c", sqnr_db=5.0),
        NodeSensitivity(node="d"),
    ]
    assert most_sensitive(ranking, 2) == ["b", "a"]
    assert most_sensitive(ranking, 10) == ["b", "a", "c", "d"]
    assert most_sensitive(ranking, 0) == []


def test_with_mixed_after_the_fast_path() -> None:
    space = [Recipe(kind="static"), Recipe(kind="static", per_channel=True), Recipe(kind="dynamic")]
    mixed = mixed_recipes(NODES, {"Conv", "MatMul"})[:1]
    assert with_mixed(space, mixed) == [space[0], space[1], mixed[0], space[2]]
    assert with_mixed(space[2:], mixed) == [space[2], mixed[0]]  # fewer static recipes: at the end
    assert with_mixed([*space, mixed[0]], mixed).count(mixed[0]) == 1


def test_mixed_pruned_by_its_parts() -> None:
    from edgefleet.bench.tiers import get_tier

    s8 = Recipe(kind="static", format="QOperator", activation_type="int8", weight_type="int8", op_types=("Conv",))
    r = Recipe(
        kind="mixed",
        regions=(
            Region(recipe=s8, nodes=("conv1",)),
            Region(recipe=Recipe(kind="dynamic", op_types=("MatMul",)), nodes=("fc1",)),
        ),
    )
    kept, pruned = prune([r], get_tier("x86-avx2"), {"Conv", "MatMul"})
    assert not kept and "no VNNI" in pruned[0].reason
    assert prune([r], get_tier("x86-vnni"), {"Conv", "MatMul"})[0] == [r]


def test_screen_indices() -> None:
    assert screen_indices(31) is None  # more than half the calls: not worth a second pass
    idx = screen_indices(64)
    assert idx is not None and len(idx) == MIN_SCREEN_CALLS and idx[0] == 0 and idx[-1] == 63
    big = screen_indices(400)
    assert big is not None and len(big) == 100 and len(set(big)) == 100
    assert screen_indices(64, prefix=True) == list(range(16))


def test_far_out_of_tolerance() -> None:
    # 16 calls: margin max(0.02, 0.25) over the 0.01 allowed
    assert far_out_of_tolerance(1.0, 0.75, 0.01, 16) is None
    why = far_out_of_tolerance(1.0, 0.7, 0.01, 16, "top1")
    assert why == "screened out: top1 drops 0.3000 on 16 calls, far over the 0.01 allowed"
    assert far_out_of_tolerance(1.0, float("nan"), 0.01, 16) is not None
    # a wide tolerance widens the margin with it
    assert far_out_of_tolerance(1.0, 0.5, 0.2, 10_000) is None
    assert far_out_of_tolerance(1.0, 0.39, 0.2, 10_000) is not None


def test_candidate_line() -> None:
    c = CandidateReport(name="static/x", recipe=Recipe(kind="static"), status="out_of_tolerance", reason="far")
    c.eval_calls = 16
    line = candidate_line(c, 64)
    assert isinstance(line, CandidateLine) and line == "static/x · far · 16 of 64 calls"
    c2 = CandidateReport(name="dyn", recipe=Recipe(kind="dynamic"), status="qualified", within_tolerance=True)
    c2.latency = LatencyResult(median_ratio=0.5, ci_low=0.4, ci_high=0.6, verdict="faster", n_pairs=3, reason="")
    assert candidate_line(c2, 64) == "dyn · within tolerance · latency ratio 0.500 vs your input (faster)"


# ---------------------------------------------------------------- built with onnxruntime's quantizers


def test_mixed_build_quantizes_each_region_its_way() -> None:
    raw = conv_matmul()
    prepared = prepare(raw)
    x = _calls(24, 1)
    calib = CallData({"X": x[:8]})
    nodes = [(n.name, n.op_type) for n in onnx.load_from_string(raw).graph.node]
    ref = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])
    for recipe in mixed_recipes(nodes, prepared.op_types):
        data = build_candidate(prepared, recipe, calib)
        model = onnx.load_from_string(data)
        ops = {n.op_type for n in model.graph.node}
        assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, recipe.name
        assert ("QLinearConv" in ops) == (recipe.regions[0].recipe.format == "QOperator"), recipe.name
        cov = op_coverage(model)
        assert len(cov.quantized) == 5 and not cov.float, recipe.name
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        for i in range(8, 24):
            a, b = ref.run(None, {"X": x[i]})[0].ravel(), sess.run(None, {"X": x[i]})[0].ravel()
            assert float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))) > 0.99, recipe.name
    # Sensitive nodes kept in float stay float in both passes.
    excl = keep_float(mixed_recipes(nodes, prepared.op_types)[0], ["conv1", "fc1"])
    cov = op_coverage(onnx.load_from_string(build_candidate(prepared, excl, calib)))
    assert sorted(cov.float) == ["conv1", "fc1"] and len(cov.quantized) == 3


# ---------------------------------------------------------------- the search

# Static INT8 requantizes the MatMuls' large activations, dynamic INT8 does not; static convolutions are cheap.
RECOGNIZER_COSTS = {"float": 1.0, "static_conv": 0.3, "static_matmul": 0.6, "dynamic": 0.3}


def test_mixed_chosen_when_measured_faster_than_every_single_recipe(
    tmp_path: Path, keeps_bytes: type[_KeepsBytes]
) -> None:
    raw = conv_matmul()
    x = _calls(64, 2)
    calib, ev = CallData({"X": x[:16]}), CallData({"X": x[16:]})
    out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
    lines: list[str] = []
    report = optimize(
        raw, calib, ev, out, metric="cosine", time_budget_s=120, report_path=rep, max_fallback_iterations=2,
        compare_latency=cost_compare(float_macs(raw), RECOGNIZER_COSTS), progress=lambda what, _f: lines.append(what),
    )  # fmt: skip
    _check_promise(report, out, raw)
    chosen = report.chosen
    assert chosen.recipe.kind == "mixed", report.reason
    assert chosen.latency is not None and chosen.latency.median_ratio is not None
    singles = [c for c in report.candidates if c.status == "qualified" and c.recipe.kind != "mixed"]
    assert singles, "some single recipe qualifies too: the mixed one wins on speed, not by default"
    for c in singles:
        assert c.latency is not None and c.latency.median_ratio is not None
        assert chosen.latency.median_ratio < c.latency.median_ratio, c.name
    # The report says which nodes got which recipe.
    doc = json.loads(rep.read_text())
    regions = doc["chosen"]["recipe"]["regions"]
    assert [r["nodes"] for r in regions] == [["conv1", "conv2"], ["fc1", "fc2", "fc3"]]
    assert [r["recipe"]["kind"] for r in regions] == ["static", "dynamic"]
    assert OptimizeReport.model_validate(doc).chosen.name == chosen.name
    # One progress line per candidate evaluated, the chosen one's with its latency.
    outcome = [w for w in lines if isinstance(w, CandidateLine)]
    evaluated = [c for c in report.candidates if c.metrics is not None and c.recipe.kind != "input"]
    assert len({w.split(" · ")[0] for w in outcome}) >= len({c.name for c in evaluated})
    assert any(w.startswith(chosen.name + " · ") and "latency ratio" in w for w in outcome)


def test_mixed_real_ab_never_slower(tmp_path: Path) -> None:
    """The default paired A/B decides: whatever it says on this machine, the output is never slower and never out
    of tolerance (the speed figure itself belongs in benchmarks/)."""
    raw = conv_matmul()
    x = _calls(40, 3)
    calib, ev = CallData({"X": x[:8]}), CallData({"X": x[8:]})
    prepared = prepare(raw)
    nodes = [(n.name, n.op_type) for n in prepared.model.graph.node]
    recipes = [*mixed_recipes(nodes, prepared.op_types)[:1], Recipe(kind="dynamic", op_types=("MatMul",))]
    out = tmp_path / "out.onnx"
    report = optimize(
        raw, calib, ev, out, metric="cosine", recipes=recipes, time_budget_s=40, max_fallback_iterations=1,
        latency_budget_s=2.0,
    )  # fmt: skip
    _check_promise(report, out, raw)
    mixed = next(c for c in report.candidates if c.recipe.kind == "mixed")
    assert mixed.within_tolerance and mixed.latency is not None  # evaluated and timed against the input


def test_search_continues_after_the_first_qualified(
    tmp_path: Path, digits: examples.Digits, keeps_bytes: type[_KeepsBytes]
) -> None:
    """A dynamic recipe with the outlier layer in float qualifies first (ratio ~0.8); static INT8 breaks accuracy,
    and the search does not stop there: keeping the outlier layer in float rescues it, measured faster still."""
    raw = outlier_mlp(digits)
    calib = CallData({"X": with_outlier(digits.x_train[:64])[:, None]})
    ev = CallData({"X": with_outlier(digits.x_test[:200], 1)[:, None]}, labels=digits.y_test[:200])
    slow_first = Recipe(kind="dynamic", op_types=("MatMul", "Gemm"), nodes_to_exclude=("dense0",))
    static = Recipe(kind="static", op_types=("Gemm", "Relu"))
    costs = {"float": 1.0, "static_conv": 0.3, "static_matmul": 0.3, "dynamic": 0.8}
    out = tmp_path / "out.onnx"
    report = optimize(
        raw, calib, ev, out, recipes=[slow_first, static], time_budget_s=120, max_fallback_iterations=4,
        compare_latency=cost_compare(float_macs(raw), costs),
    )  # fmt: skip
    _check_promise(report, out, raw)
    first = next(c for c in report.candidates if c.recipe == slow_first)
    assert first.status == "qualified", first.reason  # it passed, and was not the end of the search
    chosen = report.chosen
    assert chosen.derived_from == static.name and chosen.nodes_excluded == ["dense0"]
    assert first.latency is not None and chosen.latency is not None
    assert first.latency.median_ratio is not None and chosen.latency.median_ratio is not None
    assert chosen.latency.median_ratio < first.latency.median_ratio


def test_screening_spares_the_far_out_candidate_the_full_set(tmp_path: Path, keeps_bytes: type[_KeepsBytes]) -> None:
    raw = outlier_weight()
    x = np.random.default_rng(4).standard_normal((80, 1, 32)).astype(np.float32)
    calib, ev = CallData({"X": x[:16]}), CallData({"X": x[16:]})
    per_tensor = Recipe(kind="dynamic", op_types=("MatMul",))
    per_channel = Recipe(kind="dynamic", op_types=("MatMul",), per_channel=True)
    out = tmp_path / "out.onnx"
    report = optimize(
        raw, calib, ev, out, recipes=[per_tensor, per_channel], max_accuracy_drop=0.05, time_budget_s=60,
        max_fallback_iterations=1, compare_latency=cost_compare(float_macs(raw), RECOGNIZER_COSTS),
    )  # fmt: skip
    _check_promise(report, out, raw)
    prepared = prepare(raw)
    sha = {r: hashlib.sha256(build_candidate(prepared, r, calib)).hexdigest() for r in (per_tensor, per_channel)}
    far = next(c for c in report.candidates if c.recipe == per_tensor)
    near = next(c for c in report.candidates if c.recipe == per_channel)
    screen = screen_indices(len(ev))
    assert screen is not None and len(screen) == 16
    # The far one ran on the 16 screening calls only; the near one on all 64 (screening calls reused).
    assert far.status == "out_of_tolerance" and far.reason.startswith("screened out") and far.eval_calls == 16
    assert keeps_bytes.runs[sha[per_tensor]] == 16
    assert near.within_tolerance and near.eval_calls == 64
    assert keeps_bytes.runs[sha[per_channel]] == 64
