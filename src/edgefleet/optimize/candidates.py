"""The recipe space and the rules that prune known-slow combinations per instruction set.

Pure: no ONNX, no sessions. Rules prune only combinations *measured* slow on a class of CPU (measured); anything
else is left to the paired latency measurement, because CPU flags alone do not predict onnxruntime's kernels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edgefleet.bench.tiers import TierProfile

__all__ = ["Kind", "Pruned", "Recipe", "Region", "prune", "recipe_space"]

# ``input`` is the user's model as given: the baseline of every comparison and the output when nothing beats it.
# It names a report entry, never a recipe to build. ``mixed`` quantizes disjoint node sets (its ``regions``) each
# with its own static or dynamic recipe (:mod:`edgefleet.optimize.mixed`).
Kind = Literal["input", "float", "fp16", "dynamic", "static", "mixed"]
QType = Literal["uint8", "int8"]
Calibration = Literal["minmax", "entropy", "percentile"]

# Op types the dynamic quantizer handles without ConvInteger (the slow one). It rewrites Gemm as MatMul + Add
# before quantizing, so a Gemm is only quantized when MatMul is listed too.
DYNAMIC_RNN_OPS = ("LSTM", "GRU", "Attention")
STATIC_MATMUL_OPS = ("MatMul", "Gemm")
CONV_OPS = ("Conv", "ConvTranspose")
# Ops the QDQ quantizer may wrap alongside compute ops so quantized tensors flow between compute nodes (onnxruntime
# fuses them into QLinear kernels; leaving Relu out made a 512-unit MLP *slower*). Arithmetic such as Add, Mul,
# Pow, Sqrt, Sigmoid stays float: QDQ there cost a VAD's STFT magnitude its range for no speed-up.
PASS_THROUGH_OPS = (
    "Relu",
    "Clip",
    "LeakyRelu",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Flatten",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Concat",
    "Split",
    "Pad",
)


class Recipe(BaseModel):
    """How to turn the float model into one candidate. ``name`` is derived, stable, and what tables print."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind
    format: Literal["QDQ", "QOperator"] = "QDQ"
    activation_type: QType = "uint8"
    weight_type: QType = "int8"
    per_channel: bool = False
    reduce_range: bool = False
    calibration: Calibration = "minmax"
    op_types: tuple[str, ...] | None = Field(None, description="op types to quantize; None = every supported type")
    nodes_to_exclude: tuple[str, ...] = ()
    regions: tuple[Region, ...] = Field((), description="mixed only: each region's nodes and the recipe they get")

    @property
    def name(self) -> str:
        if self.kind in ("input", "float", "fp16"):
            return self.kind
        if self.kind == "mixed":
            # Each part's own name (its op types included) keeps the name readable and stable across runs.
            inner = "; ".join(r.recipe.name for r in self.regions)
            return f"mixed[{inner}]" + (f"/excl{len(self.nodes_to_exclude)}" if self.nodes_to_exclude else "")
        sign = {"uint8": "U8", "int8": "S8"}
        if self.kind == "dynamic":
            parts = ["dynamic", f"{sign['uint8']}{sign[self.weight_type]}"]
        else:
            parts = [
                "static",
                self.format,
                f"{sign[self.activation_type]}{sign[self.weight_type]}",
                self.calibration,
            ]
        parts.append("per-channel" if self.per_channel else "per-tensor")
        if self.reduce_range:
            parts.append("reduce-range")
        if self.op_types is not None:
            # Only the compute ops name a recipe; pass-through ops follow them.
            parts.append("+".join(o for o in self.op_types if o not in PASS_THROUGH_OPS) or "+".join(self.op_types))
        if self.nodes_to_exclude:
            parts.append(f"excl{len(self.nodes_to_exclude)}")
        return "/".join(parts)

    def excluding(self, nodes: Iterable[str]) -> Recipe:
        return self.model_copy(update={"nodes_to_exclude": tuple(sorted(set(self.nodes_to_exclude) | set(nodes)))})


