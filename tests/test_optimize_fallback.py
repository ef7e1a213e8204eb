"""The fallback search's decisions, with the evaluation injected: which nodes it keeps in float and how many trials
it spends. A model with many quantized nodes whose culprits sit anywhere must be rescued in logarithmically many
trials, and every node that can be quantized again is (the speed of a node kept in float is lost)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.data import CallData
from edgefleet.optimize.api import _Clock, _share
from edgefleet.optimize.candidates import Recipe
from edgefleet.optimize.costs import heaviest_first, node_costs
from edgefleet.optimize.evaluate import MetricValues
from edgefleet.optimize.fallback import _needed, search
from edgefleet.optimize.prepare import PreparedModel, compute_nodes, prepare
from edgefleet.optimize.report import CandidateReport, OpCoverage


def _chain(n: int) -> PreparedModel:
    """``n`` MatMuls in a row: n quantizable nodes in graph order."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"w{i}") for i in range(n)]
    nodes = [
        helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}"], name=f"mm{i}")
        for i in range(n)
    ]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info(f"h{n - 1}", TensorProto.FLOAT, [1, 8])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return prepare(model.SerializeToString())


class Oracle:
    """Within tolerance exactly when every culprit is kept in float; the score falls with each culprit quantized."""

    def __init__(self, culprits: set[str]) -> None:
        self.culprits = culprits
        self.trials: list[tuple[str, ...]] = []

    def __call__(self, recipe: Recipe) -> CandidateReport:
        self.trials.append(recipe.nodes_to_exclude)
        missed = len(self.culprits - set(recipe.nodes_to_exclude))
        return CandidateReport(
            name=recipe.name, recipe=recipe, status="out_of_tolerance" if missed else "qualified",
            metrics=MetricValues(metric="agreement", overall=1.0 - 0.05 * missed), within_tolerance=not missed,
            nodes_excluded=list(recipe.nodes_to_exclude),
        )  # fmt: skip


def _start(prepared: PreparedModel, oracle: Oracle) -> CandidateReport:
    recipe = Recipe(kind="dynamic", op_types=("MatMul",))
    start = oracle(recipe)
    start.op_coverage = OpCoverage(quantized=[n.name for n in compute_nodes(prepared.model)])
    return start


@pytest.mark.parametrize("culprits", [{"mm39"}, {"mm3", "mm30"}, {"mm0"}, {"mm17", "mm18", "mm19"}])
def test_culprits_anywhere_are_kept_in_float_and_nothing_else(culprits: set[str]) -> None:
    prepared = _chain(40)
    oracle = Oracle(culprits)
    start = _start(prepared, oracle)
    oracle.trials.clear()
    result = search(
        prepared, start, b"", oracle, CallData({"x": np.zeros((1, 1, 8), np.float32)}),
        max_iterations=40, time_left=lambda: math.inf,
    )  # fmt: skip
    assert result.best is not None and result.best.within_tolerance
    assert set(result.best.nodes_excluded) == culprits, "every node that can be quantized again is"
    # leave-one-out over all 40 nodes alone would cost 40 trials, greedily adding one at a time more still
    assert len(oracle.trials) <= 13 + 6 * len(culprits), len(oracle.trials)


def test_the_iteration_cap_is_kept_and_the_best_so_far_is_within_tolerance() -> None:
    prepared = _chain(40)
    oracle = Oracle({"mm5", "mm33"})
    start = _start(prepared, oracle)
    oracle.trials.clear()
    result = search(
        prepared, start, b"", oracle, CallData({"x": np.zeros((1, 1, 8), np.float32)}),
        max_iterations=10, time_left=lambda: math.inf,
    )  # fmt: skip
    assert len(oracle.trials) == 10
    assert result.best is not None and result.best.within_tolerance, "doubling reached a passing set in time"
    assert {"mm5", "mm33"} <= set(result.best.nodes_excluded)


def test_no_time_no_trial() -> None:
    prepared = _chain(6)
    oracle = Oracle({"mm2"})
    start = _start(prepared, oracle)
    oracle.trials.clear()
    result = search(
        prepared, start, b"", oracle, CallData({"x": np.zeros((1, 1, 8), np.float32)}),
        max_iterations=12, time_left=lambda: 0.0,
    )  # fmt: skip
    assert oracle.trials == [] and result.best is None
    assert result.reason == "no fallback trial fit in the time budget"


@pytest.mark.parametrize("culprits", [{"c"}, {"a", "h"}, {"b", "c"}, set("abcdefgh")])
def test_needed_keeps_exactly_the_culprits_and_every_trial_is_one_it_needs(culprits: set[str]) -> None:
    calls: list[list[str]] = []

    def trial(excluded: list[str]) -> bool:
        calls.append(excluded)
        return culprits <= set(excluded)

    assert set(_needed([], list("abcdefgh"), trial, lambda: False)) == culprits
    assert len(calls) <= 2 * len(culprits) * 3 + 1


