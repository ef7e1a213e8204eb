"""Mixed recipes: different regions of one model quantized differently.

Pure: no ONNX, no sessions. Single recipes quantize every compute op the same way, yet the fast kernel differs by
op type: on a CTC text recognizer static QOperator per-channel on the convolution stages plus dynamic INT8 on the
MatMuls measured a latency ratio of about 0.73 where every single recipe failed (static MatMul requantized large
activations; dynamic Conv is ConvInteger, the slow one). A mixed recipe splits the compute nodes by op type into a
static region (convolutions) and a dynamic region (MatMul/Gemm and the recurrent/attention ops the dynamic
quantizer handles); every other node stays float, and so do the nodes the fallback search found most sensitive
(:func:`keep_float`). The quantizer passes run one per region on disjoint node sets
(:func:`edgefleet.optimize.quantize.build_candidate`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from edgefleet.optimize.candidates import (
    CONV_OPS,
    DYNAMIC_RNN_OPS,
    PASS_THROUGH_OPS,
    STATIC_MATMUL_OPS,
    Recipe,
    Region,
)
from edgefleet.optimize.report import NodeSensitivity

__all__ = ["describe", "keep_float", "mixed_recipes", "most_sensitive", "split_regions", "with_mixed"]

# Static variants for the convolution region, most promising first: the recognizer's winner leads.
_STATIC_VARIANTS: tuple[tuple[Literal["QDQ", "QOperator"], bool], ...] = (
    ("QOperator", True),
    ("QDQ", True),
    ("QDQ", False),
    ("QOperator", False),
)
_DYNAMIC_OPS = (*STATIC_MATMUL_OPS, *DYNAMIC_RNN_OPS)


def split_regions(nodes: Sequence[tuple[str, str]]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(convolution nodes, dynamic-quantizable nodes) of ``nodes`` — ``(name, op_type)`` of the float model's
    compute nodes in graph order; other compute ops (Einsum) belong to neither and stay float."""
    conv = tuple(n for n, op in nodes if op in CONV_OPS)
    dyn = tuple(n for n, op in nodes if op in _DYNAMIC_OPS)
    return conv, dyn


def mixed_recipes(nodes: Sequence[tuple[str, str]], model_ops: Iterable[str]) -> list[Recipe]:
    """Mixed recipes for a model with compute ``nodes`` (``(name, op_type)``) and op types ``model_ops``: static INT8
    (U8S8, minmax) on the convolutions in each format and granularity, dynamic INT8 per-tensor on the rest. None
    when the model lacks either region (a single recipe covers it)."""
    ops = set(model_ops)
    conv, dyn = split_regions(nodes)
    if not conv or not dyn:
        return []
    static_ops = tuple(o for o in (*CONV_OPS, *PASS_THROUGH_OPS) if o in ops)
    dyn_ops = tuple(o for o in _DYNAMIC_OPS if o in ops)
    if "Gemm" in dyn_ops and "MatMul" not in dyn_ops:
        dyn_ops = ("MatMul", *dyn_ops)  # the dynamic quantizer rewrites Gemm as MatMul + Add first
    dynamic = Region(recipe=Recipe(kind="dynamic", op_types=dyn_ops), nodes=dyn)
    out: list[Recipe] = []
    for fmt, per_channel in _STATIC_VARIANTS:
        static = Recipe(kind="static", format=fmt, per_channel=per_channel, op_types=static_ops)
        out.append(Recipe(kind="mixed", regions=(Region(recipe=static, nodes=conv), dynamic)))
    return out


def with_mixed(space: Sequence[Recipe], mixed: Sequence[Recipe], after: int = 2) -> list[Recipe]:
    """``space`` with ``mixed`` placed after its first ``after`` static recipes (the fast path stays first; the
    mixed ones come before the long tail of calibration and format variants the time budget may cut off)."""
    out = list(space)
    statics = [i for i, r in enumerate(out) if r.kind == "static"]
    at = statics[after - 1] + 1 if len(statics) >= after > 0 else len(out)
    fresh = [m for m in mixed if m not in out]
    return out[:at] + fresh + out[at:]


def most_sensitive(ranking: Sequence[NodeSensitivity], n: int) -> list[str]:
    """The ``n`` nodes a fallback ranking calls most sensitive: largest leave-one-out gain first (measured on the
    task metric), then lowest SQNR; nodes with neither measure come last, in ranking order."""
    scored = [s for s in ranking if s.loo_gain is not None or s.sqnr_db is not None]

    def key(s: NodeSensitivity) -> tuple[float, float]:
        gain = -s.loo_gain if s.loo_gain is not None else float("inf")
        return gain, s.sqnr_db if s.sqnr_db is not None else float("inf")

    ordered = sorted(scored, key=key) + [s for s in ranking if s not in scored]
    return [s.node for s in ordered[: max(n, 0)]]


def keep_float(recipe: Recipe, sensitive: Sequence[str]) -> Recipe:
    """``recipe`` with those of ``sensitive`` that it quantizes kept in float (a mixed recipe: nodes of its
    regions); unchanged when it quantizes none of them."""
    if recipe.kind != "mixed":
        return recipe.excluding(sensitive)
    covered = {n for r in recipe.regions for n in r.nodes}
    mine = [n for n in sensitive if n in covered and n not in recipe.nodes_to_exclude]
    return recipe.excluding(mine) if mine else recipe


def describe(recipe: Recipe) -> list[str]:
    """One line per region for people: which nodes got which recipe, and which stayed float."""
    lines = []
    for r in recipe.regions:
        kept = [n for n in r.nodes if n not in recipe.nodes_to_exclude]
        lines.append(f"{r.recipe.name}: {', '.join(kept) or '(none)'}")
    if recipe.nodes_to_exclude:
        lines.append(f"float: {', '.join(recipe.nodes_to_exclude)}")
    return lines
