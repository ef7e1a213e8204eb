"""Probation after a switch: pure decisions over what was observed, no I/O.

Probation ends after ``probation_requests`` inferences or ``probation_seconds``, whichever comes first. At any
time, K worker crashes within W seconds roll back (a crash loop). At the end, an error rate above the limit or a
p95 over the budget rolls back; otherwise the candidate is committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from edgefleet.protocol import DeviceConfig

__all__ = ["Decision", "ProbationStats", "crash_loop", "decide", "latency_budget_ms"]

# Outcomes that count against the model; a client's malformed request does not.
MODEL_FAULTS = frozenset({"model_error", "unavailable"})
_FAULT_WORDS = {"model_error": "the model failed the request", "unavailable": "no worker to answer"}


@dataclass(frozen=True)
class Decision:
    action: Literal["continue", "commit", "rollback"]
    reason: str = ""


@dataclass
class ProbationStats:
    started: float
    requests: int = 0
    faults: int = 0
    fault_kinds: dict[str, int] = field(default_factory=dict)  # what the faults were: the reason names them
    latencies: list[float] = field(default_factory=list)
    crash_times: list[float] = field(default_factory=list)

    def observe(self, outcome: str, seconds: float | None) -> None:
        self.requests += 1
        if outcome in MODEL_FAULTS:
            self.faults += 1
            self.fault_kinds[outcome] = self.fault_kinds.get(outcome, 0) + 1
        elif outcome == "ok" and seconds is not None and len(self.latencies) < 100_000:
            self.latencies.append(seconds)


def crash_loop(crash_times: list[float], now: float, k: int, window_s: float) -> bool:
    return sum(1 for t in crash_times if now - t <= window_s) >= k


def latency_budget_ms(metrics: dict[str, object], tier: str | None, config_budget_ms: float | None) -> float | None:
    """The p95 budget: the configuration's if set, else the manifest's ``metrics.latency_p95_ms`` (a number, or a
    map by tier)."""
    if config_budget_ms is not None:
        return config_budget_ms
    value = metrics.get("latency_p95_ms")
    if isinstance(value, dict):
        value = value.get(tier or "", value.get("default"))
    return float(value) if isinstance(value, int | float) and value > 0 else None


def decide(cfg: DeviceConfig, stats: ProbationStats, now: float, budget_ms: float | None) -> Decision:
    if crash_loop(stats.crash_times, now, cfg.crash_loop_crashes, cfg.crash_loop_window_s):
        return Decision(
            "rollback",
            f"crash loop: {cfg.crash_loop_crashes} worker crashes within {cfg.crash_loop_window_s:g} s",
        )
    elapsed = now - stats.started
    if stats.requests < cfg.probation_requests and elapsed < cfg.probation_seconds:
        return Decision("continue")
    if stats.requests:
        rate = stats.faults / stats.requests
        if rate > cfg.max_error_rate:
            return Decision(
                "rollback",
                f"error rate {rate:.1%} over {stats.requests} requests exceeds {cfg.max_error_rate:.1%} ("
                + ", ".join(f"{_FAULT_WORDS.get(k, k)}: {n}" for k, n in sorted(stats.fault_kinds.items()))
                + ")",
            )
    if budget_ms is not None and stats.latencies:
        p95 = float(np.percentile(stats.latencies, 95)) * 1000
        if p95 > budget_ms:
            return Decision("rollback", f"p95 latency {p95:.2f} ms exceeds the budget of {budget_ms:g} ms")
    return Decision("commit", f"{stats.requests} requests in {elapsed:.1f} s within limits")