def test_needed_stops_when_spent_and_keeps_what_is_in_question() -> None:
    calls: list[list[str]] = []

    def trial(excluded: list[str]) -> bool:
        calls.append(excluded)
        return "g" in excluded

    kept = _needed([], list("abcdefgh"), trial, lambda: len(calls) >= 1)
    assert len(calls) == 1
    assert "g" in kept and trial(kept), "what the trials could not clear stays in float: still within tolerance"


def test_a_few_nodes_are_each_left_out_once_and_never_all_at_once() -> None:
    """Silero VAD's case: six quantized nodes, four of them culprits. Leave-one-out over every node ranks them; no
    trial keeps every node in float (that is the float model, which a quantizer answers with "no op")."""
    prepared = _chain(6)
    culprits = {"mm0", "mm2", "mm3", "mm5"}
    oracle = Oracle(culprits)
    start = _start(prepared, oracle)
    oracle.trials.clear()
    result = search(
        prepared, start, b"", oracle, CallData({"x": np.zeros((1, 1, 8), np.float32)}),
        max_iterations=12, time_left=lambda: math.inf,
    )  # fmt: skip
    assert result.best is not None and set(result.best.nodes_excluded) == culprits
    assert oracle.trials[:6] == [(f"mm{i}",) for i in range(6)], "leave-one-out over all six first"
    assert all(len(t) < 6 for t in oracle.trials)


def test_the_sqnr_twin_of_each_recipe_kind() -> None:
    from edgefleet.optimize.candidates import Region
    from edgefleet.optimize.fallback import sqnr_twin

    qdq = Recipe(kind="static", per_channel=True, op_types=("Conv",))
    assert sqnr_twin(qdq) is qdq
    qop = Recipe(kind="static", format="QOperator", per_channel=True, op_types=("Conv",))
    assert sqnr_twin(qop) == qdq
    dynamic = Recipe(kind="dynamic", op_types=("MatMul",))
    assert sqnr_twin(dynamic) is None
    mixed = Recipe(
        kind="mixed",
        regions=(Region(recipe=qop, nodes=("c1", "c2")), Region(recipe=dynamic, nodes=("m1",))),
        nodes_to_exclude=("c2",),
    )
    assert sqnr_twin(mixed) == qdq.excluding(["c2"])
    assert sqnr_twin(Recipe(kind="mixed", regions=(Region(recipe=dynamic, nodes=("m1",)),))) is None


