"""Statistics for latency measurements. Pure functions, no I/O, no clocks.

The same model's median moves ±25 % between processes on a busy host and an A/A test with thousands of pairs
comes out "significant" ~1 % of the time, so comparisons here are *paired* (baseline and candidate interleaved in
one process, one ratio per pair), report the median ratio with a bootstrap CI, and apply a *practical* threshold:

* ``slower``  when the CI's lower bound exceeds ``1 + slower_threshold`` (default 0.05);
* ``faster``  when the CI's upper bound is below ``1 - faster_threshold`` (default 0.03);
* ``same``    otherwise (no practical difference);
* ``inconclusive`` below ``min_pairs`` pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "PairedComparison",
    "QuantileEstimate",
    "beta_cdf",
    "beta_ppf",
    "bootstrap_median_ci",
    "clopper_pearson",
    "mann_whitney_greater",
    "paired_compare",
    "quantile_ci",
    "quantiles_with_ci",
]

Verdict = Literal["slower", "faster", "same", "inconclusive"]
DEFAULT_QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)


@dataclass(frozen=True)
class PairedComparison:
    n_pairs: int
    median_ratio: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float
    slower_threshold: float
    faster_threshold: float
    verdict: Verdict
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QuantileEstimate:
    q: float
    value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int

    @property
    def relative_half_width(self) -> float | None:
        if self.value is None or self.ci_low is None or self.ci_high is None or self.value <= 0:
            return None
        return (self.ci_high - self.ci_low) / 2 / self.value

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["relative_half_width"] = self.relative_half_width
        return d


def _z(confidence: float) -> float:
    # Two-sided normal quantile by bisection on erf: avoids a scipy runtime dependency.
    target = confidence
    lo, hi = 0.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if math.erf(mid / math.sqrt(2)) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def quantile_ci(samples: Sequence[float] | np.ndarray, q: float, confidence: float = 0.95) -> QuantileEstimate:
    """Distribution-free CI of the ``q`` quantile from order statistics (normal approximation of the binomial
    ranks). ``value``/bounds are ``None`` when the sample cannot support the quantile (e.g. p99.9 from 200 runs)."""
    x = np.sort(np.asarray(samples, dtype=np.float64))
    n = int(x.size)
    if n == 0:
        return QuantileEstimate(q, None, None, None, 0)
    value = float(np.quantile(x, q))
    z = _z(confidence)
    half = z * math.sqrt(n * q * (1 - q))
    lo_rank = math.floor(n * q - half)
    hi_rank = math.ceil(n * q + half)
    if lo_rank < 0 or hi_rank > n - 1:
        return QuantileEstimate(q, value, None, None, n)
    return QuantileEstimate(q, value, float(x[lo_rank]), float(x[hi_rank]), n)


def quantiles_with_ci(
    samples: Sequence[float] | np.ndarray, qs: Sequence[float] = DEFAULT_QUANTILES, confidence: float = 0.95
) -> list[QuantileEstimate]:
    return [quantile_ci(samples, q, confidence) for q in qs]


def bootstrap_median_ci(
    values: np.ndarray, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Median and its percentile-bootstrap CI. Resamples in chunks to bound memory on long runs."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    meds = np.empty(n_boot)
    chunk = max(1, 2_000_000 // max(v.size, 1))
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, v.size, size=(stop - start, v.size))
        meds[start:stop] = np.median(v[idx], axis=1)
    alpha = (1 - confidence) / 2
    return float(np.median(v)), float(np.quantile(meds, alpha)), float(np.quantile(meds, 1 - alpha))


def paired_compare(
    baseline: Sequence[float] | np.ndarray,
    candidate: Sequence[float] | np.ndarray,
    *,
    slower_threshold: float = 0.05,
    faster_threshold: float = 0.03,
    confidence: float = 0.95,
    min_pairs: int = 30,
    n_boot: int = 2000,
    seed: int = 0,
) -> PairedComparison:
    """Compare interleaved timings: ``baseline[i]`` and ``candidate[i]`` were measured back to back."""
    b = np.asarray(baseline, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    if b.shape != c.shape:
        raise ValueError(f"paired samples differ in length ({b.size} vs {c.size})")
    keep = (b > 0) & (c > 0) & np.isfinite(b) & np.isfinite(c)
    b, c = b[keep], c[keep]
    n = int(b.size)
    common = dict(confidence=confidence, slower_threshold=slower_threshold, faster_threshold=faster_threshold)
    if n < min_pairs:
        return PairedComparison(
            n, None, None, None, verdict="inconclusive", reason=f"{n} pairs < minimum {min_pairs}", **common
        )
    med, lo, hi = bootstrap_median_ci(c / b, confidence, n_boot, seed)
    ci = f"median ratio {med:.3f} (CI {lo:.3f}–{hi:.3f}, {n} pairs)"
    if lo > 1 + slower_threshold:
        verdict: Verdict = "slower"
        reason = f"{ci}: lower bound above {1 + slower_threshold:.2f}"
    elif hi < 1 - faster_threshold:
        verdict = "faster"
        reason = f"{ci}: upper bound below {1 - faster_threshold:.2f}"
    else:
        verdict = "same"
        reason = f"{ci}: no practical difference"
    return PairedComparison(n, med, lo, hi, verdict=verdict, reason=reason, **common)


def _betacf(a: float, b: float, x: float) -> float:
    # Continued fraction of the regularized incomplete beta (modified Lentz), as in Numerical Recipes §6.4.
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b): the CDF of Beta(a, b) at ``x``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    # The continued fraction converges fast only left of the mean; use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def beta_ppf(p: float, a: float, b: float) -> float:
    """Quantile of Beta(a, b) by bisection on :func:`beta_cdf` (no scipy at runtime)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability {p} outside [0, 1]")
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if beta_cdf(mid, a, b) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-14:
            break
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided CI of a binomial proportion ``k / n``: the false-alarm and detection
    rates of ``benchmarks/bench_stats.py`` are reported with it."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0 (got k={k}, n={n})")
    alpha = 1.0 - confidence
    low = 0.0 if k == 0 else beta_ppf(alpha / 2, k, n - k + 1)
    high = 1.0 if k == n else beta_ppf(1 - alpha / 2, k + 1, n - k)
    return low, high


def mann_whitney_greater(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """One-sided p-value that ``x`` is stochastically greater than ``y`` (Mann–Whitney U, normal approximation
    with tie correction and continuity correction; no scipy at runtime). 1.0 when either sample is empty.

    A rank test over *units* (a device's telemetry window, say) asks whether the typical unit moved, so a few units
    hit by a burst of host contention cannot make a difference significant the way they move a pooled tail."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    n1, n2 = a.size, b.size
    if n1 == 0 or n2 == 0:
        return 1.0
    both = np.concatenate([a, b])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(both.size, dtype=np.float64)
    sorted_vals = both[order]
    # average ranks over ties
    i = 0
    ties = 0.0
    while i < both.size:
        j = i
        while j + 1 < both.size and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        t = j - i + 1
        ties += t**3 - t
        i = j + 1
    u = float(ranks[:n1].sum()) - n1 * (n1 + 1) / 2.0
    n = n1 + n2
    var = n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1)))
    if var <= 0:
        return 1.0  # every value equal: nothing moved
    z = (u - n1 * n2 / 2.0 - 0.5) / math.sqrt(var)
    return 0.5 * math.erfc(z / math.sqrt(2))
