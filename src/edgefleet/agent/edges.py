"""The agent's edges, the points an embedding application, a simulator or a test injects
(:class:`~edgefleet.agent.agent.Agent`'s keyword-only parameters): the clock and the pre-switch health check here;
the backend factory (:mod:`edgefleet.agent.backend`) and the transport to the control plane and the TUF repository
(:mod:`edgefleet.agent.loopfetch`) beside them. Each default is what a device runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Protocol

from edgefleet.agent.healthcheck import HealthResult
from edgefleet.agent.worker.spec import ModelInfo, WorkerSpec

__all__ = ["Clock", "HealthCheck", "SystemClock"]

# health_check(spec, budget_ms_for) -> HealthResult: ``budget_ms_for(info)`` is the p95 budget in ms (None: none)
# once the package's metrics are known. The default starts a fresh worker process on the staged slot.
HealthCheck = Callable[[WorkerSpec, Callable[[ModelInfo], float | None]], Awaitable[HealthResult]]


class Clock(Protocol):
    """Where the agent reads time for its decisions (probation, retry back-off, outage length) and for what it
    reports (event and telemetry window times), and how its loops wait."""

    def now(self) -> datetime:
        """Wall time, timezone-aware (UTC): what reports carry."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never steps: what durations and deadlines are measured on."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (the check-in, telemetry and probation loops)."""
        ...


class SystemClock:
    """The machine's clocks and asyncio's sleep: the default."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
