"""Selection: pure decisions over evaluated candidates, no I/O.

Every ratio and drop is measured against the *input*: the user's model as given, loaded as the agent loads it.
A candidate — the prepared (graph-optimized) float model included — *qualifies* when it is within tolerance and
the paired comparison against the input calls it *faster*, twice; the output is the qualified candidate with the
lowest median latency ratio, else the input itself, byte for byte, with a reason that says why nothing qualified.

Screening (successive halving) is decided here too: a candidate is first scored on a subset of the eval calls, and
only one not *far* out of tolerance there is scored on every call (and only one within tolerance on every call is
timed). The full evaluation alone decides tolerance; screening only saves the time of hopeless candidates.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from edgefleet.optimize.report import CandidateReport, Status

__all__ = [
    "KEPT_INPUT",
    "MIN_SCREEN_CALLS",
    "CandidateLine",
    "candidate_line",
    "classify",
    "far_out_of_tolerance",
    "qualifies",
    "screen_indices",
    "select",
    "why_none",
]

KEPT_INPUT = "kept the input: no candidate was measured faster"
# Fewer screening calls than this say too little to refuse anything on.
MIN_SCREEN_CALLS = 16


def screen_indices(n_calls: int, *, prefix: bool = False) -> list[int] | None:
    """The eval calls a candidate is screened on: a quarter of them, at least :data:`MIN_SCREEN_CALLS`, evenly
    spaced (first and last included) — or the first ones with ``prefix`` (closed-loop streams: the first calls of
    every stream, each still fed its own previous state). None when that would be more than half the calls:
    screening would save too little to be worth a second pass."""
    k = max(MIN_SCREEN_CALLS, math.ceil(n_calls / 4))
    if 2 * k > n_calls:
        return None
    if prefix:
        return list(range(k))
    return sorted({round(i * (n_calls - 1) / (k - 1)) for i in range(k)})


def far_out_of_tolerance(
    baseline: float, candidate: float, max_drop: float, n_calls: int, metric: str = "the metric"
) -> str | None:
    """Why a candidate scoring ``candidate`` on ``n_calls`` screening calls (the input: ``baseline``) is hopeless,
    or None. Far means a drop over the tolerance by max(2 × the tolerance, 1/√n): a subset is a noisy estimate (a
    share over n calls moves in steps of 1/n and its error shrinks like 1/√n), and refusing a candidate that the
    full set would pass costs a possibly faster model, so only a wide miss is refused."""
    drop = baseline - candidate
    margin = max(2 * max_drop, 1 / math.sqrt(max(n_calls, 1)))
    if math.isfinite(candidate) and drop <= max_drop + margin:
        return None
    return f"screened out: {metric} drops {drop:.4f} on {n_calls} calls, far over the {max_drop} allowed"


class CandidateLine(str):
    """A progress message that reports one candidate's outcome: the CLI keeps every one as a line of its own."""


def candidate_line(c: CandidateReport, eval_calls: int) -> CandidateLine:
    """One line for people: what became of candidate ``c`` (evaluated, screened out, timed)."""
    parts = [c.name]
    m = c.metrics
    if c.status in ("failed", "no_op", "pruned", "skipped"):
        parts.append(f"{c.status.replace('_', ' ')}: {c.reason}")
    elif c.within_tolerance:
        parts.append(f"within tolerance ({m.metric} {m.overall:.4f})" if m else "within tolerance")
    else:
        parts.append(c.reason or "out of tolerance")
    if c.eval_calls is not None and c.eval_calls < eval_calls:
        parts.append(f"{c.eval_calls} of {eval_calls} calls")
    lat = c.latency
    if lat is not None and lat.median_ratio is not None:
        parts.append(f"latency ratio {lat.median_ratio:.3f} vs your input ({lat.verdict})")
    return CandidateLine(" · ".join(parts))


def classify(c: CandidateReport) -> tuple[Status, str]:
    """The status of an evaluated candidate (before selection): the first gate it fails, or ``qualified``."""
    if c.status in ("pruned", "failed", "no_op", "skipped", "baseline"):
        return c.status, c.reason
    if c.within_tolerance is not True:
        return "out_of_tolerance", c.reason
    if c.latency is None:
        return "skipped", c.reason or "time budget ran out before its latency was measured"
    if c.latency.verdict == "slower":
        return "slower", c.latency.reason
    if c.latency.verdict != "faster":
        return "not_faster", c.latency.reason
    if c.latency.confirmed is False:
        return "not_faster", "a second A/B did not confirm the speed-up"
    return "qualified", c.latency.reason


def qualifies(c: CandidateReport) -> bool:
    # The input is what the others are measured against; it is the output only by default, never by qualifying.
    return c.recipe.kind != "input" and classify(c)[0] == "qualified"


def select(candidates: Sequence[CandidateReport]) -> int | None:
    """Index of the fastest qualified candidate (lowest median ratio, then smaller model), or None: keep the input."""
    best: int | None = None
    for i, c in enumerate(candidates):
        if not qualifies(c):
            continue
        assert c.latency is not None and c.latency.median_ratio is not None
        key = (c.latency.median_ratio, c.size_bytes or 0)
        if best is None:
            best = i
            continue
        b = candidates[best]
        assert b.latency is not None and b.latency.median_ratio is not None
        if key < (b.latency.median_ratio, b.size_bytes or 0):
            best = i
    return best


def why_none(candidates: Sequence[CandidateReport]) -> str:
    """Why the input was kept, counted by the gate each candidate failed."""
    counts: Counter[str] = Counter(classify(c)[0] for c in candidates if c.recipe.kind != "input")
    order = ["out_of_tolerance", "slower", "not_faster", "no_op", "failed", "pruned", "skipped"]
    parts = [f"{counts[s]} {s.replace('_', ' ')}" for s in order if counts.get(s)]
    if not parts:
        return f"{KEPT_INPUT} (there were no candidates)"
    return f"{KEPT_INPUT} and within tolerance ({', '.join(parts)})"
