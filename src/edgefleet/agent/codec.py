"""Open Inference Protocol v2 tensors ↔ numpy, with strict checks, for JSON and the binary tensor extension.

Binary extension: the JSON header is the first ``Inference-Header-Content-Length`` bytes of the body; each input
with ``parameters.binary_data_size`` takes that many raw little-endian bytes from what follows, in input order,
and together they must use up the body exactly. Outputs are binary when the output asks for
``parameters.binary_data`` or the request sets ``parameters.binary_data_output`` (tritonclient's default).
Every problem raises :class:`BadRequest` with a message naming the input and what was expected.
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import numpy as np

from edgefleet.dtypes import DTYPE_TO_OIP, OIP_TO_DTYPE

__all__ = [
    "DTYPE_TO_OIP",
    "OIP_TO_DTYPE",
    "BadRequest",
    "InferRequest",
    "PlanCache",
    "encode_response",
    "parse_request",
]

_LE = {k: np.dtype(v).newbyteorder("<") for k, v in OIP_TO_DTYPE.items()}
MAX_ELEMENTS = 1 << 26
_OIP_OF = {np.dtype(k): v for k, v in DTYPE_TO_OIP.items()}
_DTYPE = {k: np.dtype(k) for k in DTYPE_TO_OIP}
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps builds an encoder per call for these options
MAX_TENSOR_BYTES = 1 << 30  # the default cap on one request's decoded inputs; the agent passes the device's
MAX_NESTING = 64  # data nested deeper than this is no tensor anyone sends
MAX_HEADS = 32  # response headers an encode_response cache holds


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class InferRequest(NamedTuple):
    # a NamedTuple, not a dataclass: the inference worker imports this module, and dataclasses (with copy and
    # inspect behind it) is half a megabyte of resident memory there
    id: str | None
    feeds: dict[str, np.ndarray]
    outputs: list[str] | None  # None = all
    binary: dict[str, bool]  # per requested output; "*" = default for unnamed
    # outputs requested into shared memory: name -> (region, offset, room) (agent/shm.py); None: none
    placed: dict[str, tuple[str, int, int]] | None = None


def _spec_shape_ok(shape: list[int], spec: dict[str, Any]) -> bool:
    want = spec.get("shape") or []
    if len(want) != len(shape):
        return False
    return all(not (isinstance(w, int) and w > 0) or w == g for w, g in zip(want, shape, strict=True))


def _sig(spec: dict[str, Any]) -> str:
    dims = ", ".join("?" if not isinstance(d, int) or d <= 0 else str(d) for d in spec.get("shape") or [])
    return f"{spec['name']}: {DTYPE_TO_OIP.get(spec['dtype'], spec['dtype'])}[{dims}]"


def _flatten(data: Any, name: str, depth: int = 0) -> list[Any]:
    """Row-major values of nested lists. The recursion is bounded by ``MAX_NESTING`` (a hostile nesting costs no
    stack), and a row of values is taken whole, not element by element: this is the JSON hot path."""
    if not isinstance(data, list):
        return [data]
    if not data or not isinstance(data[0], list):
        return data
    if depth >= MAX_NESTING:
        raise BadRequest(f"input {name!r}: data nested deeper than {MAX_NESTING} levels")
    out: list[Any] = []
    for d in data:
        out.extend(_flatten(d, name, depth + 1))
    return out


# JSON gives exactly these types; ``map(type, …)`` checks a row in C, where ``isinstance`` per value costs a
# Python call each (bool is an int subclass, so an exact-type check also keeps true/false out of numbers).
_NUMBERS = frozenset((int, float))
_BOOLS = frozenset((bool,))


class PlanCache:
    """Checked request headers, for :func:`parse_request`: what a JSON header without tensor values says (inputs by
    binary size or shared memory region, outputs, id) depends on its bytes, the model's input specs and the tensor
    cap alone, so a client sending the same header again (the binary and shared memory paths do, call after call)
    skips decoding and checking it. What depends on the body or on the regions is checked on every request: the
    binary bytes each input takes and their total, each region's placement and the object's size behind it.

    Valid for one ``specs`` list, tensor cap and shared memory offer; :meth:`check` empties it when one changes.
    Bounded: headers of at most :data:`MAX_HEAD` bytes, at most :data:`MAX_ENTRIES` of them (then it starts over)."""

    MAX_HEAD = 4096
    MAX_ENTRIES = 32

    def __init__(self) -> None:
        self.plans: dict[bytes, _Plan] = {}
        self.key: tuple[int, int, bool] = (0, 0, False)

    def check(self, specs: list[dict[str, Any]], max_tensor_bytes: int, shm: Any) -> dict[bytes, _Plan]:
        key = (id(specs), max_tensor_bytes, shm is None)
        if key != self.key:
            self.plans = {}
            self.key = key
            self.specs = specs  # held, so that its id names it for as long as the plans do
        return self.plans


# A checked header: per input (name, dtype as sent, shape, byte size, spec dtype, shared memory params or None),
# the outputs requested, the binary flags, the requested outputs' shared memory params, the request id.
_Input = tuple[str, np.dtype[Any], list[int], int, np.dtype[Any], dict[str, Any] | None]
_Plan = tuple[list[_Input], list[str] | None, dict[str, bool], dict[str, dict[str, Any]] | None, str | None]


def _replay(plan: _Plan, rest: memoryview, shm: Any) -> InferRequest:
    """The request of a header checked before (:class:`PlanCache`): only the body's and the regions' parts are
    checked, in the order :func:`parse_request` checks them."""
    inputs, outputs, binary, out_params, rid = plan
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for name, dtype, shape, nbytes, spec_dtype, params in inputs:
        if params is not None:
            arr = shm.read(f"input {name!r}", params, dtype, shape, nbytes)
        else:
            if offset + nbytes > len(rest):
                raise BadRequest(f"input {name!r}: the body holds {len(rest) - offset} binary bytes, expected {nbytes}")
            arr = np.frombuffer(rest[offset : offset + nbytes], dtype=dtype).reshape(shape)
            offset += nbytes
        feeds[name] = arr.astype(spec_dtype, copy=False)
    if offset != len(rest):
        raise BadRequest(f"the body has {len(rest) - offset} binary bytes that no input's binary_data_size claims")
    placed = None
    if out_params is not None:
        placed = {n: shm.target(f"output {n!r}", p) for n, p in out_params.items()}
    return InferRequest(id=rid, feeds=feeds, outputs=outputs, binary=binary, placed=placed)


def parse_request(
    body: bytes,
    header_length: int | None,
    specs: list[dict[str, Any]],
    max_tensor_bytes: int = MAX_TENSOR_BYTES,
    shm: Any = None,
    cache: PlanCache | None = None,
) -> InferRequest:
    """Parse and check an infer request body against the model's raw input specs. Inputs that would decode to more
    than ``max_tensor_bytes`` together are refused (413) before any is decoded. ``shm``: the registered shared
    memory regions (an ``agent.shm.ShmRegistry``), for tensors that name one; None: shared memory is refused.
    ``cache``: headers checked before (:class:`PlanCache`)."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise BadRequest(f"Inference-Header-Content-Length {header_length} exceeds the body of {len(body)} bytes")
        head, rest = body[:header_length], memoryview(body)[header_length:]
    else:
        head, rest = body, memoryview(b"")
    plans = None
    if cache is not None and len(head) <= PlanCache.MAX_HEAD:
        plans = cache.check(specs, max_tensor_bytes, shm)
        plan = plans.get(head)
        if plan is not None:
            return _replay(plan, rest, shm)
    # what a plan of this header holds; None once an input carries its values in the JSON (they are not cached)
    steps: list[_Input] | None = [] if plans is not None else None
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError) as err:  # bad UTF-8, a number of over 4300 digits
        raise BadRequest(f"the request is not valid JSON: {err}")
    except RecursionError:
        raise BadRequest("the request is not valid JSON: nested too deeply")
    if not isinstance(doc, dict):
        raise BadRequest("the request must be a JSON object with an 'inputs' list")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("the request needs a non-empty 'inputs' list")
    by_name = {s["name"]: s for s in specs}
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    decoded = 0
    for item in inputs:
        if not isinstance(item, dict):
            raise BadRequest("each input must be an object with name, shape, datatype and data")
        name, shape, dt = item.get("name"), item.get("shape"), item.get("datatype")
        if not isinstance(name, str) or name not in by_name:
            raise BadRequest(f"unknown input {name!r}; the model expects {'; '.join(_sig(s) for s in specs)}")
        if name in feeds:
            raise BadRequest(f"input {name!r} is given twice")
        spec = by_name[name]
        spec_dtype = _DTYPE.get(spec["dtype"]) or np.dtype(spec["dtype"])
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_ELEMENTS for d in shape
        ):
            raise BadRequest(f"input {name!r}: shape must be a list of non-negative integers of at most {MAX_ELEMENTS}")
        if dt not in OIP_TO_DTYPE:
            raise BadRequest(f"input {name!r}: datatype {dt!r} is not supported; expected {_sig(spec)}")
        if OIP_TO_DTYPE[dt] != spec["dtype"]:
            raise BadRequest(f"input {name!r} has datatype {dt}, expected {_sig(spec)}")
        if not _spec_shape_ok(shape, spec):
            raise BadRequest(f"input {name!r} has shape {shape}, expected {_sig(spec)}")
        count = math.prod(shape)
        if count > MAX_ELEMENTS:
            raise BadRequest(f"input {name!r} has {count} elements, more than the {MAX_ELEMENTS} allowed")
        decoded += count * spec_dtype.itemsize
        if decoded > max_tensor_bytes:
            raise BadRequest(
                f"the inputs decode to over {max_tensor_bytes} bytes, more than this device can take in one request",
                413,
            )
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest(f"input {name!r}: parameters must be an object")
        size = params.get("binary_data_size")
        dtype = _LE[dt]
        if "shared_memory_region" in params or "shared_memory_byte_size" in params:
            if shm is None:
                raise BadRequest(f"input {name!r}: shared memory is not offered on this server")
            if size is not None or "data" in item:
                raise BadRequest(f"input {name!r}: give shared memory parameters or data/binary_data_size, not both")
            arr = shm.read(f"input {name!r}", params, dtype, shape, count * dtype.itemsize)
            if steps is not None:
                steps.append((name, dtype, shape, count * dtype.itemsize, spec_dtype, params))
        elif size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"input {name!r}: binary_data_size must be a non-negative integer")
            if size != count * dtype.itemsize:
                raise BadRequest(
                    f"input {name!r}: binary_data_size is {size} bytes, but shape {shape} of {dt} needs "
                    f"{count * dtype.itemsize}"
                )
            if offset + size > len(rest):
                raise BadRequest(f"input {name!r}: the body holds {len(rest) - offset} binary bytes, expected {size}")
            arr = np.frombuffer(rest[offset : offset + size], dtype=dtype).reshape(shape)
            offset += size
            if steps is not None:
                steps.append((name, dtype, shape, size, spec_dtype, None))
        else:
            if "data" not in item:
                raise BadRequest(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
            steps = None
            flat = _flatten(item["data"], name)
            if len(flat) != count:
                raise BadRequest(f"input {name!r}: {len(flat)} values do not fill shape {shape} ({count} values)")
            if dt == "BOOL":
                if not _BOOLS.issuperset(map(type, flat)):
                    raise BadRequest(f"input {name!r}: BOOL data must be true/false")
            elif not _NUMBERS.issuperset(map(type, flat)):
                raise BadRequest(f"input {name!r}: data must be numbers")
            try:
                arr = np.asarray(flat, dtype=spec_dtype).reshape(shape)
            except (ValueError, OverflowError, TypeError) as err:
                raise BadRequest(f"input {name!r}: data does not fit {dt}: {err}")
        feeds[name] = arr.astype(spec_dtype, copy=False)
    if offset != len(rest):
        raise BadRequest(f"the body has {len(rest) - offset} binary bytes that no input's binary_data_size claims")
    missing = [s["name"] for s in specs if s["name"] not in feeds]
    if missing:
        raise BadRequest(f"missing input {missing[0]!r}; the model expects {'; '.join(_sig(s) for s in specs)}")
    req_params = doc.get("parameters") or {}
    if not isinstance(req_params, dict):
        raise BadRequest("parameters must be an object")
    default_binary = bool(req_params.get("binary_data_output", False))
    outputs: list[str] | None = None
    binary: dict[str, bool] = {"*": default_binary}
    placed: dict[str, tuple[str, int, int]] | None = None
    out_params: dict[str, dict[str, Any]] | None = None
    if "outputs" in doc:
        if not isinstance(doc["outputs"], list):
            raise BadRequest("'outputs' must be a list")
        outputs = []
        for o in doc["outputs"]:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise BadRequest("each requested output must be an object with a name")
            p = o.get("parameters") or {}
            if isinstance(p, dict) and ("shared_memory_region" in p or "shared_memory_byte_size" in p):
                if shm is None:
                    raise BadRequest(f"output {o['name']!r}: shared memory is not offered on this server")
                placed = placed or {}
                placed[o["name"]] = shm.target(f"output {o['name']!r}", p)
                out_params = out_params or {}
                out_params[o["name"]] = p
            outputs.append(o["name"])
            binary[o["name"]] = bool(p.get("binary_data", default_binary)) if isinstance(p, dict) else default_binary
        if not outputs:
            outputs = None
    rid = doc.get("id")
    rid = rid if isinstance(rid, str) else None
    if steps is not None and plans is not None:
        if len(plans) >= PlanCache.MAX_ENTRIES:
            plans.clear()
        plans[head] = (steps, outputs, binary, out_params, rid)
    return InferRequest(id=rid, feeds=feeds, outputs=outputs, binary=binary, placed=placed)


def encode_response(
    model: str,
    version: str,
    rid: str | None,
    results: dict[str, Any],
    binary: dict[str, bool],
    placed: dict[str, dict[str, Any]] | None = None,
    parameters: dict[str, Any] | None = None,
    cache: dict[tuple[Any, ...], bytes] | None = None,
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header length (for the response header).
    ``placed``: outputs already written to shared memory, with their response parameters (no data here).
    ``cache``: JSON headers encoded before, by everything they say (an answer whose outputs are all binary or in
    shared memory says the same as the one before it, call after call); at most :data:`MAX_HEADS` of them."""
    outs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    # what the JSON header says, as a key for ``cache``; None once an output carries its values in the JSON
    key: list[Any] | None = [model, version, rid, tuple(parameters.items()) if parameters else None]
    for name, value in results.items():
        arr = value if value.__class__ is np.ndarray else np.asarray(value)
        dt = _OIP_OF.get(arr.dtype) or DTYPE_TO_OIP.get(arr.dtype.name)  # dtype.name is computed in Python
        if dt is None:
            raise BadRequest(f"output {name!r} has dtype {arr.dtype}, which OIP cannot carry", status=500)
        entry: dict[str, Any] = {"name": name, "datatype": dt, "shape": list(arr.shape)}
        if placed is not None and name in placed:
            entry["parameters"] = placed[name]
            if key is not None:
                key.append((name, dt, arr.shape, tuple(placed[name].items())))
        elif binary.get(name, binary.get("*", False)):
            raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
            if key is not None:
                key.append((name, dt, arr.shape, len(raw)))
        else:
            entry["data"] = arr.reshape(-1).tolist()
            key = None
        outs.append(entry)
    head = None
    if cache is not None and key is not None:
        cache_key = tuple(key)
        head = cache.get(cache_key)
    if head is None:
        doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outs}
        if rid is not None:
            doc["id"] = rid
        if parameters:  # the response's own parameters (the route that answered it: docs/agent.md)
            doc["parameters"] = parameters
        head = _ENCODE(doc).encode()
        if cache is not None and key is not None:
            if len(cache) >= MAX_HEADS:
                cache.clear()
            cache[cache_key] = head
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
