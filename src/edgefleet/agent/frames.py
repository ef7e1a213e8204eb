"""The frames between the agent and its inference worker: a fixed header, a small JSON descriptor, raw tensors.

Nothing here can carry code (ADR 0101): the descriptor is JSON (names, dtypes, shapes, error text, small fields)
and a tensor is raw bytes read back with ``numpy.frombuffer`` under a dtype from :data:`DTYPES` — never the
object dtype. The agent holds the device credential and keys; a worker compromised through a crafted model can
send it bytes, but not code. Every length is checked on read before anything is allocated for it.

Layout, both ways (both processes run on the same host: tensors are in its native byte order)::

    header  20 bytes  <4sBBHIQ: magic b"EFWF", version 1, kind, 0, descriptor length, data length
    descriptor        UTF-8 JSON object, at most MAX_DESCRIPTOR bytes
    data              the tensors' bytes, back to back, in the descriptor's order; they must fill it exactly

Messages are tuples, as the worker's loop and the agent handle them (``worker/main.py`` documents each):
``("infer", feeds, outputs)``, ``("ok", value, compute_s)``, ``("err", kind, message)``, ``("hello", info)``,
``("stats", [(outcome, total_s, compute_s), …])``, ``("metrics",)`` (a question) and ``("metrics", body)`` (its
answer), ``("serve", limits, extra)`` (``extra``: how many listening sockets ride it, the shared memory regions),
``("shm", change)`` (a shared memory region registered or unregistered on the other side, agent/shm.py),
``("remote", token, tensors, meta)`` (hybrid routing, ADR 0105: a low-confidence request the worker hands the agent, and
the agent's answer), ``("routing", settings)``,
``("drift",)``, ``("golden",)``, ``("flush",)``, ``("stop",)``, ``("sample", rate_per_min)`` (input sampling on
or, at 0, off: agent/sampling.py) and ``("samples", [(unix_time, feeds), …])`` (what it sampled), ``("shadow",
rate_per_s)`` (mirroring for a shadow phase on or, at 0, off: agent/shadow.py) and ``("mirror", [(feeds, outputs),
…])`` (the answered requests it copied). An ``ok`` value is
a mapping of name → array (an inference's outputs) or a JSON value.

Lean on purpose: the inference worker imports it (standard library and numpy only).
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

from edgefleet.dtypes import OIP_TO_DTYPE
from edgefleet.errors import AgentError

__all__ = ["DTYPES", "HEADER", "MAX_DATA", "MAX_DESCRIPTOR", "FrameError", "decode", "encode", "take"]

MAGIC = b"EFWF"
VERSION = 1
HEADER = struct.Struct("<4sBBHIQ")
MAX_DESCRIPTOR = 16 * 1024 * 1024  # drift summaries and model metadata are the largest: far below this
MAX_DATA = 4 * 1024 * 1024 * 1024  # tensors; what the device can hold bounds it long before
MAX_DIMS = 32
# numpy dtype names a tensor may have; plain numbers only (no object, string, void or datetime dtypes).
DTYPES = frozenset(OIP_TO_DTYPE.values())
_DT = {name: np.dtype(name) for name in DTYPES}
_NAME = {dt: name for name, dt in _DT.items()}  # dtype.name is slow (computed in Python); a lookup is not
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps builds an encoder per call for these options

_KINDS = (
    *("hello", "ok", "err", "infer", "stats", "metrics", "serve", "drift", "golden", "flush", "stop"),
    *("shm", "sample", "samples"),
    *("remote", "routing"),
    *("shadow", "mirror"),
)
_CODE = {name: i + 1 for i, name in enumerate(_KINDS)}
_BARE = frozenset(("drift", "golden", "flush", "stop"))
_CARRY = frozenset(("infer", "ok", "metrics", "samples", "remote", "mirror"))  # the kinds that may carry data


class FrameError(AgentError):
    """A frame that breaks the format: the peer is broken or hostile, and the connection ends."""


def _dumps(doc: dict[str, Any]) -> bytes:
    try:
        return _ENCODE(doc).encode()
    except (TypeError, ValueError) as err:
        raise FrameError(f"cannot encode {sorted(doc)}: {err}") from None


def _frame(kind: str, desc: dict[str, Any], data: list[Any] | None = None, size: int = 0) -> bytes:
    d = _dumps(desc)
    if len(d) > MAX_DESCRIPTOR:
        raise FrameError(f"a {kind} descriptor of {len(d)} bytes is over {MAX_DESCRIPTOR}")
    head = HEADER.pack(MAGIC, VERSION, _CODE[kind], 0, len(d), size)
    if not data:
        return head + d
    return b"".join([head, d, *data])


def _tensors(arrays: dict[str, Any]) -> tuple[list[list[Any]], list[Any], int]:
    table: list[list[Any]] = []
    data: list[Any] = []
    size = 0
    for name, value in arrays.items():
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        dtype = _NAME.get(arr.dtype)
        if dtype is None:
            if arr.dtype.name not in DTYPES:
                raise FrameError(f"tensor {name!r} has dtype {arr.dtype}, which frames do not carry")
            dtype = arr.dtype.name
            arr = arr.astype(arr.dtype.newbyteorder("="))  # the other byte order
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        table.append([str(name), dtype, list(arr.shape)])
        if arr.nbytes:
            data.append(arr.data.cast("B"))
            size += arr.nbytes
    return table, data, size


def encode(msg: tuple[Any, ...]) -> bytes:
    """One message as a frame. Raises :class:`FrameError` for what a frame cannot carry (an output of the object
    dtype, a value that is not JSON)."""
    op = msg[0]
    if op == "infer":
        table, data, size = _tensors(msg[1])
        return _frame(op, {"t": table, "o": msg[2]}, data, size)
    if op == "ok":
        value, compute = msg[1], float(msg[2])
        if isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
            table, data, size = _tensors(value)
            return _frame(op, {"c": compute, "t": table}, data, size)
        return _frame(op, {"c": compute, "v": value})
    if op == "err":
        return _frame(op, {"k": str(msg[1]), "m": str(msg[2])})
    if op == "hello":
        return _frame(op, {"info": msg[1]})
    if op == "stats":
        return _frame(op, {"s": [list(o) for o in msg[1]]})
    if op == "metrics":
        if len(msg) == 1:
            return _frame(op, {})
        body = bytes(msg[1])
        return _frame(op, {"body": True}, [body], len(body))
    if op == "serve":
        return _frame(op, {"limits": msg[1] if len(msg) > 1 else None, "x": msg[2] if len(msg) > 2 else None})
    if op == "shm":
        return _frame(op, {"c": msg[1]})
    if op == "sample":
        return _frame(op, {"r": float(msg[1])})
    if op == "samples":
        rows: list[list[Any]] = []
        parts: list[Any] = []
        total = 0
        for at, feeds in msg[1]:
            table, data, size = _tensors(feeds)
            rows.append([float(at), size, table])
            parts += data
            total += size
        return _frame(op, {"s": rows}, parts, total)
    if op == "remote":  # hybrid routing (agent/remote.py): (token, tensors, meta) either way
        table, data, size = _tensors(msg[2])
        return _frame(op, {"k": int(msg[1]), "m": msg[3], "t": table}, data, size)
    if op == "routing":
        return _frame(op, {"r": msg[1]})
    if op == "shadow":
        return _frame(op, {"r": float(msg[1])})
    if op == "mirror":  # shadow evaluation (agent/shadow.py): [(inputs, served outputs), …]
        mirrored: list[list[Any]] = []
        chunks: list[Any] = []
        length = 0
        for feeds, outputs in msg[1]:
            in_table, in_data, in_size = _tensors(feeds)
            out_table, out_data, out_size = _tensors(outputs)
            mirrored.append([in_size, in_table, out_size, out_table])
            chunks += in_data + out_data
            length += in_size + out_size
        return _frame(op, {"m": mirrored}, chunks, length)
    if op in _BARE:
        return _frame(op, {})
    raise FrameError(f"unknown message {op!r}")


# ---------------------------------------------------------------- reading


def _fail(what: str) -> FrameError:
    return FrameError(f"malformed frame: {what}")


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise _fail(f"{what} is not a string")
    return v


def _num(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _fail(f"{what} is not a number")
    return float(v)


def _class(v: Any, what: str) -> str:
    # what the telemetry window will carry (protocol.ConfusionCell): 1 to 64 characters, storable
    s = _str(v, what)
    if not 0 < len(s) <= 64 or "\x00" in s:
        raise _fail(f"{what} is not 1 to 64 characters without NUL")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(f"{what} is not valid Unicode") from None
    return s


def _read_tensors(table: Any, data: memoryview) -> dict[str, np.ndarray]:
    if not isinstance(table, list):
        raise _fail("the tensor table is not a list")
    out: dict[str, np.ndarray] = {}
    pos = 0
    for entry in table:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise _fail("a tensor entry is not [name, dtype, shape]")
        name, dtype, shape = entry
        name = _str(name, "a tensor name")
        if name in out:
            raise _fail(f"tensor {name!r} twice")
        dt = _DT.get(dtype) if isinstance(dtype, str) else None
        if dt is None:
            raise _fail(f"tensor {name!r} has a dtype outside the allowed list: {dtype!r}")
        if not (
            isinstance(shape, list)
            and len(shape) <= MAX_DIMS
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DATA for d in shape)
        ):
            raise _fail(f"tensor {name!r} has a bad shape")
        size = math.prod(shape) * dt.itemsize
        if size > len(data) - pos:
            raise _fail(f"tensor {name!r} needs {size} bytes, the frame has {len(data) - pos} left")
        out[name] = np.frombuffer(data[pos : pos + size], dtype=dt).reshape(shape)
        pos += size
    if pos != len(data):
        raise _fail(f"{len(data) - pos} data bytes that no tensor claims")
    return out


def decode(kind: int, desc_bytes: bytes | memoryview, data: memoryview) -> tuple[Any, ...]:
    """One frame's message from its kind, descriptor and data (``data`` must outlive the arrays: they view it)."""
    if not 1 <= kind <= len(_KINDS):
        raise _fail(f"unknown kind {kind}")
    op = _KINDS[kind - 1]
    try:
        desc = json.loads(str(desc_bytes, "utf-8"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise _fail(f"the {op} descriptor is not JSON: {err}") from None
    if not isinstance(desc, dict):
        raise _fail(f"the {op} descriptor is not an object")
    if op not in _CARRY and len(data):
        raise _fail(f"a {op} frame carries {len(data)} data bytes")
    if op == "infer":
        outputs = desc.get("o")
        if outputs is not None and not (isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)):
            raise _fail("the requested outputs are not a list of names")
        return (op, _read_tensors(desc.get("t"), data), outputs)
    if op == "ok":
        compute = _num(desc.get("c"), "the compute time")
        if "t" in desc:
            return (op, _read_tensors(desc["t"], data), compute)
        if len(data):
            raise _fail(f"an ok frame without tensors carries {len(data)} data bytes")
        return (op, desc.get("v"), compute)
    if op == "err":
        return (op, _str(desc.get("k"), "the error kind"), _str(desc.get("m"), "the error message"))
    if op == "hello":
        info = desc.get("info")
        if not isinstance(info, dict):
            raise _fail("the hello carries no model information")
        return (op, info)
    if op == "stats":
        rows = desc.get("s")
        if not isinstance(rows, list):
            raise _fail("the stats are not a list")
        stats: list[tuple[str, Any, Any]] = []
        for row in rows:
            if not (isinstance(row, list) and len(row) == 3):
                raise _fail("a stats row is not [outcome, total, compute]")
            if row[0] == "feedback":  # ground truth (agent/feedback.py): ["feedback", predicted or None, label]
                predicted = None if row[1] is None else _class(row[1], "a predicted class")
                stats.append(("feedback", predicted, _class(row[2], "a feedback label")))
                continue
            total = None if row[1] is None else _num(row[1], "a total time")
            stats.append((_str(row[0], "an outcome"), total, _num(row[2], "a compute time")))
        return (op, stats)
    if op == "metrics":
        if desc.get("body") is True:
            return (op, bytes(data))
        if len(data):
            raise _fail("a metrics question carries data")
        return (op,)
    if op == "serve":
        limits = desc.get("limits")
        if limits is not None and not isinstance(limits, dict):
            raise _fail("the serve limits are not an object")
        extra = desc.get("x")
        if extra is not None and not isinstance(extra, dict):
            raise _fail("the serve extras are not an object")
        return (op, limits, extra)
    if op == "shm":
        change = desc.get("c")
        if not isinstance(change, dict):
            raise _fail("the shared memory change is not an object")
        return (op, change)
    if op == "sample":
        rate = _num(desc.get("r"), "the sampling rate")
        if not 0 <= rate <= 1e6:
            raise _fail("the sampling rate is out of range")
        return (op, rate)
    if op == "samples":
        return (op, _read_samples(desc.get("s"), data))
    if op == "remote":
        token, meta = desc.get("k"), desc.get("m")
        if isinstance(token, bool) or not isinstance(token, int) or not isinstance(meta, dict):
            raise _fail("a remote frame without its token or meta")
        return (op, token, _read_tensors(desc.get("t"), data), meta)
    if op == "routing":
        doc = desc.get("r")
        if not isinstance(doc, dict):
            raise _fail("the routing settings are not an object")
        return (op, doc)
    if op == "shadow":
        rate = _num(desc.get("r"), "the mirroring rate")
        if not 0 <= rate <= 1e6:
            raise _fail("the mirroring rate is out of range")
        return (op, rate)
    if op == "mirror":
        return (op, _read_mirror(desc.get("m"), data))
    return (op,)


def _read_mirror(rows: Any, data: memoryview) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    if not isinstance(rows, list):
        raise _fail("the mirrored requests are not a list")
    out: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
    pos = 0
    for row in rows:
        if not (isinstance(row, list) and len(row) == 4):
            raise _fail("a mirrored request is not [size, inputs, size, outputs]")
        halves = []
        for size, table in ((row[0], row[1]), (row[2], row[3])):
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(data) - pos:
                raise _fail("a mirrored request's size is out of bounds")
            halves.append(_read_tensors(table, data[pos : pos + size]))
            pos += size
        out.append((halves[0], halves[1]))
    if pos != len(data):
        raise _fail(f"{len(data) - pos} data bytes that no mirrored request claims")
    return out


def _read_samples(rows: Any, data: memoryview) -> list[tuple[float, dict[str, np.ndarray]]]:
    if not isinstance(rows, list):
        raise _fail("the samples are not a list")
    out: list[tuple[float, dict[str, np.ndarray]]] = []
    pos = 0
    for row in rows:
        if not (isinstance(row, list) and len(row) == 3):
            raise _fail("a sample is not [time, size, tensors]")
        size = row[1]
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(data) - pos:
            raise _fail("a sample's size is out of bounds")
        out.append((_num(row[0], "a sample's time"), _read_tensors(row[2], data[pos : pos + size])))
        pos += size
    if pos != len(data):
        raise _fail(f"{len(data) - pos} data bytes that no sample claims")
    return out


def take(buf: bytearray, until: Any = None) -> list[tuple[Any, ...]]:
    """The complete frames at the head of ``buf``, removed from it; stops after the first message ``until``
    accepts (what follows it stays in ``buf``). A header that breaks the format raises :class:`FrameError` as soon
    as it is complete, before its lengths are waited for."""
    msgs: list[tuple[Any, ...]] = []
    pos = 0
    end = len(buf)
    hs = HEADER.size
    while end - pos >= hs:
        magic, version, kind, zero, dlen, size = HEADER.unpack_from(buf, pos)
        if magic != MAGIC or version != VERSION or zero:
            raise _fail(f"bad header {bytes(buf[pos : pos + 8])!r}")
        if dlen > MAX_DESCRIPTOR or size > MAX_DATA:
            raise _fail(f"lengths {dlen}/{size} over the limits")
        total = hs + dlen + size
        if end - pos < total:
            break
        # One copy per frame (a slice of a bytearray): the arrays view it, and ``buf`` is compacted below.
        view = memoryview(buf[pos + hs : pos + total])
        msgs.append(decode(kind, view[:dlen], view[dlen:]))
        pos += total
        if until is not None and until(msgs[-1]):
            break
    del buf[:pos]
    return msgs
