"""Worker crash reports, kept on the device and sent to the control plane when the device's group consents.

When the inference worker ends without being asked to, the supervisor hands over a :class:`WorkerExit`: how it
ended, what faulthandler wrote (the worker enables it on a file of its own, ``--fault-file``; a fatal signal such
as SIGSEGV or SIGABRT leaves the Python stacks of every thread there, SIGKILL leaves nothing), the worker's last
sampled RSS and the model it served. :func:`build_report` turns it into the wire's
:class:`~edgefleet.protocol.CrashReport` (pure: bounded, the device's secrets scrubbed); :class:`CrashStore`
keeps the newest :data:`KEEP` on disk, one file each, written atomically, until the control plane acknowledges
them (``POST /devices/{id}/crashes``, only while ``DeviceConfig.crash_reports`` is set — checked on both sides).
Without consent the reports stay on the device, bounded, and never leave it.
"""

from __future__ import annotations

import logging
import os
import signal as _signal
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from edgefleet._fs import atomic_write, fsync_dir
from edgefleet.agent.logring import scrub
from edgefleet.protocol import MAX_CRASH_REPORTS, MAX_FAULT_CHARS, CrashReport

__all__ = ["KEEP", "CrashStore", "WorkerExit", "build_report", "fault_tail", "read_fault", "signal_name"]

log = logging.getLogger("edgefleet.agent")

KEEP = MAX_CRASH_REPORTS
_SUFFIX = ".crash.json"
FAULT_SUFFIX = ".fault"


@dataclass(frozen=True)
class WorkerExit:
    """What the supervisor knows of a worker that ended on its own."""

    reason: str
    exit_code: int | None
    fault: str  # faulthandler's file, as read (bounded by the reader)
    rss_bytes: int | None
    rss_age_s: float | None
    uptime_s: float | None
    model: str | None = None
    version: str | None = None
    model_sha256: str | None = None


def signal_name(exit_code: int | None) -> str | None:
    """``SIGSEGV`` for a process a signal ended (a negative return code, as :mod:`subprocess` gives it)."""
    if exit_code is None or exit_code >= 0:
        return None
    try:
        return _signal.Signals(-exit_code).name
    except ValueError:
        return f"signal {-exit_code}"


def fault_tail(text: str, limit: int = MAX_FAULT_CHARS) -> tuple[str, int]:
    """The last ``limit`` characters of ``text`` (the innermost frames come last) and how many were cut."""
    if len(text) <= limit:
        return text, 0
    return text[-limit:], len(text) - limit


def build_report(
    ex: WorkerExit,
    *,
    at: datetime,
    agent_version: str | None,
    runtime_version: str | None,
    secrets: Iterable[str] = (),
    crash_id: str | None = None,
) -> CrashReport:
    """The report of ``ex`` as the wire takes it: every string within its bound, no NUL, secrets scrubbed."""
    keep = [s for s in secrets if s]
    fault, cut = fault_tail(scrub(ex.fault.replace("\x00", ""), keep))
    code = ex.exit_code if ex.exit_code is not None and -255 <= ex.exit_code <= 255 else None
    return CrashReport(
        crash_id=crash_id or uuid.uuid4().hex,
        at=at,
        reason=scrub(ex.reason.replace("\x00", ""), keep)[:2000] or "worker exited",
        exit_code=code,
        signal=signal_name(code),
        fault=fault,
        fault_dropped=cut,
        rss_bytes=ex.rss_bytes,
        rss_age_s=None if ex.rss_age_s is None else max(0.0, ex.rss_age_s),
        uptime_s=None if ex.uptime_s is None else max(0.0, ex.uptime_s),
        model=_cut(ex.model, 128),
        version=_cut(ex.version, 64),
        model_sha256=_cut(ex.model_sha256, 64),
        agent_version=_cut(agent_version, 64),
        runtime_version=_cut(runtime_version, 64),
    )


def _cut(text: str | None, n: int) -> str | None:
    return text.replace("\x00", "")[:n] or None if text else None


def read_fault(path: Path, limit: int = MAX_FAULT_CHARS) -> str:
    """What faulthandler wrote to ``path`` (its last ``4 * limit`` bytes at most), then the file is gone."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4 * limit))
            data = f.read()
    except OSError:
        return ""
    finally:
        path.unlink(missing_ok=True)
    return data.decode("utf-8", errors="replace")


class CrashStore:
    """The device's crash reports not yet acknowledged by the control plane: ``<folder>/<time>-<id>.crash.json``,
    the newest :data:`KEEP` (an older one is deleted when a new one comes). The folder also holds the workers'
    faulthandler files while they run."""

    def __init__(self, folder: Path, keep: int = KEEP) -> None:
        self.folder = folder
        self.keep = keep
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in folder.glob(f"*{FAULT_SUFFIX}"):
            # a worker of a previous agent run: it ended with that agent (EOF on its socket), not by crashing
            stale.unlink(missing_ok=True)

    def fault_file(self) -> Path:
        """A fresh file for one worker's faulthandler output."""
        return self.folder / f"worker-{uuid.uuid4().hex[:12]}{FAULT_SUFFIX}"

    def _files(self) -> list[Path]:
        return sorted(self.folder.glob(f"*{_SUFFIX}"))

    def add(self, report: CrashReport) -> None:
        stamp = report.at.strftime("%Y%m%dT%H%M%S%f")
        atomic_write(self.folder / f"{stamp}-{report.crash_id}{_SUFFIX}", report.model_dump_json().encode())
        files = self._files()
        old = files[: max(0, len(files) - self.keep)]
        for f in old:
            f.unlink(missing_ok=True)
        if old:
            fsync_dir(self.folder)
            log.warning("dropped %d older crash report(s): the device keeps the newest %d", len(old), self.keep)

    def pending(self) -> list[CrashReport]:
        """The reports kept, oldest first (a file the protocol refuses is deleted: it would never be taken)."""
        out = []
        for f in self._files():
            try:
                out.append(CrashReport.model_validate_json(f.read_bytes()))
            except (OSError, ValueError) as err:
                log.warning("deleting unreadable crash report %s: %s", f.name, " ".join(str(err).split())[:300])
                f.unlink(missing_ok=True)
        return out

    def forget(self, crash_ids: Iterable[str]) -> int:
        """Delete the reports the control plane acknowledged; returns how many."""
        ids = set(crash_ids)
        gone = [f for f in self._files() if f.name.removesuffix(_SUFFIX).split("-", 1)[-1] in ids]
        for f in gone:
            f.unlink(missing_ok=True)
        if gone:
            fsync_dir(self.folder)
        return len(gone)
