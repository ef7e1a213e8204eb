"""The agent's recent log lines, kept in memory for an operator who asks for them (remote diagnostics).

A bounded ring (:data:`KEEP` lines) on the ``edgefleet`` logger; nothing is written to disk and nothing leaves
the device unless the control plane asks (``DesiredState.send_logs_since``) and the device's group consents
(``DeviceConfig.remote_logs``, checked on both sides). Secrets are scrubbed on the way out: the device's own
credential and enrollment token wherever they appear, and any ``Bearer`` token.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from edgefleet.protocol import MAX_LOG_LINES

__all__ = ["KEEP", "LogRing", "scrub"]

KEEP = 5000  # lines kept in memory: about 1 MB at most
_LINE_MAX = 2000  # what the wire takes per line
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")
SCRUBBED = "[scrubbed]"


def scrub(line: str, secrets: Iterable[str]) -> str:
    """``line`` without any of ``secrets`` (each at least 8 characters: a short one would blank ordinary words)
    and without ``Bearer`` tokens."""
    for secret in secrets:
        if len(secret) >= 8:
            line = line.replace(secret, SCRUBBED)
    return _BEARER.sub(r"\1" + SCRUBBED, line)


class LogRing(logging.Handler):
    def __init__(self, secrets: Callable[[], Iterable[str]], keep: int = KEEP) -> None:
        super().__init__(level=logging.DEBUG)
        self._lines: deque[tuple[float, str]] = deque(maxlen=keep)
        self._secrets = secrets

    def emit(self, record: logging.LogRecord) -> None:
        try:
            at = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            self._lines.append((record.created, f"{at} {record.levelname} {record.name}: {record.getMessage()}"))
        except Exception:  # a log line that cannot be formatted must not break the code that logged it
            self.handleError(record)

    def since(self, t: datetime) -> tuple[list[str], int]:
        """The lines logged at or after ``t``, oldest first, scrubbed: the newest :data:`MAX_LOG_LINES` of them,
        and how many older ones were left out."""
        cutoff = t.timestamp()
        lines = [line for created, line in list(self._lines) if created >= cutoff]
        dropped = max(0, len(lines) - MAX_LOG_LINES)
        secrets = [s for s in self._secrets() if s]
        return [scrub(line, secrets)[:_LINE_MAX] for line in lines[dropped:]], dropped