def _hardswish_chain(n: int, outlier: int) -> PreparedModel:
    """``n`` MatMuls, each followed by HardSwish spelled as Add/Clip/Mul/Div (as paddle2onnx writes it), so no Q/DQ
    pair sits between two compute nodes' saved tensors. Node ``outlier`` reads its input through a mask that
    zeroes feature 0 and has a weight row 0 of 50s: harmless in float, but per-tensor INT8 weights then round its
    other weights (~0.3) to a step of 0.4 — it adds the most noise, wherever it sits."""
    rng = np.random.default_rng(1)
    inits, nodes = [], []
    for c, v in (("three", 3.0), ("zero", 0.0), ("six", 6.0)):
        inits.append(numpy_helper.from_array(np.array(v, np.float32), c))
    inits.append(numpy_helper.from_array(np.array([0.0] + [1.0] * 15, np.float32), "mask"))
    src = "x"
    for i in range(n):
        w = rng.standard_normal((16, 16)).astype(np.float32) * 0.3
        if i == outlier:
            w[0, :] = 50.0
            nodes.append(helper.make_node("Mul", [src, "mask"], [f"masked{i}"], name=f"mask{i}"))
            src = f"masked{i}"
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [
            helper.make_node("MatMul", [src, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
            helper.make_node("Add", [f"m{i}", "three"], [f"a{i}"], name=f"add{i}"),
            helper.make_node("Clip", [f"a{i}", "zero", "six"], [f"c{i}"], name=f"clip{i}"),
            helper.make_node("Mul", [f"m{i}", f"c{i}"], [f"p{i}"], name=f"mul{i}"),
            helper.make_node("Div", [f"p{i}", "six"], [f"h{i}"], name=f"div{i}"),
        ]
        src = f"h{i}"
    graph = helper.make_graph(
        nodes, "hs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info(src, TensorProto.FLOAT, [1, 16])], inits,
    )  # fmt: skip
    return prepare(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())


@pytest.mark.parametrize("outlier", [2, 4])
def test_sqnr_scores_every_compute_node_and_ranks_the_one_that_adds_noise(outlier: int) -> None:
    from edgefleet.optimize.fallback import sqnr_by_node
    from edgefleet.optimize.quantize import build_candidate

    prepared = _hardswish_chain(6, outlier=outlier)
    data = CallData({"x": np.random.default_rng(2).standard_normal((32, 1, 16)).astype(np.float32)})
    qdq = build_candidate(prepared, Recipe(kind="static", op_types=("MatMul",)), data)
    noise = sqnr_by_node(prepared, qdq, data)
    assert set(noise) == {f"mm{i}" for i in range(6)}  # through the elementwise chains, every node is scored
    # later nodes inherit the outlier's noise: the last one's output SQNR is the lowest, but the outlier adds it
    assert max(noise, key=lambda n: noise[n].added_db) == f"mm{outlier}"
    assert min(noise, key=lambda n: noise[n].out_db) == "mm5"


class NoisyOracle(Oracle):
    """No culprit: the score falls with the quantized nodes' count, past ``allowed`` of them out of tolerance (a
    recognizer whose decode flips on tiny noise, wherever it comes from)."""

    def __init__(self, nodes: list[str], allowed: int) -> None:
        super().__init__(set())
        self.nodes, self.allowed = nodes, allowed

    def __call__(self, recipe: Recipe) -> CandidateReport:
        self.trials.append(recipe.nodes_to_exclude)
        quantized = len(set(self.nodes) - set(recipe.nodes_to_exclude))
        ok = quantized <= self.allowed
        return CandidateReport(
            name=recipe.name, recipe=recipe, status="qualified" if ok else "out_of_tolerance",
            metrics=MetricValues(metric="ctc", overall=1.0 - 0.002 * quantized), within_tolerance=ok,
            nodes_excluded=list(recipe.nodes_to_exclude),
        )  # fmt: skip


def test_heaviest_first_quantizes_the_nodes_that_hold_the_time() -> None:
    """Where no node is a culprit, the search keeps the cheap nodes in float and quantizes the heavy ones, largest
    share of the time first, and stops at the first set within tolerance."""
    prepared = _chain(10)
    names = [f"mm{i}" for i in range(10)]
    costs = {"mm3": 50.0, "mm7": 30.0, **{n: 20.0 / 8 for n in names if n not in ("mm3", "mm7")}}
    oracle = NoisyOracle(names, allowed=2)
    start = _start(prepared, oracle)
    oracle.trials.clear()
    result = search(
        prepared, start, b"", oracle, CallData({"x": np.zeros((1, 1, 8), np.float32)}),
        max_iterations=12, time_left=lambda: math.inf, costs=costs,
    )  # fmt: skip
    assert result.best is not None and result.best.within_tolerance
    assert set(names) - set(result.best.nodes_excluded) == {"mm3", "mm7"}
    quantized = [len(set(names) - set(t)) for t in oracle.trials]
    first_pass = quantized.index(2)
    assert quantized[: first_pass + 1] == sorted(quantized[: first_pass + 1], reverse=True), quantized
    assert all(q > 2 for q in quantized[first_pass + 1 :]), "then it only tries to quantize more of the float set"


def test_heaviest_first_that_fails_leaves_the_node_search_its_trials() -> None:
    prepared = _chain(8)
    names = [f"mm{i}" for i in range(8)]
    oracle = Oracle({"mm6"})
    start = _start(prepared, oracle)
    oracle.trials.clear()
    costs = {n: 1.0 for n in names} | {"mm6": 10.0}  # the culprit is the heavy node: no heavy-first set passes
    result = search(
        prepared, start, b"", oracle, CallData({"x": np.zeros((1, 1, 8), np.float32)}),
        max_iterations=12, time_left=lambda: math.inf, costs=costs,
    )  # fmt: skip
    assert result.best is not None and set(result.best.nodes_excluded) == {"mm6"}


def test_heaviest_first_sets() -> None:
    nodes = ["a", "b", "c", "d"]
    costs = {"a": 10.0, "b": 60.0, "c": 30.0}
    assert heaviest_first(nodes, costs, (0.5, 0.9)) == [["b", "c"], ["b"]]
    assert heaviest_first(nodes, costs, (1.0,)) == [["b", "c", "a"]], "d costs nothing: never worth quantizing alone"
    assert heaviest_first(nodes, {}, (0.5,)) == []


def test_node_costs_names_the_float_models_nodes() -> None:
    prepared = _chain(3)
    costs = node_costs(prepared.data, {"x": np.ones((1, 8), np.float32)}, runs=3)
    assert set(costs) == {"mm0", "mm1", "mm2"} and all(v >= 0 for v in costs.values())
    assert node_costs(b"not onnx", {}) == {}


def test_a_waiting_second_start_keeps_a_third_of_the_search_time() -> None:
    clock = _Clock(100.0)
    first = _share(clock, 10.0, second_start=True)
    last = _share(clock, 10.0, second_start=False)
    assert first() == pytest.approx(60.0, abs=1.0) and last() == pytest.approx(90.0, abs=1.0)
    clock.budget_s = 20.0  # the budget running out ends every share, whatever its deadline
    assert first() <= 10.0 and last() <= 10.0
