"""Telemetry rollups: windows summed per 5-minute bucket × model × version × tier (docs/adr/0042).

A report's new windows are added to their buckets in the transaction that stores them (``add_windows``), so a
window the device retries is counted once, exactly as its raw row is. Counts are added by the database itself
(``INSERT .. ON CONFLICT DO UPDATE SET n = n + excluded.n``), which also locks the row; the latency sketch and the
drift bin counts are then merged into it under that lock. Rows are taken in one sorted order, so two reports never
wait on each other in a cycle. ``read`` sums the buckets of a period with SQL and merges their sketches: its cost
grows with versions × tiers × buckets, never with the number of devices.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import JSON, Connection, Integer, String, Table, column, func, select, table, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from edgefleet.controlplane.db import Device, TelemetryRollup, UTCDateTime
from edgefleet.telemetry.sketch import LatencySketch, SketchData

__all__ = [
    "BUCKET_S",
    "STRIPES",
    "Delta",
    "SketchSum",
    "Totals",
    "add_windows",
    "backfill",
    "bucket_of",
    "latency_points",
    "read",
    "stripe_of",
    "sums_since",
]

# 5 minutes: a 24-hour figure reads 288 buckets per version × tier and overshoots its period by at most 5 minutes;
# hourly buckets would overshoot a 1-hour dashboard period by up to 100 % (docs/adr/0042).
BUCKET_S = 300
# concurrent reports of one version and tier update one of this many rows, not all the same one
STRIPES = 4

_T: Table = TelemetryRollup.__table__  # type: ignore[assignment]  # a declarative class's table is a Table

Key = tuple[datetime, str, str, str, int]


def bucket_of(t: datetime) -> datetime:
    """The start of the bucket ``t`` (server clock) falls in."""
    ts = t.astimezone(UTC).timestamp() if t.tzinfo else t.replace(tzinfo=UTC).timestamp()
    return datetime.fromtimestamp(ts - ts % BUCKET_S, UTC)


def stripe_of(device_id: str) -> int:
    return zlib.crc32(device_id.encode()) % STRIPES


class SketchSum:
    """Stored sketches (``SketchData`` wire form, as ``to_data`` wrote them) merged by adding their bucket counts
    key by key: the same result as ``LatencySketch.merge`` at a tenth of its cost, which matters when a period
    reads thousands of rollup rows."""

    def __init__(self) -> None:
        self.bins: dict[int, float] = defaultdict(float)
        self.zero = self.count = self.total = 0.0
        self.lo: float | None = None
        self.hi: float | None = None

    def add(self, d: Mapping[str, Any]) -> None:
        if not d or not d.get("count"):
            return
        bins = self.bins
        for k, c in zip(d["keys"], d["counts"], strict=True):
            bins[k] += c
        self.zero += d.get("zero_count", 0.0)
        self.count += d["count"]
        self.total += d.get("sum", 0.0)
        if d.get("min") is not None:
            self.lo = d["min"] if self.lo is None else min(self.lo, d["min"])
        if d.get("max") is not None:
            self.hi = d["max"] if self.hi is None else max(self.hi, d["max"])

    def merge(self, other: SketchSum) -> None:
        for k, c in other.bins.items():
            self.bins[k] += c
        self.zero += other.zero
        self.count += other.count
        self.total += other.total
        for v in (other.lo, other.hi):
            if v is not None:
                self.lo = v if self.lo is None else min(self.lo, v)
                self.hi = v if self.hi is None else max(self.hi, v)

    def sketch(self) -> LatencySketch:
        if not self.count:
            return LatencySketch()
        keys = sorted(self.bins)
        return LatencySketch.from_data(
            SketchData(
                keys=keys,
                counts=[self.bins[k] for k in keys],
                zero_count=self.zero,
                count=self.count,
                sum=self.total,
                min=self.lo,
                max=self.hi,
            )
        )


@dataclass
class Delta:
    """What some windows add to one rollup row."""

    windows: int = 0
    requests: int = 0
    errors: int = 0
    worker_crashes: int = 0
    sketch: SketchSum = field(default_factory=SketchSum)
    # feature → number of bins → summed counts (counts of another length, another package's bins, stay apart)
    drift: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add_window(
        self, *, requests: int, errors: int, worker_crashes: int, latency: SketchData | None, drift: Iterable[Any]
    ) -> None:
        self.windows += 1
        self.requests += requests
        self.errors += errors
        self.worker_crashes += worker_crashes
        if latency is not None and latency.count:
            self.sketch.add(latency.model_dump())
        for x in drift:
            feature, counts = _feature_counts(x)
            if feature is not None and counts:
                merge_drift(self.drift, {feature: {str(len(counts)): counts}})


def _feature_counts(x: Any) -> tuple[str | None, list[float]]:
    """A window's drift summary (the protocol's model, or its stored JSON) as (feature, counts)."""
    if isinstance(x, Mapping):
        counts = x.get("counts") or []
        return (str(x["feature"]) if "feature" in x else None), [float(c) for c in counts]
    return str(x.feature), [float(c) for c in x.counts]


def merge_drift(into: dict[str, dict[str, list[float]]], other: Mapping[str, Any]) -> None:
    for feature, by_size in other.items():
        if not isinstance(by_size, Mapping):
            continue
        mine = into.setdefault(feature, {})
        for size, counts in by_size.items():
            have = mine.get(size)
            if have is None or len(have) != len(counts):
                mine[size] = [float(c) for c in counts]
            else:
                mine[size] = [a + float(b) for a, b in zip(have, counts, strict=True)]


def _merge_sketch(stored: Mapping[str, Any] | None, add: SketchSum) -> dict[str, Any]:
    out = SketchSum()
    out.add(stored or {})
    out.merge(add)
    return out.sketch().to_data().model_dump(mode="json") if out.count else {}


def add_counts(
    conn: Session | Connection, t: Table, key: Key, counts: Mapping[str, int], empty: Mapping[str, Any]
) -> Any:
    """Insert rollup table ``t``'s row of ``key`` (its JSON columns ``empty``) or add ``counts`` to it, in one
    statement on either database; returns the row's WHERE clause, for merging its JSON columns next."""
    bucket, model, version, tier, stripe = key
    where = {"bucket": bucket, "model": model, "version": version, "tier": tier, "stripe": stripe}
    dialect = conn.get_bind().dialect.name if isinstance(conn, Session) else conn.dialect.name
    ins = postgresql.insert(t) if dialect == "postgresql" else sqlite.insert(t)
    add = {c: t.c[c] + ins.excluded[c] for c in counts}
    stmt = ins.values(**where, **counts, **empty).on_conflict_do_update(
        index_elements=list(t.primary_key.columns), set_=add
    )
    conn.execute(stmt)
    return tuple(t.c[c] == v for c, v in where.items())


