"""Interleaved A/B timing in one process: the measuring side of ``stats.paired_compare``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgefleet.bench.stats import PairedComparison, paired_compare

__all__ = ["PairedRun", "time_paired"]


@dataclass(frozen=True)
class PairedRun:
    baseline_s: np.ndarray
    candidate_s: np.ndarray
    comparison: PairedComparison
    stopped_by: str  # "precision" | "max_pairs" | "time_budget"


def time_paired(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    *,
    warmup: int = 10,
    min_pairs: int = 200,
    max_pairs: int = 20_000,
    time_budget_s: float = 10.0,
    check_every: int = 200,
    slower_threshold: float = 0.05,
    faster_threshold: float = 0.03,
    clock: Callable[[], float] = time.perf_counter,
) -> PairedRun:
    """Alternate the order within each pair (AB, BA, ...) so neither arm always runs on a warmer cache.

    Stops when the verdict is decided with a CI narrower than the thresholds allow to flip it, at ``max_pairs``,
    or at ``time_budget_s`` (warm-up excluded; checked after every pair, so also before ``min_pairs``);
    ``stopped_by`` says which."""
    for _ in range(warmup):
        baseline()
        candidate()
    b: list[float] = []
    c: list[float] = []
    start = clock()
    stopped_by = "max_pairs"
    i = 0
    while i < max_pairs:
        if i % 2 == 0:
            t0 = clock()
            baseline()
            t1 = clock()
            candidate()
            t2 = clock()
            b.append(t1 - t0)
            c.append(t2 - t1)
        else:
            t0 = clock()
            candidate()
            t1 = clock()
            baseline()
            t2 = clock()
            c.append(t1 - t0)
            b.append(t2 - t1)
        i += 1
        # The budget holds from the first pair on, before ``min_pairs`` too: with a slow model 300 pairs can take
        # several times the budget. Stopped short, the comparison says so itself (inconclusive under its minimum
        # of pairs, else a CI as wide as the pairs allow).
        if clock() - start > time_budget_s:
            stopped_by = "time_budget"
            break
        if i >= min_pairs and i % check_every == 0:
            cmp = paired_compare(b, c, slower_threshold=slower_threshold, faster_threshold=faster_threshold, n_boot=500)
            if cmp.ci_low is not None and cmp.ci_high is not None and _decided(cmp):
                stopped_by = "precision"
                break
    comparison = paired_compare(b, c, slower_threshold=slower_threshold, faster_threshold=faster_threshold)
    return PairedRun(np.asarray(b), np.asarray(c), comparison, stopped_by)


def _decided(cmp: PairedComparison) -> bool:
    """The CI lies wholly on one side of each threshold, so more pairs would not change the verdict."""
    assert cmp.ci_low is not None and cmp.ci_high is not None
    up, down = 1 + cmp.slower_threshold, 1 - cmp.faster_threshold
    if cmp.verdict in ("slower", "faster"):
        return True
    return cmp.ci_low > down and cmp.ci_high < up
