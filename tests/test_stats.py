"""Pure tests of bench.stats and bench.paired on synthetic samples (no clocks, no models)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from edgefleet.bench.paired import time_paired
from edgefleet.bench.stats import (
    beta_cdf,
    bootstrap_median_ci,
    clopper_pearson,
    paired_compare,
    quantile_ci,
    quantiles_with_ci,
)


def _pairs(n: int, ratio: float, seed: int, tail: str = "lognormal") -> tuple[np.ndarray, np.ndarray]:
    """Latencies of two arms measured back to back: a shared per-pair load factor (the host's state) times
    independent per-call noise, candidate scaled by ``ratio``."""
    rng = np.random.default_rng(seed)
    load = rng.lognormal(0.0, 0.3, n)
    if tail == "lognormal":
        nb, nc = rng.lognormal(0, 0.1, n), rng.lognormal(0, 0.1, n)
    else:  # heavy tails: Pareto(1.5) spikes (infinite variance) on top of the noise
        nb = 1 + 0.05 * rng.pareto(1.5, n)
        nc = 1 + 0.05 * rng.pareto(1.5, n)
    return 1e-3 * load * nb, 1e-3 * ratio * load * nc


@pytest.mark.parametrize("tail", ["lognormal", "pareto"])
def test_aa_comparisons_say_same(tail: str) -> None:
    verdicts = [paired_compare(*_pairs(2000, 1.0, seed, tail), n_boot=300).verdict for seed in range(40)]
    assert verdicts.count("same") == 40


@pytest.mark.parametrize("tail", ["lognormal", "pareto"])
def test_thirty_percent_shift_is_slower(tail: str) -> None:
    for seed in range(20):
        cmp = paired_compare(*_pairs(500, 1.30, seed, tail), n_boot=300)
        assert cmp.verdict == "slower", cmp.reason
        assert cmp.median_ratio is not None and 1.25 < cmp.median_ratio < 1.35
        assert cmp.ci_low is not None and cmp.ci_high is not None and cmp.ci_low <= 1.30 <= cmp.ci_high + 0.02


def test_faster_and_small_changes() -> None:
    assert paired_compare(*_pairs(1000, 0.70, 1)).verdict == "faster"
    # A real but practically irrelevant 2 % slowdown stays "same": the threshold is practical, not statistical.
    assert paired_compare(*_pairs(20000, 1.02, 1), n_boot=200).verdict == "same"


def test_too_few_pairs_is_inconclusive() -> None:
    b, c = _pairs(10, 2.0, 0)
    cmp = paired_compare(b, c)
    assert cmp.verdict == "inconclusive" and cmp.median_ratio is None and "10 pairs" in cmp.reason


def test_bad_pairs_are_dropped_and_lengths_must_match() -> None:
    b, c = _pairs(100, 1.0, 0)
    b[:80] = 0.0  # non-positive timings cannot form a ratio
    assert paired_compare(b, c).verdict == "inconclusive"
    with pytest.raises(ValueError):
        paired_compare(b, c[:-1])


def test_quantile_ci_covers_the_true_quantile() -> None:
    # Exponential(1): the true p95 is -ln(0.05). A 95 % interval should cover it in roughly 95 % of samples.
    truth = -math.log(0.05)
    hits = 0
    for seed in range(300):
        est = quantile_ci(np.random.default_rng(seed).exponential(1.0, 1000), 0.95)
        assert est.ci_low is not None and est.ci_high is not None
        hits += est.ci_low <= truth <= est.ci_high
    assert 0.90 <= hits / 300 <= 0.99


def test_quantile_ci_refuses_what_the_sample_cannot_support() -> None:
    x = np.random.default_rng(0).exponential(1.0, 200)
    p999 = quantile_ci(x, 0.999)
    assert p999.value is not None and p999.ci_low is None and p999.relative_half_width is None
    assert quantile_ci([], 0.5).n == 0
    assert [e.q for e in quantiles_with_ci(x)] == [0.5, 0.9, 0.95, 0.99, 0.999]


def test_bootstrap_median_ci_brackets_the_median() -> None:
    med, lo, hi = bootstrap_median_ci(np.arange(1, 1002, dtype=float))
    assert lo < med == 501 < hi


def test_clopper_pearson_closed_forms() -> None:
    # k = 0 and k = n have closed forms: upper = 1 - (α/2)^(1/n), lower = (α/2)^(1/n).
    assert clopper_pearson(0, 100) == (0.0, pytest.approx(1 - 0.025 ** (1 / 100), rel=1e-9))
    assert clopper_pearson(100, 100) == (pytest.approx(0.025 ** (1 / 100), rel=1e-9), 1.0)
    lo, hi = clopper_pearson(50, 100)
    assert lo == pytest.approx(1 - hi, abs=1e-9)  # symmetric at p = 1/2
    with pytest.raises(ValueError):
        clopper_pearson(5, 3)


def test_clopper_pearson_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(1, 7), (3, 100), (97, 100), (199, 200), (12, 40)]:
        lo, hi = clopper_pearson(k, n)
        assert lo == pytest.approx(stats.beta.ppf(0.025, k, n - k + 1), rel=1e-7)
        assert hi == pytest.approx(stats.beta.ppf(0.975, k + 1, n - k), rel=1e-7)
    assert beta_cdf(0.3, 2.5, 4.0) == pytest.approx(stats.beta.cdf(0.3, 2.5, 4.0), rel=1e-9)


class _FakeClock:
    """A clock that the fake workloads advance: time_paired's control flow without real timing."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _workload(clock: _FakeClock, cost: float, seed: int) -> Callable[[], None]:
    rng = np.random.default_rng(seed)

    def run() -> None:
        clock.now += cost * rng.lognormal(0, 0.05)

    return run


def test_time_paired_stops_on_precision_and_detects_a_slowdown() -> None:
    clock = _FakeClock()
    run = time_paired(
        _workload(clock, 1e-3, 1),
        _workload(clock, 1.5e-3, 2),
        clock=clock,
        time_budget_s=1e9,
    )
    assert run.stopped_by == "precision"
    assert run.comparison.verdict == "slower"
    assert len(run.baseline_s) == len(run.candidate_s) == run.comparison.n_pairs


def test_time_paired_reports_the_time_budget() -> None:
    clock = _FakeClock()
    # 1.04x sits between "same" and "slower" with noise: the verdict cannot settle, the budget ends the run.
    run = time_paired(
        _workload(clock, 1.0, 3),
        _workload(clock, 1.045, 4),
        clock=clock,
        time_budget_s=600.0,
        min_pairs=200,
        check_every=100,
    )
    assert run.stopped_by == "time_budget"


def test_time_paired_keeps_its_budget_before_min_pairs() -> None:
    """A slow model (1 s a call here) cannot reach 300 pairs in a 10 s budget: the budget wins, and the comparison
    of the few pairs measured is inconclusive rather than a verdict."""
    clock = _FakeClock()
    run = time_paired(
        _workload(clock, 1.0, 5), _workload(clock, 0.5, 6), clock=clock, time_budget_s=10.0, min_pairs=300, warmup=2
    )
    assert run.stopped_by == "time_budget"
    assert len(run.baseline_s) <= 8, "stopped within one pair of the budget"
    assert run.comparison.verdict == "inconclusive"


def test_mann_whitney_greater_matches_scipy() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")  # scikit-learn's dependency; not a runtime one
    from edgefleet.bench.stats import mann_whitney_greater

    rng = np.random.default_rng(3)
    for shift in (0.0, 0.3, 1.0):
        x = rng.normal(shift, 1, 25).round(1)  # rounding makes ties
        y = rng.normal(0, 1, 18).round(1)
        want = scipy_stats.mannwhitneyu(x, y, alternative="greater", method="asymptotic").pvalue
        assert mann_whitney_greater(x, y) == pytest.approx(want, rel=1e-9)


def test_mann_whitney_greater_edge_cases() -> None:
    from edgefleet.bench.stats import mann_whitney_greater

    assert mann_whitney_greater([], [1.0]) == 1.0 and mann_whitney_greater([1.0, 1.0], [1.0]) == 1.0
    assert mann_whitney_greater([5, 6, 7, 8, 9], [1, 2, 3, 4, 5]) < 0.01
    assert mann_whitney_greater([1, 2, 3, 4, 5], [5, 6, 7, 8, 9]) > 0.99
    # a burst in a few units of an otherwise identical cohort is not a shift
    calm = [0.5, 0.55, 0.6, 0.52, 0.58, 0.61, 0.57, 0.54, 0.59, 0.56]
    assert mann_whitney_greater([*calm, 4.1, 3.2, 5.5], calm) > 0.05