def _upsert(conn: Session | Connection, key: Key, d: Delta) -> None:
    counts = {"windows": d.windows, "requests": d.requests, "errors": d.errors, "worker_crashes": d.worker_crashes}
    where = add_counts(conn, _T, key, counts, {"latency": {}, "drift": {}})
    if not d.sketch.count and not d.drift:
        return
    # the upsert above holds this row's lock until commit: nobody else merges into it in between
    latency, drift = conn.execute(select(_T.c.latency, _T.c.drift).where(*where)).one()
    merged: dict[str, dict[str, list[float]]] = {}
    merge_drift(merged, drift or {})
    merge_drift(merged, d.drift)
    conn.execute(update(_T).where(*where).values(latency=_merge_sketch(latency, d.sketch), drift=merged))


def apply(conn: Session | Connection, deltas: Mapping[Key, Delta]) -> None:
    """Add ``deltas`` to their rows, in key order (the lock order every writer shares)."""
    for key in sorted(deltas):
        _upsert(conn, key, deltas[key])


def add_windows(s: Session, d: Device, windows: Iterable[Any], now: datetime) -> None:
    """Add a report's new windows (``protocol.TelemetryWindow``) of device ``d``, received at ``now``."""
    deltas: dict[Key, Delta] = {}
    crashed = False
    key_base = (bucket_of(now),)
    for w in windows:
        key: Key = (*key_base, w.model or "", w.version or "", d.tier, stripe_of(d.id))
        deltas.setdefault(key, Delta()).add_window(
            requests=w.requests,
            errors=sum(w.errors.values()),
            worker_crashes=w.worker_crashes,
            latency=w.latency,
            drift=w.drift,
        )
        crashed = crashed or w.worker_crashes > 0
    if not deltas:
        return
    d.last_window_at = now
    if crashed:
        d.last_crash_at = now
    apply(s, deltas)


