"""Closed-loop evaluation of stateful (recurrent) models: each call is fed the model's own previous state.

Per-call evaluation feeds every call the state recorded in the data, so a candidate's state errors never compound;
deployed, the state comes back from the model itself, and a quantization error small on one call can grow over a
stream (a VAD that agreed per call differed from float on 3.5% of frames run as deployed). Here a *state pair*
``INPUT=OUTPUT`` names a state input and the output that feeds it on the next call of the same stream; streams come
from the data's ``streams`` array (one id per call, calls of a stream in order; absent: one stream).

Pure functions except :func:`run_closed_loop`, :func:`replay_states` and :func:`evaluate_calls`, which run a
session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from edgefleet.data import CallData
from edgefleet.errors import DataError
from edgefleet.optimize.evaluate import call_feed, run_calls
from edgefleet.optimize.prepare import load_onnx
from edgefleet.runtime.onnxruntime import OrtSession
from edgefleet.runtime.schema import TensorSpec

__all__ = [
    "METADATA_KEY",
    "StatePair",
    "check_state_pairs",
    "evaluate_calls",
    "model_state_pairs",
    "parse_state_pairs",
    "replay_states",
    "resolve_state_pairs",
    "run_closed_loop",
    "stream_groups",
    "wire_state",
    "with_initial_state",
]

StatePair = tuple[str, str]  # (state input, the output that feeds it on the next call)
METADATA_KEY = "edgefleet.state"


def parse_state_pairs(specs: Sequence[str], where: str = "--state") -> list[StatePair]:
    """``["in=out", ...]`` (each item may hold several pairs separated by commas) as pairs, in order."""
    pairs: list[StatePair] = []
    for spec in specs:
        for item in spec.split(","):
            name_in, sep, name_out = (s.strip() for s in item.partition("="))
            if not sep or not name_in or not name_out:
                raise DataError(
                    f"{where} {item.strip()!r} is not INPUT=OUTPUT (a state input and the output feeding it)"
                )
            pairs.append((name_in, name_out))
    inputs = [i for i, _ in pairs]
    dup = next((i for i in inputs if inputs.count(i) > 1), None)
    if dup is not None:
        raise DataError(f"{where} names state input {dup!r} twice; each state input is fed by one output")
    return pairs


def resolve_state_pairs(given: Sequence[str] | None, model: onnx.ModelProto) -> list[StatePair]:
    """The pairs given (``[]`` turns closed-loop evaluation off), else those of the model's ``edgefleet.state``
    metadata (``"in1=out1,in2=out2"``), else none."""
    if given is not None:
        return parse_state_pairs(given)
    meta = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in meta or not meta[METADATA_KEY].strip():
        return []
    return parse_state_pairs([meta[METADATA_KEY]], where=f"model metadata {METADATA_KEY}")


def check_state_pairs(pairs: Sequence[StatePair], inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
    """Every pair names a model input and a model output."""
    in_names = [s.name for s in inputs]
    out_names = [s.name for s in outputs]
    for name_in, name_out in pairs:
        if name_in not in in_names:
            raise DataError(f"state pair {name_in}={name_out}: the model has no input {name_in!r} (it has {in_names})")
        if name_out not in out_names:
            raise DataError(
                f"state pair {name_in}={name_out}: the model has no output {name_out!r} (it has {out_names})"
            )


def stream_groups(streams: np.ndarray | None, n_calls: int) -> list[np.ndarray]:
    """Call indices per stream, each in data order, streams in order of first appearance (``None``: one stream)."""
    if streams is None:
        return [np.arange(n_calls)]
    ids = np.asarray(streams)
    if ids.ndim != 1:
        raise DataError(f"streams must hold one id per call (shape [{n_calls}]), not shape {list(ids.shape)}")
    if len(ids) != n_calls:
        raise DataError(f"streams has {len(ids)} entries but the data holds {n_calls} calls")
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    return [np.flatnonzero(inverse == k) for k in np.argsort(first, kind="stable")]


def wire_state(
    recorded: Mapping[str, np.ndarray], previous: Mapping[str, np.ndarray] | None, pairs: Sequence[StatePair]
) -> dict[str, np.ndarray]:
    """One call's feed: the recorded feed, its state inputs replaced by the previous call's state outputs (none on a
    stream's first call). The dtype is the recorded one, so a candidate with other output types still feeds right."""
    feed = dict(recorded)
    if previous is None:
        return feed
    for name_in, name_out in pairs:
        want = recorded[name_in]
        got = np.asarray(previous[name_out])
        if got.shape != want.shape:
            raise DataError(
                f"state output {name_out!r} has shape {list(got.shape)} but input {name_in!r} takes "
                f"{list(want.shape)}; --state pairs an input with the output that feeds it"
            )
        feed[name_in] = got.astype(want.dtype, copy=False)
    return feed


def with_initial_state(data: CallData, pairs: Sequence[StatePair], inputs: Sequence[TensorSpec]) -> CallData:
    """``data`` with every state input present: an extra array of that name becomes the input, else zeros (only a
    stream's first call reads it). Zeros need the state's static shape."""
    missing = [name for name, _ in pairs if name not in data.inputs]
    if not missing:
        return data
    specs = {s.name: s for s in inputs}
    arrays = dict(data.inputs)
    extras = dict(data.extras)
    for name in missing:
        if name in extras:
            arrays[name] = extras.pop(name)
            continue
        shape = specs[name].shape
        if not all(isinstance(d, int) and d > 0 for d in shape):
            raise DataError(
                f"state input {name!r} has a dynamic shape {shape}; give each stream's first state in the data"
            )
        dims = [int(d) for d in shape if isinstance(d, int)]
        arrays[name] = np.zeros((len(data), *dims), dtype=np.dtype(specs[name].dtype))
    return CallData(arrays, data.labels, data.slices, extras, streams=data.streams)


def _closed_loop(
    session: OrtSession, data: CallData, wanted: Sequence[str], pairs: Sequence[StatePair]
) -> Iterator[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(call index, the feed it got, its ``wanted`` outputs and state outputs), stream by stream."""
    names = [s.name for s in session.inputs]
    fetch = list(dict.fromkeys([*wanted, *(o for _, o in pairs)]))
    for idx in stream_groups(data.streams, len(data)):
        previous: dict[str, np.ndarray] | None = None
        for i in idx:
            feed = wire_state(call_feed(data, int(i), names), previous, pairs)
            previous = session.run(feed, fetch)
            yield int(i), feed, previous


def run_closed_loop(
    session: OrtSession, data: CallData, output: str, pairs: Sequence[StatePair]
) -> tuple[np.ndarray, int]:
    """Run each stream in order feeding the model its own state; ``output`` of every call, stacked in data order
    ``[n_calls, ...]`` (so labels and slices line up as in per-call evaluation), and the number of streams."""
    outs: dict[int, np.ndarray] = {i: got[output] for i, _, got in _closed_loop(session, data, [output], pairs)}
    shapes = {o.shape for o in outs.values()}
    if len(shapes) != 1:
        raise DataError(f"output {output!r} changes shape between calls ({sorted(shapes)}); use one file per shape")
    return np.stack([outs[i] for i in range(len(data))]).astype(np.float64), len(stream_groups(data.streams, len(data)))


def replay_states(session: OrtSession, data: CallData, pairs: Sequence[StatePair]) -> CallData:
    """``data`` with every call's state inputs replaced by those ``session`` feeds itself closed-loop: calibration
    data given without states then calibrates the state path on the states it will see, not on zeros."""
    fed: dict[str, list[np.ndarray]] = {name: [np.empty(0)] * len(data) for name, _ in pairs}
    for i, feed, _ in _closed_loop(session, data, [], pairs):
        for name in fed:
            fed[name][i] = feed[name]
    arrays = dict(data.inputs) | {name: np.stack(v) for name, v in fed.items()}
    return CallData(arrays, data.labels, data.slices, data.extras, streams=data.streams)


def evaluate_calls(session: OrtSession, data: CallData, output: str, pairs: Sequence[StatePair]) -> np.ndarray:
    """Closed loop when the model has state pairs, else every call on its own (teacher-forced)."""
    if not pairs:
        return run_calls(session, data, output)
    return run_closed_loop(session, data, output, pairs)[0]


def model_state_pairs(path: str | os.PathLike[str], given: Sequence[str] | None) -> list[StatePair]:
    """:func:`resolve_state_pairs` for a model file: the CLI needs them before loading data, whose state arrays
    are then optional (each stream's first call starts from zeros without them)."""
    p = Path(path)
    return resolve_state_pairs(given, load_onnx(p.read_bytes(), str(p)))
