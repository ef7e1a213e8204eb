"""Declarative pre- and post-processing, run identically in evaluation, benchmark and on the device.

A manifest lists steps; each names the tensor it applies to (``tensor``; ``None`` means every tensor). Steps are
plain data so that a package carries them and every consumer runs the same code (training/serving parity).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgefleet.errors import ModelError

__all__ = ["Confidence", "Step", "apply_steps"]


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tensor: str | None = Field(None, description="tensor name the step applies to; null for all")


class Cast(_Step):
    op: Literal["cast"] = "cast"
    dtype: str


class Scale(_Step):
    """``x * mul + add``."""

    op: Literal["scale"] = "scale"
    mul: float = 1.0
    add: float = 0.0


class Normalize(_Step):
    """``(x - mean) / std`` broadcast along ``axis``."""

    op: Literal["normalize"] = "normalize"
    mean: list[float]
    std: list[float]
    axis: int = -1


class Clip(_Step):
    op: Literal["clip"] = "clip"
    min: float | None = None
    max: float | None = None


class Reshape(_Step):
    op: Literal["reshape"] = "reshape"
    shape: list[int]


class Transpose(_Step):
    op: Literal["transpose"] = "transpose"
    perm: list[int]


class Softmax(_Step):
    op: Literal["softmax"] = "softmax"
    axis: int = -1


class Argmax(_Step):
    """Adds ``{tensor}_argmax`` (int64) next to the tensor it reads."""

    op: Literal["argmax"] = "argmax"
    axis: int = -1


class Confidence(_Step):
    """Declares ``tensor`` (class probabilities along ``axis``) as the answer's confidence: a device routing by
    confidence (docs/agent.md, "Hybrid edge/cloud routing") sends an answer whose top-1 probability is below
    ``remote_below`` to its remote endpoint. Tensors pass through unchanged."""

    op: Literal["confidence"] = "confidence"
    tensor: str = Field(description="the tensor of class probabilities (after softmax)")
    remote_below: float = Field(gt=0, le=1, description="top-1 probability under which the answer goes remote")
    axis: int = -1


Step = Annotated[
    Cast | Scale | Normalize | Clip | Reshape | Transpose | Softmax | Argmax | Confidence,
    Field(discriminator="op"),
]


def _one(step: _Step, x: np.ndarray) -> np.ndarray:
    if isinstance(step, Cast):
        return x.astype(step.dtype)
    if isinstance(step, Scale):
        return (x * np.asarray(step.mul, dtype=x.dtype) + np.asarray(step.add, dtype=x.dtype)).astype(x.dtype)
    if isinstance(step, Normalize):
        shape = [1] * x.ndim
        if len(step.mean) > 1:
            shape[step.axis] = len(step.mean)
        mean = np.asarray(step.mean, dtype=x.dtype).reshape(shape)
        std = np.asarray(step.std, dtype=x.dtype).reshape(shape)
        return ((x - mean) / std).astype(x.dtype)
    if isinstance(step, Clip):
        return np.clip(x, step.min, step.max).astype(x.dtype)
    if isinstance(step, Reshape):
        return x.reshape(step.shape)
    if isinstance(step, Transpose):
        return np.transpose(x, step.perm)
    if isinstance(step, Softmax):
        e = np.exp(x - np.max(x, axis=step.axis, keepdims=True))
        return (e / np.sum(e, axis=step.axis, keepdims=True)).astype(x.dtype)
    raise ModelError(f"unknown processing step {step!r}")  # pragma: no cover - the union is closed


def apply_steps(steps: Sequence[_Step], tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Apply ``steps`` in order to a copy of ``tensors``; raise :class:`ModelError` naming a bad step."""
    out = dict(tensors)
    for i, step in enumerate(steps):
        names = list(out) if step.tensor is None else [step.tensor]
        for name in names:
            if name not in out:
                raise ModelError(f"processing step {i} ({step.op}) names tensor {name!r}, which does not exist")  # type: ignore[attr-defined]
            if isinstance(step, Confidence):
                continue  # a declaration for routing, read by the device; the tensors are unchanged
            try:
                if isinstance(step, Argmax):
                    out[f"{name}_argmax"] = np.argmax(out[name], axis=step.axis).astype(np.int64)
                else:
                    out[name] = _one(step, out[name])
            except (ValueError, TypeError, np.exceptions.AxisError) as err:
                raise ModelError(f"processing step {i} ({step.op}) failed on {name!r}: {err}")  # type: ignore[attr-defined]
    return out
