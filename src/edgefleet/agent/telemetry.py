"""Per-interval telemetry windows: counts by outcome, a mergeable latency sketch, worker restarts and
crashes, CPU and RSS, the active version and served ``model_sha256``, drift summaries from the worker, and the
ground-truth feedback counted in it (``feedback.py``)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import psutil

from edgefleet.agent.feedback import ConfusionCounts
from edgefleet.protocol import TelemetryWindow
from edgefleet.telemetry.drift import DriftSummary
from edgefleet.telemetry.sketch import LatencySketch

__all__ = ["DRIFT_TIMEOUT_S", "WindowAccumulator", "cut_with_drift", "utcnow"]

log = logging.getLogger("edgefleet.agent")

DRIFT_TIMEOUT_S = 5.0  # a worker that cannot answer for its histograms in this time does not hold a window up


async def cut_with_drift(
    drift: Callable[[Callable[[], None]], Awaitable[list[DriftSummary]]],
    cut: Callable[[], TelemetryWindow],
    what: str,
) -> tuple[TelemetryWindow, list[DriftSummary]] | None:
    """A window with the drift histograms of exactly the inputs served in it (they reset there): ``drift`` (a
    backend's) calls its argument at the instant it takes the histograms, and the window's counts are ``cut`` then.
    None when no answer came in time: the caller closes the window now, its histograms (if any come) lost."""
    windows: list[TelemetryWindow] = []
    waiting = True

    def at_answer() -> None:
        if waiting and not windows:
            windows.append(cut())

    summaries: list[DriftSummary] = []
    try:
        summaries = await asyncio.wait_for(drift(at_answer), DRIFT_TIMEOUT_S)
    except asyncio.CancelledError:
        raise
    except Exception as err:
        log.warning("%s without drift: %s: %s", what, type(err).__name__, err)
    finally:
        waiting = False
    return (windows[0], summaries) if windows else None


def utcnow() -> datetime:
    return datetime.now(UTC)


class WindowAccumulator:
    """Collects one window in memory; :meth:`close` returns it and starts the next."""

    def __init__(self, now: Callable[[], datetime] = utcnow) -> None:
        self._now = now  # the agent's clock (wall time, UTC), so an injected one dates its windows
        self.start = now()
        self.requests = 0
        self.errors: dict[str, int] = {}
        self.sketch = LatencySketch()
        self.feedback = ConfusionCounts()
        self.remote_requests = 0  # hybrid routing: answered by the remote endpoint (not in requests)
        self.remote_unsent = 0  # wanted remote, not sent: budget spent, timeout, unreachable, refused
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)  # primes the CPU counter: the first reading is relative to this call

    def observe(self, outcome: str, seconds: float | None) -> None:
        self.requests += 1
        if outcome != "ok":
            self.errors[outcome] = self.errors.get(outcome, 0) + 1
        elif seconds is not None:
            self.sketch.add(seconds)

    def observe_feedback(self, predicted: str | None, label: str) -> None:
        self.feedback.add(predicted, label)

    def close(
        self,
        *,
        model: str | None,
        version: str | None,
        model_sha256: str | None,
        restarts: int,
        crashes: int,
        worker_rss: int | None,
        drift: list[DriftSummary],
    ) -> TelemetryWindow:
        end = max(self._now(), self.start)  # a clock stepped back (NTP) must not make a window end before it starts
        rss = int(self._proc.memory_info().rss) + (worker_rss or 0)
        w = TelemetryWindow(
            window_id=uuid.uuid4().hex,
            start=self.start,
            end=end,
            model=model,
            version=version,
            model_sha256=model_sha256,
            requests=self.requests,
            errors=dict(self.errors),
            latency=self.sketch.to_data(),
            worker_restarts=restarts,
            worker_crashes=crashes,
            cpu_percent=float(self._proc.cpu_percent(None)),
            rss_bytes=rss,
            drift=drift,
            feedback=self.feedback.summary(),
            remote_requests=self.remote_requests,
            remote_unsent=self.remote_unsent,
        )
        self.remote_requests = self.remote_unsent = 0
        self.feedback = ConfusionCounts()
        self.start = end
        self.requests = 0
        self.errors = {}
        self.sketch = LatencySketch()
        return w
