"""Input sampling's worker side (docs/operations.md, "Input sampling"; the agent's side is ``agent/sampling.py``).

After a request is answered (never before: sampling never delays an answer), :class:`WorkerSampler` keeps a copy
of the inputs when :class:`RateLimiter` admits one and ships what it kept to the agent in ``("samples", …)``
frames. The worker only copies arrays: the sealing is the agent's, so this module imports the standard library,
numpy and the frames, nothing else (the lean worker imports it when sampling is on).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edgefleet.agent.frames import encode

__all__ = ["MAX_PLAIN_BYTES", "SHIP_AFTER_S", "SHIP_BATCH", "RateLimiter", "WorkerSampler"]

SHIP_AFTER_S = 1.0
SHIP_BATCH = 8
MAX_PLAIN_BYTES = 1024 * 1024  # protocol.MAX_SAMPLE_BYTES (the lean worker does not import the protocol)


class RateLimiter:
    """Admits at most ``per_min`` events in any minute, evenly: each one at least ``60 / per_min`` seconds after
    the last admitted (so any 60-second window holds at most ``per_min``). ``per_min`` of 0 admits nothing."""

    def __init__(self, per_min: float) -> None:
        self.interval = 60.0 / per_min if per_min > 0 else math.inf
        self.last: float | None = None

    def allow(self, now: float) -> bool:
        if math.isinf(self.interval):
            return False
        if self.last is not None and now - self.last < self.interval:
            return False
        self.last = now
        return True


class WorkerSampler:
    """The worker's side: ``observe(feeds)`` after each answered request; ``ship()`` sends what is waiting."""

    def __init__(
        self,
        send: Callable[[bytes], Any],
        per_min: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        max_bytes: int = MAX_PLAIN_BYTES,
    ) -> None:
        self.send = send
        self.limiter = RateLimiter(per_min)
        self.clock = clock
        self.wall = wall
        self.max_bytes = max_bytes
        self.pending: list[tuple[float, dict[str, np.ndarray]]] = []
        self.ship_at = 0.0

    def observe(self, feeds: Mapping[str, Any]) -> None:
        now = self.clock()
        if self.pending and now >= self.ship_at:
            self.ship()
        # a larger input is never sampled, and takes no turn from one that fits
        if sum(int(getattr(a, "nbytes", 0)) for a in feeds.values()) > self.max_bytes:
            return
        if not self.limiter.allow(now):
            return
        if not self.pending:
            self.ship_at = now + SHIP_AFTER_S
        # a copy: the request's buffers (an HTTP body, a shared memory region) are the caller's to reuse
        self.pending.append((self.wall(), {str(k): np.array(v, copy=True) for k, v in feeds.items()}))
        if len(self.pending) >= SHIP_BATCH:
            self.ship()

    def ship(self) -> None:
        if self.pending:
            batch, self.pending = self.pending, []
            self.send(encode(("samples", batch)))
