"""The per-call ``.npz`` data format shared by optimize, bench, gate and golden vectors.

One array per model input name; the first axis indexes calls, and ``arr[name][i]`` is exactly what call ``i``
feeds, batch axis included (digits ``X`` is stored ``[N, 1, 64]``). So models whose batch axis is not the first,
that take scalars, or that carry recurrent state as an input work as they are. Optional extra arrays hold labels
and a slice id per call; their keys are named by the caller (``--labels KEY``, ``--slices KEY``).
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgefleet._fs import atomic_write
from edgefleet.errors import DataError

__all__ = ["STREAMS_KEY", "CallData", "from_batch", "from_feeds", "load_calls", "save_calls"]
STREAMS_KEY = "streams"  # the stream-id array of a data file (closed-loop evaluation of recurrent models)


@dataclass(frozen=True)
class CallData:
    """Calls to a model: ``inputs[name][i]`` is call ``i``'s feed for input ``name``."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    slices: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    # A stream id per call (calls of a stream in order) for closed-loop evaluation of recurrent models; None: one.
    streams: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not self.inputs:
            raise DataError("call data holds no input arrays")
        counts = {name: _ncalls(name, arr) for name, arr in self.inputs.items()}
        if len(set(counts.values())) != 1:
            detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise DataError(f"input arrays disagree on the number of calls ({detail})")
        n = next(iter(counts.values()))
        for what, arr in (("labels", self.labels), ("slices", self.slices)):
            if arr is not None and len(arr) != n:
                raise DataError(f"{what} has {len(arr)} entries but the data holds {n} calls")
        if self.streams is not None and (np.ndim(self.streams) != 1 or len(self.streams) != n):
            raise DataError(f"streams must hold one id per call ({n}), not shape {list(np.shape(self.streams))}")

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def feed(self, i: int) -> dict[str, np.ndarray]:
        """The feed dict of call ``i``."""
        return {name: arr[i] for name, arr in self.inputs.items()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self.feed(i)

    def subset(self, index: Sequence[int] | np.ndarray) -> CallData:
        idx = np.asarray(index, dtype=np.int64)
        return CallData(
            inputs={k: v[idx] for k, v in self.inputs.items()},
            labels=None if self.labels is None else self.labels[idx],
            slices=None if self.slices is None else self.slices[idx],
            streams=None if self.streams is None else self.streams[idx],
        )

    def batched(self, batch: int, axis: int = 0) -> dict[str, np.ndarray]:
        """The first ``batch`` calls concatenated along the model's batch ``axis`` (throughput runs)."""
        if batch > len(self):
            raise DataError(f"batch {batch} exceeds the {len(self)} calls in the data")
        # Per-call scalars (a sample rate, say) cannot be concatenated; every call in a batch shares the first.
        return {k: v[0] if v.ndim == 1 else np.concatenate(list(v[:batch]), axis=axis) for k, v in self.inputs.items()}


def _ncalls(name: str, arr: np.ndarray) -> int:
    if arr.ndim == 0:
        raise DataError(f"array {name!r} is a scalar; the first axis must index calls")
    return int(arr.shape[0])


def from_feeds(feeds: Sequence[Mapping[str, np.ndarray | float | int]]) -> dict[str, np.ndarray]:
    """Stack a list of feed dicts (one per call) into per-call arrays."""
    if not feeds:
        raise DataError("no feeds given")
    names = list(feeds[0])
    out: dict[str, np.ndarray] = {}
    for name in names:
        try:
            values = [np.asarray(f[name]) for f in feeds]
        except KeyError:
            missing = next(i for i, f in enumerate(feeds) if name not in f)
            raise DataError(f"feed {missing} lacks input {name!r} that feed 0 has")
        shapes = {v.shape for v in values}
        if len(shapes) != 1:
            raise DataError(f"input {name!r} changes shape between calls ({sorted(shapes)}); use one file per shape")
        out[name] = np.stack(values)
    return out


def from_batch(batch: np.ndarray | Mapping[str, np.ndarray], name: str | None = None) -> dict[str, np.ndarray]:
    """Turn a batch array ``[N, ...]`` into per-call arrays ``[N, 1, ...]`` (each call a batch of one)."""
    arrays = {name or "input": batch} if isinstance(batch, np.ndarray) else dict(batch)
    return {k: np.expand_dims(np.asarray(v), 1) for k, v in arrays.items()}


def save_calls(
    path: str | os.PathLike[str],
    inputs: Mapping[str, np.ndarray],
    *,
    labels: np.ndarray | None = None,
    slices: np.ndarray | None = None,
    labels_key: str = "labels",
    slices_key: str = "slices",
    streams: np.ndarray | None = None,
) -> Path:
    """Write per-call arrays (plus optional labels, slice ids and stream ids under ``streams``) atomically."""
    data = CallData(dict(inputs), labels, slices, streams=streams)
    arrays = dict(data.inputs)
    for key, arr in ((labels_key, labels), (slices_key, slices), (STREAMS_KEY, streams)):
        if arr is not None:
            if key in arrays:
                raise DataError(f"{key!r} is both a model input and the labels/slices/streams key; pick another key")
            arrays[key] = np.asarray(arr)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return atomic_write(Path(path), buf.getvalue())


def load_calls(
    path: str | os.PathLike[str],
    *,
    input_names: Sequence[str] | None = None,
    labels_key: str | None = None,
    slices_key: str | None = None,
    streams_key: str | None = None,
) -> CallData:
    """Read a per-call ``.npz``. With ``input_names``, every name must be present; other arrays are extras. An
    array ``streams_key`` (``STREAMS_KEY`` in the CLI) that is no model input holds stream ids; absent: one stream."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{p} is not a readable .npz file: {err}")
    labels = _pop(arrays, labels_key, p, "labels")
    slices = _pop(arrays, slices_key, p, "slices")
    streams = None
    if streams_key is not None and streams_key in arrays and streams_key not in (input_names or ()):
        streams = arrays.pop(streams_key)
    if input_names is None:
        inputs, extras = arrays, {}
    else:
        missing = [n for n in input_names if n not in arrays]
        if missing:
            raise DataError(
                f"{p} lacks model input {missing[0]!r} (it has {sorted(arrays)}; the model takes {list(input_names)})"
            )
        inputs = {n: arrays[n] for n in input_names}
        extras = {k: v for k, v in arrays.items() if k not in inputs}
    return CallData(inputs, labels, slices, extras, streams=streams)


def _pop(arrays: dict[str, np.ndarray], key: str | None, path: Path, what: str) -> np.ndarray | None:
    if key is None:
        return None
    if key not in arrays:
        raise DataError(f"{path} has no {what} array {key!r} (it has {sorted(arrays)})")
    return arrays.pop(key)
