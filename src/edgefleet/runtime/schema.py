"""The declared I/O schema of a model: tensor specs and checks of real arrays against them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgefleet.dtypes import ONNX_TO_NUMPY, ORT_TO_NUMPY
from edgefleet.errors import InputValidationError

__all__ = ["ONNX_TO_NUMPY", "ORT_TO_NUMPY", "TensorSpec", "describe", "validate_feeds"]


class TensorSpec(BaseModel):
    """One input or output: its name, dtype (numpy name) and shape; a string or null dim is symbolic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    dtype: str
    shape: list[int | str | None] = Field(default_factory=list)
    value_range: tuple[float, float] | None = Field(None, description="expected [min, max] of raw values")

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        if v not in ONNX_TO_NUMPY.values():
            raise ValueError(f"unsupported dtype {v!r}; use one of {sorted(set(ONNX_TO_NUMPY.values()))}")
        return v

    def signature(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"

    def concrete_shape(self, fill: int = 1) -> tuple[int, ...]:
        """The shape with every symbolic dim replaced by ``fill`` (to generate sample inputs)."""
        return tuple(d if isinstance(d, int) and d > 0 else fill for d in self.shape)


def describe(specs: Sequence[TensorSpec]) -> str:
    return "; ".join(s.signature() for s in specs)


def validate_feeds(feeds: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> None:
    """Raise :class:`InputValidationError` naming the input and the expected schema on any mismatch."""
    expected = {s.name: s for s in specs}
    for name in feeds:
        if name not in expected:
            raise InputValidationError(f"unknown input {name!r}; the model expects {describe(specs)}")
    for spec in specs:
        if spec.name not in feeds:
            raise InputValidationError(f"missing input {spec.name!r}; the model expects {describe(specs)}")
        arr = feeds[spec.name]
        if arr.dtype != np.dtype(spec.dtype):
            raise InputValidationError(f"input {spec.name!r} has dtype {arr.dtype}, expected {spec.signature()}")
        if arr.ndim != len(spec.shape):
            raise InputValidationError(
                f"input {spec.name!r} has rank {arr.ndim} (shape {list(arr.shape)}), expected {spec.signature()}"
            )
        for axis, (got, want) in enumerate(zip(arr.shape, spec.shape, strict=True)):
            if isinstance(want, int) and want > 0 and got != want:
                raise InputValidationError(
                    f"input {spec.name!r} has shape {list(arr.shape)} (axis {axis} is {got}, "
                    f"expected {want}), expected {spec.signature()}"
                )
