"""Shadow evaluation's worker side (docs/adr/0107-shadow-evaluation.md; the agent's side is ``agent/shadow.py``).

After a request is answered (never before: mirroring never delays an answer), :class:`WorkerMirror` keeps a copy
of its inputs with the served outputs, at most ``per_s`` a second (evenly spaced), and ships what it kept to the
agent in ``("mirror", [(inputs, outputs), ...])`` frames: every :data:`SHIP_AFTER_S` seconds or
:data:`SHIP_BATCH` requests, and before every drift answer (each telemetry window) or stop. The agent runs the
candidate on them in a second worker and compares. Inputs never leave the device: they go from this process to
the agent's and on to the candidate's, and only counts are reported. Standard library, numpy and the frames only
(the lean worker imports it when a shadow phase runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edgefleet.agent.frames import encode

__all__ = ["MAX_MIRROR_BYTES", "SHIP_AFTER_S", "SHIP_BATCH", "WorkerMirror"]

SHIP_AFTER_S = 0.1
SHIP_BATCH = 16
MAX_MIRROR_BYTES = 1024 * 1024  # a larger request is not mirrored (and takes no turn from one that fits)


class WorkerMirror:
    """``observe(feeds, outputs)`` after each answered request; ``ship()`` sends what is waiting."""

    def __init__(
        self,
        send: Callable[[bytes], Any],
        per_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int = MAX_MIRROR_BYTES,
    ) -> None:
        self.send = send
        self.interval = 1.0 / per_s if per_s > 0 else float("inf")
        self.clock = clock
        self.max_bytes = max_bytes
        self.last: float | None = None
        self.pending: list[tuple[dict[str, np.ndarray], dict[str, Any]]] = []
        self.ship_at = 0.0

    def observe(self, feeds: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        now = self.clock()
        if self.pending and now >= self.ship_at:
            self.ship()
        if self.last is not None and now - self.last < self.interval:
            return
        if sum(int(getattr(a, "nbytes", 0)) for a in feeds.values()) > self.max_bytes:
            return
        self.last = now
        if not self.pending:
            self.ship_at = now + SHIP_AFTER_S
        # the inputs are copied (an HTTP body, a shared memory region are the caller's to reuse); the outputs are
        # the runtime's fresh arrays, which nothing writes to after the answer
        kept = {str(k): np.array(v, copy=True) for k, v in feeds.items()}
        self.pending.append((kept, {str(k): v for k, v in outputs.items() if isinstance(v, np.ndarray)}))
        if len(self.pending) >= SHIP_BATCH:
            self.ship()

    def ship(self) -> None:
        if self.pending:
            batch, self.pending = self.pending, []
            self.send(encode(("mirror", batch)))
