"""Selection: pure decisions over evaluated candidates, no I/O.

Every ratio and drop is measured against the *input*: the user's model as given, loaded as the agent loads it.
A candidate — the prepared (graph-optimized) float model included — *qualifies* when it is within tolerance and
the paired comparison against the input calls it *faster*, twice; the output is the qualified candidate with the
lowest median latency ratio, else the input itself, byte for byte, with a reason that says why nothing qualified.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from edgefleet.optimize.report import CandidateReport, Status

__all__ = ["KEPT_INPUT", "classify", "qualifies", "select", "why_none"]

KEPT_INPUT = "kept the input: no candidate was measured faster"


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
