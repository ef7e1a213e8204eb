"""Golden vectors: raw sample inputs and what the model answered; a device reproduces them before it serves.

``golden.npz`` holds ``in.<input>`` and ``out.<output>`` arrays, first axis = call. It is written
with a fixed zip timestamp so packages rebuild byte-identically (``numpy.savez`` stamps the local time).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping

import numpy as np

from edgefleet.data import CallData
from edgefleet.errors import GoldenMismatchError, PackageError
from edgefleet.package.manifest import GoldenTolerance
from edgefleet.runtime import Model

__all__ = ["MAX_GOLDEN_CALLS", "compare_golden", "npz_bytes", "read_golden", "run_calls", "write_golden"]

MAX_GOLDEN_CALLS = 64
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A ``.npz`` that ``numpy.load`` reads, identical for identical arrays (sorted, stored, fixed times)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def run_calls(model: Model, calls: CallData) -> dict[str, np.ndarray]:
    """Run every call and stack each output along a new first axis."""
    per_call = [model.run(feed) for feed in calls]
    stacked: dict[str, np.ndarray] = {}
    for name in per_call[0]:
        shapes = {out[name].shape for out in per_call}
        if len(shapes) != 1:
            raise PackageError(
                f"output {name!r} changes shape between calls ({sorted(shapes)}); use calls of one shape"
            )
        stacked[name] = np.stack([out[name] for out in per_call])
    return stacked


def write_golden(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> bytes:
    arrays = {f"in.{k}": v for k, v in inputs.items()} | {f"out.{k}": v for k, v in outputs.items()}
    return npz_bytes(arrays)


def read_golden(data: bytes) -> tuple[CallData, dict[str, np.ndarray]]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise PackageError(f"golden.npz is unreadable: {err}")
    inputs = {k[3:]: v for k, v in arrays.items() if k.startswith("in.")}
    outputs = {k[4:]: v for k, v in arrays.items() if k.startswith("out.")}
    if not inputs or not outputs:
        raise PackageError("golden.npz holds no inputs or no outputs")
    try:
        return CallData(inputs), outputs
    except PackageError:
        raise
    except Exception as err:
        raise PackageError(f"golden.npz is inconsistent: {err}")


def compare_golden(
    expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray], tol: GoldenTolerance
) -> list[str]:
    """Every way ``actual`` misses ``expected``; ``[]`` when it reproduces within tolerance."""
    problems: list[str] = []
    for name, want in expected.items():
        got = actual.get(name)
        if got is None:
            problems.append(f"output {name!r} is missing")
            continue
        if got.shape != want.shape:
            problems.append(f"output {name!r} has shape {list(got.shape)}, golden has {list(want.shape)}")
            continue
        if want.dtype == bool or not np.issubdtype(want.dtype, np.number):
            bad = np.asarray(got != want)
        else:
            w = want.astype(np.float64)
            g = got.astype(np.float64)
            bad = ~np.isclose(g, w, rtol=tol.rtol, atol=tol.atol, equal_nan=True)
        if bad.any():
            flat = np.argwhere(bad)[0]
            call = int(flat[0])
            if np.issubdtype(want.dtype, np.number) and want.dtype != bool:
                err = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
                detail = f"max abs error {err:.3g} > atol {tol.atol:g} + rtol {tol.rtol:g}·|golden|"
            else:
                detail = "values differ"
            problems.append(
                f"output {name!r} differs from golden in {int(bad.sum())} value(s), first in call {call}: {detail}"
            )
    return problems


def verify(model: Model, inputs: CallData, outputs: Mapping[str, np.ndarray], tol: GoldenTolerance) -> None:
    problems = compare_golden(outputs, run_calls(model, inputs), tol)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise GoldenMismatchError(f"golden vectors do not reproduce: {problems[0]}{more}")
