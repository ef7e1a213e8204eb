"""Accuracy-aware fallback: keep the culprit nodes of an out-of-tolerance candidate in float.

Sensitivity comes from two sources because either alone misleads: ``qdq_loss_debug``'s per-tensor SQNR is cheap but
did not single out the layer that cost 1.8 accuracy points on a real model; leave-one-out exclusion (re-quantize
with one node in float, re-evaluate) did (measured). SQNR orders the leave-one-out trials, so the likeliest
culprits are tried first when the iteration or time budget cannot cover every node; then nodes are excluded
greedily by leave-one-out gain until the candidate is within tolerance. The best candidate so far is always kept.
Before any of that, with the float model's per-node times, the heaviest nodes alone are tried quantized: where
noise from any node flips the metric, no node is the culprit, but the heavy ones hold the speed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.data import CallData
from edgefleet.optimize.candidates import Recipe
from edgefleet.optimize.costs import heaviest_first
from edgefleet.optimize.prepare import COMPUTE_OPS, PreparedModel, compute_nodes
from edgefleet.optimize.quantize import CallDataReader
from edgefleet.optimize.report import CandidateReport, NodeSensitivity

__all__ = ["HEAVY_SHARES", "FallbackResult", "NodeNoise", "search", "sqnr_by_node", "sqnr_twin"]

log = logging.getLogger(__name__)

Evaluate = Callable[[Recipe], CandidateReport]

# An input the quantized model sees exactly (a graph input) counts as this clean: float32's own SQNR is ~150 dB,
# but a first layer's noise should rank like any other layer's, not above every one of them.
_CLEAN_DB = 60.0
# Shares of the quantized nodes' float time the heaviest-first phase quantizes, largest (fastest) first.
HEAVY_SHARES = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


@dataclass
class FallbackResult:
    best: CandidateReport | None
    tried: list[CandidateReport] = field(default_factory=list)
    ranking: list[NodeSensitivity] = field(default_factory=list)
    reason: str = ""


@dataclass(frozen=True)
class NodeNoise:
    out_db: float  # SQNR of the node's output in the QDQ model against the float model's
    added_db: float  # how much lower that is than its input's SQNR: the noise this node adds, not what it inherits


def sqnr_by_node(prepared: PreparedModel, qdq_bytes: bytes, data: CallData) -> dict[str, NodeNoise]:
    """Per compute node: SQNR (dB) of its output (and of its first input) in the QDQ model against the float
    model on ``data``.

    A compute node keeps its output's name in the QDQ model (the Q/DQ pair follows it), so each node is compared
    with itself across the two models. ``create_activation_matching`` pairs only tensors that a Q/DQ pair both
    precedes and feeds into a saved op: on PP-OCRv4's recognizer (Conv → HardSwish as Add/Clip/Mul/Div) that left
    3 of its 38 convolutions scored (measured), and the culprit unranked. Error accumulates along the graph, so
    the output's SQNR alone ranks late nodes first whatever they add; ``added_db`` ranks by the node's own part."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_signal_to_quantization_noice_ratio,
        modify_model_output_intermediate_tensors,
    )

    names = [i.name for i in prepared.model.graph.input]
    ops = sorted(COMPUTE_OPS)
    with tempfile.TemporaryDirectory(prefix="edgefleet-fb-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        fp, qp = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
        fp.write_bytes(prepared.data)
        qp.write_bytes(qdq_bytes)
        fa, qa = Path(tmp) / "float_aug.onnx", Path(tmp) / "qdq_aug.onnx"
        modify_model_output_intermediate_tensors(fp, fa, op_types_for_saving=ops)
        modify_model_output_intermediate_tensors(qp, qa, op_types_for_saving=ops)
        float_acts = collect_activations(str(fa), CallDataReader(data, names))
        qdq_acts = collect_activations(str(qa), CallDataReader(data, names))

    def db(tensor: str, *qdq_names: str) -> float | None:
        f = float_acts.get(tensor)
        q = next((qdq_acts[n] for n in qdq_names if n in qdq_acts), None)
        if f is None or q is None:
            return None
        value = float(compute_signal_to_quantization_noice_ratio(f, q))
        return value if not math.isnan(value) else None

    out: dict[str, NodeNoise] = {}
    for node in compute_nodes(prepared.model):
        tensor = node.output[0] if node.output else ""
        out_db = db(tensor, tensor)
        if out_db is None or not math.isfinite(out_db):
            continue
        source = node.input[0] if node.input else ""
        # the quantized model feeds the node its input's dequantized copy; a graph input is exact
        in_db = db(source, f"{source}_DequantizeLinear_Output", source)
        added = (in_db if in_db is not None and math.isfinite(in_db) else _CLEAN_DB) - out_db
        out[node.name] = NodeNoise(out_db, added)
    return out


def sqnr_twin(recipe: Recipe) -> Recipe | None:
    """The static QDQ recipe whose per-node SQNR ranks ``recipe``'s nodes: the recipe itself when it is static
    QDQ; the same static settings in the QDQ format for static QOperator and for a mixed recipe's static region
    (QOperator graphs hide the quantized tensors ``qdq_loss_debug`` matches, and the culprits of a mixed recipe
    measured so far sat in its convolutions); None for dynamic recipes, which have no static counterpart."""
    if recipe.kind == "static":
        return recipe if recipe.format == "QDQ" else recipe.model_copy(update={"format": "QDQ"})
    if recipe.kind == "mixed":
        for region in recipe.regions:
            if region.recipe.kind == "static":
                return region.recipe.model_copy(
                    update={"format": "QDQ", "nodes_to_exclude": tuple(recipe.nodes_to_exclude)}
                )
    return None


def _original_names(prepared: PreparedModel, names: list[str]) -> list[str]:
    """Map a candidate's quantized node names back to the float model's (QOperator and dynamic quantizers add
    suffixes such as ``_quant``); ``nodes_to_exclude`` matches the float model's names."""
    originals = [n.name for n in compute_nodes(prepared.model)]
    out: list[str] = []
    for name in names:
        match = name if name in originals else max((o for o in originals if name.startswith(o)), key=len, default="")
        if match and match not in out:
            out.append(match)
    return out


def _score(c: CandidateReport) -> float:
    return c.metrics.overall if c.metrics is not None and math.isfinite(c.metrics.overall) else -math.inf


def _better(
    a: CandidateReport | None, b: CandidateReport, float_cost: Callable[[CandidateReport], float] | None = None
) -> bool:
    """Is ``b`` a better 'best so far' than ``a``: within tolerance beats not; then less float time kept (with
    ``float_cost``), fewer float nodes; then score."""
    if a is None:
        return True
    if bool(b.within_tolerance) != bool(a.within_tolerance):
        return bool(b.within_tolerance)
    if b.within_tolerance:
        cost = float_cost or (lambda _c: 0.0)
        return (cost(b), len(b.nodes_excluded), -_score(b)) < (cost(a), len(a.nodes_excluded), -_score(a))
    return _score(b) > _score(a)


def _needed(
    fixed: list[str], nodes: list[str], trial: Callable[[list[str]], bool], spent: Callable[[], bool]
) -> list[str]:
    """The nodes of ``nodes`` that must stay in float with ``fixed`` (binary splitting): given that keeping
    ``fixed + nodes`` in float is within tolerance and ``fixed`` alone is not, quantize half of ``nodes`` again; a
    half that may be quantized is dropped, one that may not is searched the same way. c culprits among n nodes cost
    about 2·c·log2(n) trials. When the trials run out, every node still in question stays in float, so the result
    is always within tolerance."""
    if len(nodes) <= 1 or spent():
        return nodes
    half = len(nodes) // 2
    a, b = nodes[:half], nodes[half:]
    if trial(fixed + b):
        return _needed(fixed, b, trial, spent)
    in_a = _needed(fixed + b, a, trial, spent)
    if spent():
        return in_a + b
    if trial(fixed + in_a):
        return in_a
    return in_a + _needed(fixed + in_a, b, trial, spent)


def search(
    prepared: PreparedModel,
    start: CandidateReport,
    candidate_bytes: bytes,
    evaluate: Evaluate,
    debug_data: CallData,
    *,
    max_iterations: int = 12,
    time_left: Callable[[], float],
    build: Callable[[Recipe], bytes] | None = None,
    costs: dict[str, float] | None = None,
) -> FallbackResult:
    """Find nodes to keep in float so ``start`` (an out-of-tolerance candidate) comes within tolerance.
    ``build`` makes a recipe's model bytes: with it, a start that is not static QDQ is ranked by its
    :func:`sqnr_twin`'s SQNR (without it, only a static QDQ start is). ``costs`` (each float node's time,
    :func:`edgefleet.optimize.costs.node_costs`) adds a first phase that quantizes only the heaviest nodes, and
    makes "best" mean least float time kept rather than fewest float nodes."""
    quantized = _original_names(prepared, start.op_coverage.quantized if start.op_coverage else [])
    if not quantized:
        return FallbackResult(None, reason="the candidate quantized no named compute node")
    result = FallbackResult(None)
    iterations = 0

    def float_cost(c: CandidateReport) -> float:
        return sum((costs or {}).get(n, 0.0) for n in c.nodes_excluded)

    def trial(excluded: list[str]) -> bool:
        nonlocal iterations
        t = evaluate(start.recipe.excluding(excluded))
        iterations += 1
        result.tried.append(t)
        if _better(result.best, t, float_cost if costs else None):
            result.best = t
        return bool(t.within_tolerance)

    def spent() -> bool:
        return iterations >= max_iterations or time_left() <= 0

    # 0. Heaviest first: quantize only the nodes that hold most of the time, the rest in float — the largest share
    #    first. Where the metric flips on tiny noise (a recognizer's blank/space frames), no single node is the
    #    culprit and keeping single nodes in float never restores tolerance, but a few heavy nodes quantized keep
    #    much of the speed (measured). A passing set goes straight to step 3, which quantizes again what need not
    #    stay float.
    passing: list[str] | None = None
    if costs:
        for heavy in heaviest_first(quantized, costs, HEAVY_SHARES):
            if spent():
                break
            if trial(excluded := [n for n in quantized if n not in heavy]):
                passing = excluded
                break
        iterations = 0  # that phase has its own few trials; max_iterations bounds the node search below
    noise: dict[str, NodeNoise] = {}
    gains: dict[str, float] = {}
    if passing is None and not spent():
        passing = _by_node(
            prepared, start, candidate_bytes, debug_data, build, quantized, noise, gains, trial, result.tried, spent,
            max_iterations,
        )  # fmt: skip
    # 3. Quantize again every node of that set that need not stay float, so its speed is won back.
    if passing is not None and len(passing) > 1:
        _needed([], passing, trial, spent)
    # Most noise added first; nodes the twin could not score go last in graph order.
    order = sorted(quantized, key=lambda n: (-noise[n].added_db if n in noise else math.inf, quantized.index(n)))
    result.ranking = [
        NodeSensitivity(node=n, sqnr_db=noise[n].out_db if n in noise else None, loo_gain=gains.get(n)) for n in order
    ]
    if result.best is None:
        result.reason = "no fallback trial fit in the time budget"
    elif result.best.within_tolerance:
        kept = result.best.nodes_excluded
        named = (
            ", ".join(kept) if len(kept) <= 6 else f"{len(kept)} of {len(quantized)} nodes ({', '.join(kept[:3])}, …)"
        )
        result.reason = f"keeping {named} in float restores tolerance"
    else:
        result.reason = f"no exclusion within {iterations} trial(s) restored tolerance"
    return result


def _by_node(
    prepared: PreparedModel,
    start: CandidateReport,
    candidate_bytes: bytes,
    debug_data: CallData,
    build: Callable[[Recipe], bytes] | None,
    quantized: list[str],
    noise: dict[str, NodeNoise],
    gains: dict[str, float],
    trial: Callable[[list[str]], bool],
    tried: list[CandidateReport],
    spent: Callable[[], bool],
    max_iterations: int,
) -> list[str] | None:
    """Steps 1 and 2 of :func:`search`: a set of nodes whose staying in float restores tolerance, found node by node
    (None: none within the trials). Fills ``noise`` (SQNR per node) and ``gains`` (leave-one-out) for the ranking."""
    twin = sqnr_twin(start.recipe)
    if twin is not None and (twin == start.recipe or build is not None):
        try:
            twin_bytes = candidate_bytes if twin == start.recipe or build is None else build(twin)
            noise.update({n: v for n, v in sqnr_by_node(prepared, twin_bytes, debug_data).items() if n in quantized})
        except Exception as err:  # a debugging aid: the leave-one-out trials still run without it
            log.debug("qdq_loss_debug failed: %s", err)
    # Most noise added first; nodes the twin could not score go last in graph order.
    order = sorted(quantized, key=lambda n: (-noise[n].added_db if n in noise else math.inf, quantized.index(n)))
    base_score = _score(start)

    # 1. Leave-one-out: over every node when they are few (up to half the trials: the gains rank them well);
    #    else on the likeliest culprits only, a quarter of the trials where SQNR ranked the nodes, two in graph
    #    order where nothing did — the search below reaches culprits anywhere in log2(n) trials, where leave-one-out
    #    over every node would cost one trial per node.
    few = len(order) <= max_iterations // 2
    loo = len(order) if few else (max(1, max_iterations // 4) if noise else 2)
    for node in order[:loo]:
        if spent():
            break
        ok = trial([node])
        gains[node] = _score(tried[-1]) - base_score
        if ok:
            return [node]
    # 2. Keep the highest-gain nodes, then the rest in order, in float — 2, 4, 8, … of them until within
    #    tolerance: culprits anywhere in the model are reached in log2(n) trials, not n.
    ranked = sorted(gains, key=lambda n: (-gains[n], order.index(n))) + [n for n in order if n not in gains]
    limit = len(ranked) - 1  # every node in float is the float model, not a candidate
    for _ in range(2):
        k = 2
        while not spent() and limit >= 2:
            size = min(k, limit)
            if trial(ranked[:size]):
                return ranked[:size]
            if size == limit:
                break
            k *= 2
        if limit < 2:
            break
        # No prefix held the last node, and all the others in float were not enough: it leads a second round.
        ranked = ranked[-1:] + ranked[:-1]
    return None
