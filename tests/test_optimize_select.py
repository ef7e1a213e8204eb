"""Pure decision logic of the optimizer: pruning rules, tolerance, metrics, the default metric and selection
against the input model (no sessions)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest

from edgefleet import examples
from edgefleet.bench.tiers import get_tier
from edgefleet.data import CallData
from edgefleet.errors import UsageError
from edgefleet.optimize._models import tiny_encoder
from edgefleet.optimize.candidates import Kind, Recipe, prune, recipe_space
from edgefleet.optimize.default_metric import MAX_UNNAMED_CLASSES, OutputFacts, default_metric, output_facts
from edgefleet.optimize.evaluate import MetricValues, decisions, fidelity, metric_values, within_tolerance
from edgefleet.optimize.report import CandidateReport, LatencyResult
from edgefleet.optimize.select import KEPT_INPUT, classify, select, why_none

AVX2 = get_tier("x86-avx2")
VNNI = get_tier("x86-vnni")


def _cand(
    name: str, ratio: float | None, verdict: str, within: bool | None = True, kind: Kind = "static", **kw: object
) -> CandidateReport:
    lat = None
    if ratio is not None:
        lat = LatencyResult(
            median_ratio=ratio, ci_low=ratio - 0.02, ci_high=ratio + 0.02, verdict=verdict, n_pairs=300, reason="r"
        )
    recipe = Recipe(kind=kind, calibration="entropy" if name == "b" else "minmax", per_channel=name == "c")
    return CandidateReport(name=name, recipe=recipe, status="qualified", within_tolerance=within, latency=lat, **kw)


def test_select_fastest_qualified() -> None:
    cands = [_cand("a", 0.8, "faster"), _cand("b", 0.7, "faster"), _cand("c", 0.6, "same")]
    assert select(cands) == 1


def test_select_ignores_out_of_tolerance_slower_and_unconfirmed() -> None:
    out = _cand("a", 0.5, "faster", within=False)
    slow = _cand("b", 1.5, "slower")
    unconfirmed = _cand("c", 0.6, "faster")
    assert unconfirmed.latency is not None
    unconfirmed.latency.confirmed = False
    cands = [out, slow, unconfirmed]
    assert select(cands) is None
    assert [classify(c)[0] for c in cands] == ["out_of_tolerance", "slower", "not_faster"]
    assert "1 out of tolerance, 1 slower, 1 not faster" in why_none(cands)


def test_prepared_float_competes_like_any_candidate() -> None:
    """Ratios are against the input: the prepared float model wins only when measured faster, and loses to a
    faster quantized candidate."""
    float_fast = _cand("float", 0.9, "faster", kind="float")
    assert select([float_fast, _cand("a", 0.95, "faster")]) == 0
    assert select([float_fast, _cand("a", 0.8, "faster")]) == 1
    float_same = _cand("float", 0.99, "same", kind="float")
    float_slow = _cand("float", 1.09, "slower", kind="float")  # preparation made the model slower
    assert select([float_same]) is None and select([float_slow]) is None
    assert select([float_slow, _cand("a", 0.8, "faster")]) == 1


def test_input_never_qualifies_and_keeping_it_is_explained() -> None:
    the_input = _cand(
        "input",
        0.5,
        "faster",
        kind="input",
    )
    the_input.status = "baseline"
    cands = [_cand("float", 1.09, "slower", kind="float"), _cand("a", 0.6, "faster", within=False)]
    assert select([the_input, *cands]) is None
    reason = why_none([the_input, *cands])
    assert reason.startswith(KEPT_INPUT) and "1 out of tolerance, 1 slower" in reason
    assert why_none([]).startswith(KEPT_INPUT)


def test_unmeasured_candidate_is_never_chosen() -> None:
    c = _cand("a", None, "faster")
    assert select([c]) is None
    assert classify(c)[0] == "skipped"


def test_recipe_space_static_first_and_no_conv_recipes_for_mlp() -> None:
    space = recipe_space({"Gemm", "Relu"}, AVX2)
    assert space[0].kind == "static" and space[0].format == "QDQ" and space[0].weight_type == "int8"
    assert not any(r.op_types and "Conv" in r.op_types for r in space)
    assert any(r.kind == "dynamic" for r in space)


def test_prune_rules_per_isa() -> None:
    space = recipe_space({"Conv", "Gemm"}, AVX2)
    _, pruned = prune(space, AVX2, {"Conv", "Gemm"})
    reasons = {p.recipe.name: p.reason for p in pruned}
    assert any("ConvInteger" in r for r in reasons.values())
    assert any("QOperator" in r and "VNNI" in r for r in reasons.values())
    assert any("FP16" in r for r in reasons.values())  # capability, not a speed rule
    # VNNI keeps S8S8 QOperator; rules off keeps every speed rule off but the FP16 capability stays.
    _, pruned_vnni = prune(space, VNNI, {"Conv", "Gemm"})
    assert not any("VNNI" in p.reason for p in pruned_vnni)
    kept_all, pruned_off = prune(space, AVX2, {"Conv", "Gemm"}, rules=False)
    assert [p.recipe.kind for p in pruned_off] == ["fp16"]
    assert any(r.kind == "dynamic" and r.op_types and "Conv" in r.op_types for r in kept_all)


def test_recipe_names_are_unique() -> None:
    space = recipe_space({"Conv", "MatMul", "LSTM"}, VNNI)
    names = [r.name for r in space]
    assert len(names) == len(set(names))
    assert Recipe(kind="static").excluding(["b", "a"]).nodes_to_exclude == ("a", "b")


def test_decisions_argmax_and_threshold() -> None:
    assert decisions(np.array([[[0.1, 0.9]], [[0.8, 0.2]]])).tolist() == [[1], [0]]
    assert decisions(np.array([[[0.7]], [[0.2]]])).tolist() == [[1], [0]]


def test_metrics_overall_and_per_slice() -> None:
    ref = np.array([[[0.9, 0.1]], [[0.2, 0.8]], [[0.6, 0.4]], [[0.3, 0.7]]])
    out = ref.copy()
    out[2] = [[0.4, 0.6]]  # one flip, in class 0
    data = CallData({"x": np.zeros((4, 1))}, labels=np.array([0, 1, 0, 1]))
    base = metric_values("top1", ref, ref, data)
    cand = metric_values("top1", ref, out, data)
    assert base.overall == 1.0 and cand.overall == 0.75
    assert cand.per_slice == {"0": 0.5, "1": 1.0}
    assert cand.fidelity is not None and cand.fidelity.flip_rate == 0.25
    ok, why = within_tolerance(base, cand, 0.3)
    assert ok
    ok, why = within_tolerance(base, cand, 0.3, max_slice_drop=0.2)
    assert not ok and "slice '0'" in why
    ok, why = within_tolerance(base, cand, 0.1)
    assert not ok and "drops 0.2500" in why


def test_label_free_metrics() -> None:
    ref = np.linspace(0.1, 1.0, 20).reshape(20, 1, 1)
    same = metric_values("sqnr", ref, ref, CallData({"x": np.zeros((20, 1))}))
    assert same.overall == 1.0
    noisy = ref + 0.01
    f = fidelity(ref, noisy)
    assert f.sqnr_db == pytest.approx(10 * np.log10(np.sum(ref**2) / np.sum(0.01**2 * np.ones(20))))
    assert f.max_abs_error == pytest.approx(0.01)
    cos = metric_values("cosine", ref, noisy, CallData({"x": np.zeros((20, 1))}))
    assert 0.99 < cos.overall < 1.0
    assert fidelity(ref, ref).sqnr_db == 200.0


def test_metric_values_model_is_json() -> None:
    m = MetricValues(metric="top1", overall=0.9, per_slice={"a": 0.8})
    assert m.worst_slice == ("a", 0.8)
    assert MetricValues.model_validate_json(m.model_dump_json()) == m


def _facts(name: str, shape: tuple[int, ...], **kw: Any) -> OutputFacts:
    return OutputFacts(name=name, call_shape=shape, **kw)


@pytest.mark.parametrize(
    "facts",
    [
        _facts("out", (1, 1000), producer="Softmax"),
        _facts("y", (1, 5, 1000), consumers=frozenset({"ArgMax"})),
        _facts("output", (1, 512), model_has_int_output=True),
        _facts("logits", (1, 30522)),
        _facts("probabilities", (1, 10)),
        _facts("191", (1, MAX_UNNAMED_CLASSES)),
        _facts("output", (1, 1), producer="Sigmoid"),
        _facts("speech_prob", (1, 1)),
    ],
    ids=lambda f: f"{f.name}{list(f.call_shape)}",
)
def test_class_axis_gives_the_decision_metrics(facts: OutputFacts) -> None:
    assert default_metric(facts, has_labels=False) == "agreement"
    assert default_metric(facts, has_labels=True) == "top1"


@pytest.mark.parametrize(
    "facts",
    [
        _facts("last_hidden_state", (1, 128, 384)),
        _facts("sentence_embedding", (1, 384)),
        _facts("output", (1, MAX_UNNAMED_CLASSES + 1)),
        _facts("pooled", (1, 32)),
        _facts("output", (1, 1)),
        _facts("output", (1, 16, 16)),
    ],
    ids=lambda f: f"{f.name}{list(f.call_shape)}",
)
def test_no_class_axis_asks_for_a_metric(facts: OutputFacts) -> None:
    with pytest.raises(UsageError) as err:
        default_metric(facts, has_labels=True)
    msg = str(err.value)
    assert "\n" not in msg and facts.name in msg and "--metric top1|agreement|cosine|sqnr" in msg


def test_output_facts_read_the_graph() -> None:
    sk = onnx.load_from_string(examples.train_digits_mlp(hidden=(8,)))
    f = output_facts(sk, "probabilities", (1, 10))
    assert f.producer == "Softmax" and "ArgMax" in f.consumers and f.model_has_int_output  # through its Identity
    enc = output_facts(onnx.load_from_string(tiny_encoder()), "last_hidden_state", (1, 8, 32))
    assert enc.producer == "LayerNormalization" and not enc.consumers and not enc.model_has_int_output
    with pytest.raises(UsageError, match="has no class axis"):
        default_metric(enc, has_labels=False)
