"""Memory budget and peak RSS of the measurement subprocess (tier emulation).

``RLIMIT_DATA`` bounds the heap and private anonymous mappings (Linux ≥ 4.7), which is where onnxruntime puts
weights and arenas; ``RLIMIT_AS`` is useless here because importing onnxruntime alone maps ~190 MB of address
space (measured). The limit is a backstop: the authoritative figure is the peak RSS, compared with the tier's
memory after the run, so a model that slips past the limit through file-backed pages still fails the budget.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

__all__ = ["MB", "current_rss_mb", "peak_rss_mb", "rusage_maxrss_mb", "set_data_limit"]

MB = 1024 * 1024


def _status_kb(field: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return None


def rusage_maxrss_mb(ru_maxrss: int) -> float:
    """``ru_maxrss`` in MB: kilobytes on Linux, bytes on macOS."""
    return ru_maxrss / MB if sys.platform == "darwin" else ru_maxrss / 1024


def current_rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    import psutil

    return float(psutil.Process().memory_info().rss) / MB


def peak_rss_mb() -> float:
    """This process's peak resident set (``VmHWM``; ``ru_maxrss`` where /proc does not exist)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    return rusage_maxrss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def set_data_limit(memory_mb: int) -> bool:
    """Cap this process's data segment at ``memory_mb``; False where the host refuses (then only the peak-RSS
    check applies)."""
    limit = int(memory_mb) * MB
    try:
        _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY and hard < limit:
            limit = hard
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    except (ValueError, OSError):
        return False
    return True