class Region(BaseModel):
    """One part of a mixed recipe: the float model's compute nodes ``nodes`` (of op types ``recipe.op_types``) are
    quantized by ``recipe`` (static or dynamic); the regions of a mixed recipe are disjoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    recipe: Recipe
    nodes: tuple[str, ...]


Recipe.model_rebuild()


@dataclass(frozen=True)
class Pruned:
    recipe: Recipe
    reason: str


def _present(ops: Sequence[str], model_ops: set[str]) -> tuple[str, ...]:
    return tuple(o for o in ops if o in model_ops)


def recipe_space(model_ops: set[str], tier: TierProfile) -> list[Recipe]:
    """Every candidate that applies to a model with ``model_ops``, most promising first (the time budget may end
    the search early, so order matters): static QDQ U8S8 is the fast path on x86 and ARM alike."""
    has_conv = bool(_present(CONV_OPS, model_ops))
    has_matmul = bool(_present(STATIC_MATMUL_OPS, model_ops))
    dyn_ops = (*(STATIC_MATMUL_OPS if has_matmul else ()), *_present(DYNAMIC_RNN_OPS, model_ops))
    # Static recipes quantize the compute ops only: QDQ around Pow/Sqrt/Sigmoid chains (a VAD's STFT magnitude,
    # say) costs their dynamic range for no speed-up.
    ops = _present((*CONV_OPS, *STATIC_MATMUL_OPS, *PASS_THROUGH_OPS), model_ops)
    static = [
        Recipe(kind="static", op_types=ops),
        Recipe(kind="static", op_types=ops, per_channel=True),
        Recipe(kind="static", op_types=ops, per_channel=True, reduce_range=True),
        Recipe(kind="static", op_types=ops, activation_type="uint8", weight_type="uint8"),
        Recipe(kind="static", op_types=ops, activation_type="int8", weight_type="int8"),
        Recipe(kind="static", op_types=ops, calibration="entropy"),
        Recipe(kind="static", op_types=ops, calibration="percentile"),
        Recipe(kind="static", op_types=ops, format="QOperator"),
        Recipe(kind="static", op_types=ops, format="QOperator", activation_type="int8", weight_type="int8"),
    ]
    out: list[Recipe] = []
    if has_conv or has_matmul:
        out.extend(static)
    if has_conv and has_matmul:
        out.append(Recipe(kind="static", op_types=_present((*STATIC_MATMUL_OPS, *PASS_THROUGH_OPS), model_ops)))
        out.append(Recipe(kind="static", op_types=_present((*CONV_OPS, *PASS_THROUGH_OPS), model_ops)))
    if dyn_ops:
        out.append(Recipe(kind="dynamic", op_types=dyn_ops))
        out.append(Recipe(kind="dynamic", op_types=dyn_ops, per_channel=True))
    if has_conv:
        out.append(Recipe(kind="dynamic", op_types=(*dyn_ops, *_present(CONV_OPS, model_ops))))
    out.append(Recipe(kind="fp16"))
    return out


def prune(
    recipes: Sequence[Recipe], tier: TierProfile, model_ops: set[str], *, rules: bool = True
) -> tuple[list[Recipe], list[Pruned]]:
    """Split ``recipes`` into (kept, pruned with the reason). ``rules=False`` keeps every speed rule off so
    measurement decides; a tier capability (FP16 arithmetic) is not a speed rule and always applies."""
    kept: list[Recipe] = []
    pruned: list[Pruned] = []
    for r in recipes:
        reason = _capability(r, tier) or (_slow_rule(r, tier, model_ops) if rules else None)
        if reason:
            pruned.append(Pruned(r, reason))
        else:
            kept.append(r)
    return kept, pruned


def _capability(r: Recipe, tier: TierProfile) -> str | None:
    if r.kind == "fp16" and not tier.supports_fp16:
        return f"tier {tier.name} has no native FP16 arithmetic; FP16 would only add casts"
    return None


def _slow_rule(r: Recipe, tier: TierProfile, model_ops: set[str]) -> str | None:
    if r.kind == "mixed":
        # a mixed recipe is as slow as its slowest part: the same rules, region by region
        return next((why for g in r.regions if (why := _slow_rule(g.recipe, tier, model_ops))), None)
    convs = set(CONV_OPS) & model_ops if r.op_types is None else set(CONV_OPS) & set(r.op_types) & model_ops
    if r.kind == "dynamic" and convs:
        return "dynamic Conv becomes ConvInteger, which onnxruntime's CPU kernels run 3–6x slower than float"
    if r.format == "QOperator" and r.activation_type == "int8" and not tier.has_vnni:
        return f"S8S8 in the QOperator format runs 5–13x slower than float on {tier.name} (no VNNI)"
    return None
