"""System shared memory for the local inference API: the KServe/Triton ``system_shared_memory`` extension.

A client creates a POSIX shared memory object (``tritonclient.utils.shared_memory``), registers a *region* of it by
name (``POST /v2/systemsharedmemory/region/{name}/register`` with ``{"key", "offset", "byte_size"}``) and then
names the region in an infer request instead of sending tensor bytes: an input's parameters
``shared_memory_region``, ``shared_memory_byte_size`` and optional ``shared_memory_offset`` say where its bytes
are; the same parameters on a requested output say where its bytes go, and the response carries only the
output's name, datatype, shape and parameters (docs/agent.md, "Local zero-copy path").

Two kinds of registry share this module (ADR 0032 splits the serving between two processes):

- the **worker's** (``mapped=True``) maps each region once (``mmap``, ``MAP_SHARED``): an input is a numpy view of
  the client's memory handed to the model as is, an output is written straight into it. Before each use it
  re-reads the object's size (``fstat``): a client that shrank the object after registering would otherwise
  make the access a SIGBUS;
- the **agent's** (``mapped=False``) keeps only the records — it is the registry that outlives a worker and is
  sent to each new one with ``serve`` — and on its own rare forwarding path (connections it accepted while no
  worker served) it reads and writes with ``pread``/``pwrite``, which cannot fault: the agent must survive any
  client.

Registrations made on either side reach the other as ``("shm", change)`` frames. Every size comes from the
object itself or is checked against it; nothing a client states is trusted (offset + size within the region,
the region within the object, an input's byte size equal to its dtype × shape, an output's room enough for it).
Lean: the worker imports this module (standard library and numpy only).
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from edgefleet.agent.codec import BadRequest

__all__ = [
    "MAX_REGIONS",
    "Region",
    "ShmRegistry",
    "check_key",
    "check_name",
    "check_register",
    "placement",
    "unquote",
]

MAX_REGIONS = 64  # each mapped region holds a descriptor and a mapping in the worker
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_KEY = re.compile(r"/?[A-Za-z0-9_.\-]{1,250}")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
PARAMS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")

try:  # the C half of multiprocessing.shared_memory: shm_open without importing multiprocessing
    from _posixshmem import shm_open as _shm_open
except ImportError:  # pragma: no cover - platforms without POSIX shared memory

    def _shm_open(path: str, flags: int, mode: int = 0o600) -> int:
        raise OSError(f"POSIX shared memory is not available here ({path})")


class Region(NamedTuple):
    name: str
    key: str  # as registered (tritonclient sends "/name")
    offset: int  # within the object
    byte_size: int

    def doc(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


# ---------------------------------------------------------------- pure checks


def unquote(text: str) -> str:
    """Percent-decoding of a URL path segment (tritonclient quotes region names)."""
    return _PCT.sub(lambda m: chr(int(m[1], 16)), text) if "%" in text else text


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise BadRequest(f"region name {name[:140]!r} must be 1-128 letters, digits, '_', '.' or '-'")
    return name


def check_key(key: Any) -> str:
    """A POSIX shared memory object name: one path component, optionally with its leading slash."""
    if not isinstance(key, str) or not _KEY.fullmatch(key) or key.strip("/") in (".", ".."):
        raise BadRequest(
            f"key {str(key)[:260]!r} must name a POSIX shared memory object: an optional '/' and 1-250 letters, "
            "digits, '_', '.' or '-'"
        )
    return key


def _int(value: Any, what: str, *, positive: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < (1 if positive else 0) or value >= 1 << 62:
        raise BadRequest(f"{what} must be a {'positive' if positive else 'non-negative'} integer, not {value!r}")
    return value


def check_register(name: str, doc: Any) -> Region:
    """The region a register request asks for (its fit within the object is checked when it is opened)."""
    if not isinstance(doc, dict):
        raise BadRequest("a register request must be a JSON object with key, offset and byte_size")
    return Region(
        check_name(name),
        check_key(doc.get("key")),
        _int(doc.get("offset", 0), "offset"),
        _int(doc.get("byte_size"), "byte_size", positive=True),
    )


def placement(params: dict[str, Any], what: str, regions: dict[str, Region]) -> tuple[Region, int, int]:
    """Where a tensor's shared memory parameters point: (region, offset in it, byte size), checked to lie within
    the region. ``what`` names the tensor in messages ("input 'X'")."""
    name = params.get("shared_memory_region")
    size = params.get("shared_memory_byte_size")
    if name is None or size is None:
        raise BadRequest(f"{what}: shared_memory_region and shared_memory_byte_size must be given together")
    if not isinstance(name, str):
        raise BadRequest(f"{what}: shared_memory_region must be a string")
    region = regions.get(name)
    if region is None:
        raise BadRequest(f"{what}: unknown shared memory region {name[:140]!r}; register it first")
    size = _int(size, f"{what}: shared_memory_byte_size")
    offset = _int(params.get("shared_memory_offset", 0), f"{what}: shared_memory_offset")
    if offset + size > region.byte_size:
        raise BadRequest(
            f"{what}: offset {offset} + byte size {size} is past the end of region {name!r} ({region.byte_size} bytes)"
        )
    return region, offset, size


def uses_shm(params: dict[str, Any]) -> bool:
    return any(p in params for p in PARAMS)


# ---------------------------------------------------------------- the registry


class _Open:
    """A region opened by this process: its descriptor and, in the worker, its mapping."""

    __slots__ = ("base", "bytes", "fd", "map", "region")

    def __init__(self, region: Region, mapped: bool) -> None:
        try:
            fd = _shm_open(region.key if region.key.startswith("/") else "/" + region.key, os.O_RDWR, 0o600)
        except OSError as err:
            raise BadRequest(f"cannot open shared memory object {region.key!r}: {err.strerror or err}") from None
        try:
            size = os.fstat(fd).st_size
            end = region.offset + region.byte_size
            if end > size:
                raise BadRequest(
                    f"region {region.name!r}: offset {region.offset} + byte_size {region.byte_size} is past the end "
                    f"of shared memory object {region.key!r} ({size} bytes)"
                )
            self.map: mmap.mmap | None = None
            self.bytes: np.ndarray[Any, np.dtype[np.uint8]] | None = None  # the mapping as bytes: slicing is cheap
            self.base = 0
            if mapped:
                aligned = region.offset - region.offset % mmap.ALLOCATIONGRANULARITY
                self.map = mmap.mmap(
                    fd, end - aligned, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned
                )
                self.base = region.offset - aligned
                self.bytes = np.frombuffer(self.map, dtype=np.uint8)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.region = region

    def check(self, end: int) -> None:
        """The object still holds ``end`` bytes of this region: a shrunk object would make a mapped access fault."""
        size = os.fstat(self.fd).st_size
        if self.region.offset + end > size:
            raise BadRequest(
                f"shared memory object {self.region.key!r} behind region {self.region.name!r} shrank to {size} bytes"
            )

    def close(self) -> None:
        self.bytes = None
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:
                pass  # an array still views it: the mapping goes when that array does
            self.map = None
        os.close(self.fd)


Change = dict[str, Any]


class ShmRegistry:
    """Registered regions by name. ``mapped``: map them (the worker) or only keep records (the agent).
    ``on_change(change)`` runs after a change made here through the API (not after :meth:`apply`): the other
    process applies it too."""

    def __init__(self, mapped: bool, *, max_regions: int = MAX_REGIONS) -> None:
        self.mapped = mapped
        self.max_regions = max_regions
        self.regions: dict[str, Region] = {}
        self._open: dict[str, _Open] = {}
        self.on_change: Callable[[Change], None] | None = None

    # ------------------------------------------------------------ the API's operations

    def register(self, name: str, doc: Any) -> None:
        region = check_register(name, doc)
        if region.name in self.regions:
            raise BadRequest(f"shared memory region {region.name!r} is already registered; unregister it first")
        if len(self.regions) >= self.max_regions:
            raise BadRequest(f"{self.max_regions} shared memory regions are registered already (the limit)")
        self._add(region)
        self._changed({"op": "register", **region.doc()})

    def unregister(self, name: str) -> None:
        """``name`` "" unregisters every region; an unknown name is no error (it is not registered either way)."""
        for n in list(self.regions) if name == "" else [name]:
            self._drop(n)
        self._changed({"op": "unregister", "name": name})

    def status(self, name: str = "") -> list[dict[str, Any]]:
        if name == "":
            return [r.doc() for r in self.regions.values()]
        region = self.regions.get(name)
        if region is None:
            raise BadRequest(f"no shared memory region {name[:140]!r} is registered")
        return [region.doc()]

    # ------------------------------------------------------------ keeping the two processes in step

    def export(self) -> list[dict[str, Any]]:
        return [r.doc() for r in self.regions.values()]

    def apply(self, change: Any) -> str | None:
        """A change made in the other process (or a region of the ``serve`` list, ``op`` absent = register).
        Returns the name of a region that could not be taken (the object is gone, or the change is malformed)."""
        if not isinstance(change, dict):
            return None
        if change.get("op") == "unregister":
            name = change.get("name")
            if isinstance(name, str):
                for n in list(self.regions) if name == "" else [name]:
                    self._drop(n)
            return None
        name = change.get("name")
        try:
            region = check_register(name if isinstance(name, str) else "", change)
            self._drop(region.name)
            if len(self.regions) >= self.max_regions:
                raise BadRequest("too many regions")
            self._add(region)
        except BadRequest:
            return name if isinstance(name, str) else None
        return None

    def close(self) -> None:
        for name in list(self.regions):
            self._drop(name)

    def _add(self, region: Region) -> None:
        if self.mapped:
            self._open[region.name] = _Open(region, True)
        else:
            _Open(region, False).close()  # it must exist and hold the region; the agent opens it again when used
        self.regions[region.name] = region

    def _drop(self, name: str) -> None:
        self.regions.pop(name, None)
        opened = self._open.pop(name, None)
        if opened is not None:
            opened.close()

    def _changed(self, change: Change) -> None:
        if self.on_change is not None:
            self.on_change(change)

    # ------------------------------------------------------------ tensors

    def read(self, what: str, params: dict[str, Any], dtype: np.dtype[Any], shape: list[int], nbytes: int) -> Any:
        """An input's array from its region: a view of the mapping (the worker) or a copy (the agent)."""
        region, offset, size = placement(params, what, self.regions)
        if size != nbytes:
            raise BadRequest(
                f"{what}: shared_memory_byte_size is {size} bytes, but shape {shape} of {dtype.name} needs {nbytes}"
            )
        opened = self._open.get(region.name)
        if opened is not None and opened.bytes is not None:
            opened.check(offset + size)
            start = opened.base + offset
            arr = opened.bytes[start : start + nbytes].view(dtype).reshape(shape)
            return arr if start % dtype.itemsize == 0 else arr.copy()  # a model may need aligned elements
        out = np.empty(shape, dtype=dtype)
        with _Once(region) as once:
            got = os.preadv(once.fd, [out.reshape(-1).view(np.uint8).data], region.offset + offset) if nbytes else 0
        if got != nbytes:
            raise BadRequest(f"{what}: region {region.name!r} holds only {got} of the {nbytes} bytes asked for")
        return out

    def target(self, what: str, params: dict[str, Any]) -> tuple[str, int, int]:
        """Where a requested output goes: (region name, offset, room), checked now; its size is checked once known."""
        region, offset, size = placement(params, what, self.regions)
        return region.name, offset, size

    def write(self, name: str, placed: tuple[str, int, int], value: Any) -> dict[str, Any]:
        """Write output ``name`` into its region; the response's parameters for it."""
        region_name, offset, room = placed
        region = self.regions.get(region_name)
        if region is None:
            raise BadRequest(f"output {name!r}: shared memory region {region_name!r} was unregistered meanwhile")
        arr = np.ascontiguousarray(value)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if arr.nbytes > room:
            raise BadRequest(
                f"output {name!r} needs {arr.nbytes} bytes, but shared_memory_byte_size gives it {room} in region "
                f"{region_name!r}"
            )
        raw = arr.reshape(-1).data.cast("B")
        opened = self._open.get(region_name)
        if opened is not None and opened.map is not None:
            opened.check(offset + arr.nbytes)
            start = opened.base + offset
            opened.map[start : start + arr.nbytes] = raw
        else:
            with _Once(region) as once:
                once.check(offset + arr.nbytes)
                os.pwrite(once.fd, raw, region.offset + offset)
        out: dict[str, Any] = {"shared_memory_region": region_name, "shared_memory_byte_size": arr.nbytes}
        if offset:
            out["shared_memory_offset"] = offset
        return out


class _Once:
    """A region opened for one access (the agent's path)."""

    def __init__(self, region: Region) -> None:
        self.region = region

    def __enter__(self) -> _Open:
        self.opened = _Open(self.region, False)
        return self.opened

    def __exit__(self, *exc: object) -> None:
        self.opened.close()
