"""The check-in hot path's memory (docs/adr/0040-checkin-hot-path-from-memory.md).

``GET …/desired`` is answered from :class:`CheckinCache` — credential hashes and rendered desired states with
their ETags — so neither a 304 nor an unchanged 200 issues SQL; last-seen times collect in memory and are flushed
in batches (:func:`flush_seen`) by a background task. Every write that changes a device's desired state bumps
``devices.changed_at``; the writing process refreshes its cache at once and every replica syncs the rows changed
since its last sync (``CheckinCache.sync``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session

from edgefleet.controlplane import devices
from edgefleet.controlplane.db import Device, DeviceGroup, ModelVersion, utcnow

__all__ = ["MISS_MAX", "MISS_TTL_S", "STALE_RELOAD_S", "CheckinCache", "Entry", "flush_seen"]

# Unknown device ids are remembered this long, at most this many (docs/adr/0040-checkin-hot-path-from-memory.md).
MISS_TTL_S = 30.0
MISS_MAX = 10_000
# A known device presenting a credential the cache does not hold is re-read from the database at most this often:
# a credential rotated through another replica is found on the device's next try, and a stream of wrong
# credentials for a known id costs one query per interval, not one each.
STALE_RELOAD_S = 2.0


@dataclass(frozen=True, slots=True)
class Entry:
    cred_hash: str
    revoked: bool  # refused: revoked, or decommissioned with the wipe order sent
    etag: str
    body: bytes
    pending_hash: str | None = None  # a rotated credential not used yet: accepted beside ``cred_hash``
    decommissioned: bool = False
    wipe_due: bool = False  # decommissioned, the wipe order not sent yet: still accepted, once


def _entry_of(d: Device, body: bytes) -> Entry:
    decommissioned = d.decommissioned_at is not None
    wipe_due = decommissioned and d.wipe_sent_at is None
    return Entry(
        cred_hash=d.credential_hash,
        revoked=d.revoked_at is not None and not wipe_due,
        etag=devices.etag_of(body),
        body=body,
        pending_hash=d.pending_credential_hash,
        decommissioned=decommissioned,
        wipe_due=wipe_due,
    )


class CheckinCache:
    """Per-process memory of what the hot path needs. Dict reads and writes only: safe from the event loop."""

    def __init__(self, repository_url: str | None = None) -> None:
        self.repository_url = repository_url  # named in every desired state when set (object storage, a CDN)
        self.entries: dict[str, Entry] = {}
        self.by_hash: dict[str, str] = {}
        self.seen: dict[str, datetime] = {}
        self.synced_at: datetime | None = None
        # Device ids the database did not have, refused from memory until the monotonic time stored (a stream of
        # requests for an unknown id costs one query, not one each); oldest dropped first beyond MISS_MAX, and an
        # id leaves as soon as a load or sync brings its device (enrolled here or on another replica).
        self.misses: dict[str, float] = {}
        self._miss_lock = threading.Lock()
        self.reloaded: dict[str, float] = {}  # device id → monotonic time of its last reload for a stale credential

    def may_reload(self, device_id: str) -> bool:
        """Whether a stale-looking credential for ``device_id`` may cost a database read now (then it is noted)."""
        now = time.monotonic()
        with self._miss_lock:
            if self.reloaded.get(device_id, 0.0) > now - STALE_RELOAD_S:
                return False
            self.reloaded.pop(device_id, None)
            self.reloaded[device_id] = now
            while len(self.reloaded) > MISS_MAX:
                del self.reloaded[next(iter(self.reloaded))]
        return True

    def miss(self, device_id: str) -> None:
        with self._miss_lock:
            self.misses.pop(device_id, None)
            self.misses[device_id] = time.monotonic() + MISS_TTL_S
            while len(self.misses) > MISS_MAX:
                del self.misses[next(iter(self.misses))]

    def missed(self, device_id: str) -> bool:
        """Whether ``device_id`` was looked up and not found less than MISS_TTL_S ago."""
        until = self.misses.get(device_id)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        with self._miss_lock:
            self.misses.pop(device_id, None)
        return False

    def _put(self, d: Device, group: DeviceGroup | None, versions: dict[tuple[str, str], ModelVersion]) -> None:
        if self.misses:
            with self._miss_lock:
                self.misses.pop(d.id, None)
        body = devices.render(devices.desired_state(d, group, versions, repository_url=self.repository_url))
        old = self.entries.get(d.id)
        if old is not None:
            for h in (old.cred_hash, old.pending_hash):
                if h is not None and h not in (d.credential_hash, d.pending_credential_hash):
                    self.by_hash.pop(h, None)
        self.entries[d.id] = _entry_of(d, body)
        self.by_hash[d.credential_hash] = d.id
        if d.pending_credential_hash is not None:
            self.by_hash[d.pending_credential_hash] = d.id

    def load(self, s: Session, ids: Iterable[str] | None = None) -> int:
        """(Re)compute entries for ``ids``, or for every device."""
        q = select(Device)
        if ids is not None:
            wanted = list(set(ids))
            if not wanted:
                return 0
            q = q.where(Device.id.in_(wanted))
        return self._load(s, list(s.scalars(q)))

    def _load(self, s: Session, rows: list[Device]) -> int:
        if not rows:
            return 0
        groups = {g.name: g for g in s.scalars(select(DeviceGroup))}
        versions = {(v.model, v.version): v for v in s.scalars(select(ModelVersion))}
        for d in rows:
            self._put(d, groups.get(d.group) if d.group else None, versions)
        return len(rows)

    def sync(self, s: Session) -> int:
        """Pick up changes made by other replicas (rows whose ``changed_at`` moved since the last sync)."""
        now = utcnow()
        if self.synced_at is None:
            n = self.load(s)
        else:
            # a margin covers clock skew between replicas and transactions that committed late
            since = self.synced_at - timedelta(seconds=5)
            n = self._load(s, list(s.scalars(select(Device).where(Device.changed_at >= since))))
        self.synced_at = now
        return n

    def take_seen(self) -> dict[str, datetime]:
        seen, self.seen = self.seen, {}
        return seen


_DEVICES: Table = Device.__table__  # type: ignore[assignment]
# A Core statement, not the ORM's bulk update by primary key: the flush runs beside the hot path, and the ORM's
# per-row bookkeeping took a third of its time (py-spy, benchmarks/checkin.py).
_SET_LAST_SEEN = update(_DEVICES).where(_DEVICES.c.id == bindparam("b_id")).values(last_seen=bindparam("b_seen"))


def flush_seen(s: Session, seen: dict[str, datetime]) -> None:
    """One executemany for the whole batch instead of one write per check-in."""
    if seen:
        s.connection().execute(_SET_LAST_SEEN, [{"b_id": k, "b_seen": v} for k, v in seen.items()])
