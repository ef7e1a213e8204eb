"""Field accuracy: the ground truth applications report for served requests (docs/operations.md, "Field accuracy"),
summed per version × tier.

Each telemetry window carries the feedback counted in it (``protocol.FieldFeedback``: matched, correct and
unmatched counts and (predicted, label) pair counts). Its raw form is kept on the window's row (the rollout judge
reads it per window, ``reconciler.window_facts``); here it is summed per 5-minute bucket × model × version × tier
× stripe like the telemetry rollups (``rollups.py``, docs/adr/0042): counts added by the database under the row's
lock, the confusion counts merged into it. ``rows`` reads a period for the API, the KPIs and the dashboard.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, select, update
from sqlalchemy.orm import Session

from edgefleet.controlplane.db import Device, FieldAccuracyRollup
from edgefleet.controlplane.rollups import Key, add_counts, bucket_of, stripe_of, sums_since

__all__ = ["MAX_ROLLUP_CELLS", "Confusion", "FieldTotals", "accuracy", "add_windows", "merge_confusion", "read", "rows"]

# Distinct (predicted, label) pairs one rollup row keeps: every device bounds its own window's, but a fleet could
# name more between them. Pairs past the bound still count in matched and correct.
MAX_ROLLUP_CELLS = 4096

_T: Table = FieldAccuracyRollup.__table__  # type: ignore[assignment]  # a declarative class's table is a Table

Confusion = dict[str, dict[str, int]]  # predicted → label → count


def accuracy(correct: int, matched: int) -> float | None:
    """Correct over matched feedback; None (missing, never 0) without any."""
    return correct / matched if matched else None


def _cells(c: Mapping[str, Any]) -> int:
    return sum(len(v) for v in c.values() if isinstance(v, Mapping))


def merge_confusion(into: Confusion, other: Mapping[str, Any], limit: int = MAX_ROLLUP_CELLS) -> None:
    """Add ``other``'s pair counts to ``into``; a pair new to ``into`` is kept only while it holds fewer than
    ``limit`` pairs."""
    size = _cells(into)
    for predicted, by_label in other.items():
        if not isinstance(by_label, Mapping):
            continue
        mine = into.get(predicted)
        for label, n in by_label.items():
            if mine is not None and label in mine:
                mine[label] += int(n)
            elif size < limit:
                if mine is None:
                    mine = into[predicted] = {}
                mine[label] = int(n)
                size += 1


@dataclass
class FieldTotals:
    """Feedback of one model × version × tier (or one window, one cohort)."""

    matched: int = 0
    correct: int = 0
    unmatched: int = 0
    confusion: Confusion = field(default_factory=dict)

    def add_feedback(self, fb: Any) -> None:
        """Add a window's feedback: ``protocol.FieldFeedback`` or its stored JSON."""
        doc = fb.model_dump() if hasattr(fb, "model_dump") else fb
        self.matched += int(doc.get("matched", 0))
        self.correct += int(doc.get("correct", 0))
        self.unmatched += int(doc.get("unmatched", 0))
        pairs: Confusion = {}
        for cell in doc.get("confusion", ()):
            pairs.setdefault(str(cell["predicted"]), {})[str(cell["label"])] = int(cell["count"])
        merge_confusion(self.confusion, pairs)

    @property
    def accuracy(self) -> float | None:
        return accuracy(self.correct, self.matched)


def _upsert(conn: Session | Connection, key: Key, d: FieldTotals) -> None:
    counts = {"matched": d.matched, "correct": d.correct, "unmatched": d.unmatched}
    where = add_counts(conn, _T, key, counts, {"confusion": {}})
    if not d.confusion:
        return
    # the upsert above holds this row's lock until commit: nobody else merges into it in between
    stored = conn.execute(select(_T.c.confusion).where(*where)).scalar_one()
    merged: Confusion = {}
    merge_confusion(merged, stored or {})
    merge_confusion(merged, d.confusion)
    conn.execute(update(_T).where(*where).values(confusion=merged))


def add_windows(s: Session, d: Device, windows: Iterable[Any], now: datetime) -> None:
    """Add the feedback of a report's new windows (``protocol.TelemetryWindow``) of device ``d``, received at
    ``now``, in the transaction that stores them (so a retried window counts once), rows in key order."""
    deltas: dict[Key, FieldTotals] = {}
    for w in windows:
        if w.feedback is None:
            continue
        key: Key = (bucket_of(now), w.model or "", w.version or "", d.tier, stripe_of(d.id))
        deltas.setdefault(key, FieldTotals()).add_feedback(w.feedback)
    for key in sorted(deltas):
        _upsert(s, key, deltas[key])


def read(s: Session, since: datetime) -> dict[tuple[str, str, str], FieldTotals]:
    """Totals per (model, version, tier) of every bucket from the one ``since`` falls in."""
    sums = sums_since(s, _T, since, "matched", "correct", "unmatched")
    out = {k: FieldTotals(matched=m, correct=c, unmatched=u) for k, (m, c, u) in sums.items()}
    rows = select(_T.c.model, _T.c.version, _T.c.tier, _T.c.confusion).where(_T.c.bucket >= bucket_of(since))
    for model, version, tier, confusion in s.execute(rows):
        t = out.get((model, version, tier))
        if t is not None and confusion:
            merge_confusion(t.confusion, confusion)
    return out


def rows(s: Session, since: datetime, *, top: int = 20) -> list[dict[str, Any]]:
    """Field accuracy per model × version × tier over the period (``accuracy`` None: no matched feedback), with its
    ``top`` most frequent wrong (predicted, label) pairs."""
    out = []
    for (m, v, t), x in sorted(read(s, since).items()):
        wrong = sorted(
            ((n, p, lab) for p, by in x.confusion.items() for lab, n in by.items() if p != lab),
            key=lambda e: (-e[0], e[1], e[2]),
        )
        acc = x.accuracy
        out.append(
            {
                "model": m or "-",
                "version": v or "-",
                "tier": t,
                "matched": x.matched,
                "correct": x.correct,
                "unmatched": x.unmatched,
                "accuracy": None if acc is None else round(acc, 5),
                "confusions": [{"predicted": p, "label": lab, "count": n} for n, p, lab in wrong[:top]],
            }
        )
    return out
