"""Delta updates: the next ``.efpkg`` as a zstd patch of the whole package file against the one a device has.

A delta is only a transport. It is made from the exact bytes of two published packages (zstd with the old
package as a raw-content dictionary, the library's equivalent of ``zstd --patch-from``), and what it yields on the
device is checked against the full package's signed length and SHA-256 before anything uses it
(docs/repository.md, "Delta updates"). These functions are pure: bytes in, bytes out.

Applying needs the old package and the new one in memory at once; the window covers both, so a frame never
refers to data it cannot reach.
"""

from __future__ import annotations

from typing import Any

import zstandard

from edgefleet.errors import PackageError

__all__ = [
    "DELTA_SUFFIX",
    "MAX_DELTA_INPUT",
    "apply_delta",
    "delta_custom",
    "delta_target_name",
    "make_delta",
]

DELTA_SUFFIX = ".efdelta"
# zstd's largest window is 2 GiB (window_log 31): the old package (the dictionary) and the new one must fit in it
MAX_DELTA_INPUT = 1 << 31
# A binary-tree match finder: the faster strategies index at most the last 16 MiB of a dictionary, which would leave
# most of a larger package unseen (and the delta as big as the package).
_LEVEL = 15
_STRATEGY = zstandard.STRATEGY_BTLAZY2
_SEARCH_LOG = 3  # fewer candidates per position: publishing a 30 MB delta takes seconds, not tens of seconds


def delta_target_name(name: str, from_version: str, to_version: str) -> str:
    """The TUF target a delta is published as: ``<name>-<from>-to-<to>.efdelta``."""
    return f"{name}-{from_version}-to-{to_version}{DELTA_SUFFIX}"


def delta_custom(
    *, name: str, from_version: str, to_version: str, base_sha256: str, target: str, target_sha256: str
) -> dict[str, Any]:
    """The delta target's signed custom field: what it turns into what, so a device picks it without downloading.
    ``base_sha256`` is the whole old package file's SHA-256; ``target`` names the full package it yields."""
    return {
        "delta": {
            "name": name,
            "from_version": from_version,
            "to_version": to_version,
            "base_sha256": base_sha256,
            "target": target,
            "target_sha256": target_sha256,
            "format": "zstd-patch",
        }
    }


def _window_log(old: int, new: int) -> int:
    return max(10, min(31, (old + new).bit_length()))


def make_delta(old: bytes, new: bytes) -> bytes:
    """A zstd frame that rebuilds ``new`` from ``old`` (:func:`apply_delta`). The frame records ``new``'s size and
    a checksum of it."""
    if len(old) + len(new) > MAX_DELTA_INPUT:
        raise PackageError(
            f"packages of {len(old):,} and {len(new):,} bytes are too large for a delta together (at most "
            f"{MAX_DELTA_INPUT:,}): publish without deltas"
        )
    params = zstandard.ZstdCompressionParameters.from_level(
        _LEVEL,
        source_size=len(new),
        dict_size=len(old),
        window_log=_window_log(len(old), len(new)),
        strategy=_STRATEGY,
        search_log=_SEARCH_LOG,
        write_content_size=1,
        write_checksum=1,
    )
    base = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(dict_data=base, compression_params=params).compress(new)


def apply_delta(old: bytes, delta: bytes, *, expected_length: int) -> bytes:
    """Rebuild the new package from ``old`` and ``delta``; :class:`PackageError` when the delta is not a zstd patch
    of ``expected_length`` bytes that applies to ``old``. The caller still checks the result against the full
    package's signed hash: a delta made from another base can decode to the wrong bytes."""
    try:
        frame = zstandard.get_frame_parameters(delta)
    except zstandard.ZstdError as err:
        raise PackageError(f"the delta is not a zstd frame: {err}")
    if frame.content_size != expected_length:
        # checked before decoding: a delta never makes the device write more than the signed length
        raise PackageError(f"the delta yields {frame.content_size} bytes, not the signed {expected_length}")
    if frame.window_size > MAX_DELTA_INPUT:
        raise PackageError(f"the delta asks for a {frame.window_size:,}-byte window (at most {MAX_DELTA_INPUT:,})")
    base = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    try:
        out = zstandard.ZstdDecompressor(dict_data=base, max_window_size=MAX_DELTA_INPUT).decompress(
            delta, max_output_size=expected_length
        )
    except zstandard.ZstdError as err:
        raise PackageError(f"the delta does not apply to the installed package: {err}")
    if len(out) != expected_length:
        raise PackageError(f"the delta yielded {len(out)} bytes, not the signed {expected_length}")
    return out