@dataclass
class Totals:
    """One model × version × tier over a period."""

    windows: int = 0
    requests: int = 0
    errors: int = 0
    worker_crashes: int = 0
    sketches: SketchSum = field(default_factory=SketchSum)

    @property
    def sketch(self) -> LatencySketch:
        return self.sketches.sketch()


def sums_since(s: Session, t: Table, since: datetime, *columns: str) -> dict[tuple[str, str, str], list[int]]:
    """The sums of ``columns`` per (model, version, tier) over every bucket of rollup table ``t`` from the one
    ``since`` falls in."""
    q = select(t.c.model, t.c.version, t.c.tier, *(func.sum(t.c[c]) for c in columns))
    q = q.where(t.c.bucket >= bucket_of(since)).group_by(t.c.model, t.c.version, t.c.tier)
    return {(m, v, tier): [int(x or 0) for x in sums] for m, v, tier, *sums in s.execute(q)}


def read(s: Session, since: datetime) -> tuple[dict[tuple[str, str, str], Totals], dict[tuple[str, str], Any]]:
    """Totals per (model, version, tier) and merged drift counts per (model, version) of every bucket from the one
    ``since`` falls in: two queries, their rows bounded by versions × tiers × buckets × stripes."""
    start = bucket_of(since)
    sums = sums_since(s, _T, since, "windows", "requests", "errors", "worker_crashes")
    out = {k: Totals(windows=w, requests=r, errors=e, worker_crashes=c) for k, (w, r, e, c) in sums.items()}
    drift: dict[tuple[str, str], dict[str, dict[str, list[float]]]] = {}
    rows = s.execute(select(_T.c.model, _T.c.version, _T.c.tier, _T.c.latency, _T.c.drift).where(_T.c.bucket >= start))
    for model, version, tier, latency, dr in rows:
        t = out.get((model, version, tier))
        if t is not None and latency:
            t.sketches.add(latency)
        if dr:
            merge_drift(drift.setdefault((model, version), {}), dr)
    return out, drift


def backfill(conn: Connection) -> None:
    """Roll up every stored raw window and set each device's latest window and crash times (the upgrade to
    revision 0008 runs it once; windows stored from then on are rolled up as they arrive). Reads the raw table by
    its columns of that revision, not through the ORM model, which later revisions may change."""
    tel = table(
        "telemetry",
        column("device_id", String()),
        column("model", String()),
        column("version", String()),
        column("tier", String()),
        column("requests", Integer()),
        column("errors", Integer()),
        column("worker_crashes", Integer()),
        column("latency", JSON()),
        column("drift", JSON()),
        column("received_at", UTCDateTime()),
    )
    deltas: dict[Key, Delta] = {}
    for dev, model, version, tier, req, err, crashes, latency, drift, at in conn.execute(select(tel)):
        key: Key = (bucket_of(at), model or "", version or "", tier or "", stripe_of(dev))
        sk = SketchData.model_validate(latency) if latency and latency.get("count") else None
        deltas.setdefault(key, Delta()).add_window(
            requests=req or 0, errors=err or 0, worker_crashes=crashes or 0, latency=sk, drift=drift or []
        )
    apply(conn, deltas)
    conn.execute(
        text(
            "UPDATE devices SET last_window_at = (SELECT max(t.received_at) FROM telemetry t"
            " WHERE t.device_id = devices.id), last_crash_at = (SELECT max(t.received_at) FROM telemetry t"
            " WHERE t.device_id = devices.id AND t.worker_crashes > 0)"
        )
    )


def latency_points(s: Session, since: datetime) -> list[tuple[datetime, str, str, str, dict[str, Any]]]:
    """(bucket end, model, version, tier, merged sketch) of every bucket from the one ``since`` falls in, stripes
    merged, oldest first: what a latency-over-time chart needs."""
    merged: dict[tuple[datetime, str, str, str], SketchSum] = {}
    rows = s.execute(
        select(_T.c.bucket, _T.c.model, _T.c.version, _T.c.tier, _T.c.latency).where(_T.c.bucket >= bucket_of(since))
    )
    for bucket, model, version, tier, latency in rows:
        if latency and latency.get("count"):
            merged.setdefault((bucket, model, version, tier), SketchSum()).add(latency)
    end = timedelta(seconds=BUCKET_S)
    return [
        (b + end, m, v, t, sk.sketch().to_data().model_dump(mode="json")) for (b, m, v, t), sk in sorted(merged.items())
    ]
