"""The bounded on-disk telemetry buffer (SQLite) with idempotent batch upload.

Records wait here until the server confirms their batch. A batch is fixed (its id and members written) *before*
it is sent, so after a lost answer or an agent restart the same ``batch_id`` goes out again with the same records
and the server, which stores each batch once, never duplicates them; the records are deleted only once the
server lists the id as accepted. At the cap the oldest records not in flight are dropped, and counted; so is a
batch the server will never accept (:meth:`TelemetryBuffer.drop`). A batch holds at most ``batch_size`` records
and ``max_batch_bytes`` of them (one record more only if it alone is larger), well below the server's limit on a
report's body.
"""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

from edgefleet.protocol import MAX_REPORT_BYTES

__all__ = ["MAX_BATCH_BYTES", "Batch", "TelemetryBuffer"]

Batch = tuple[str, list[tuple[int, str, str]]]

# A quarter of the control plane's limit on a report's body: the report's own fields and JSON framing add a little,
# and a smaller batch loses less if it is ever refused.
MAX_BATCH_BYTES = MAX_REPORT_BYTES // 4


class TelemetryBuffer:
    def __init__(
        self, path: Path, max_records: int = 10_000, batch_size: int = 200, max_batch_bytes: int = MAX_BATCH_BYTES
    ) -> None:
        self.max_records = max_records
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS records (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,"
            " body TEXT NOT NULL, batch TEXT)"
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")

    def close(self) -> None:
        self.db.close()

    @property
    def dropped(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()
        return int(row[0]) if row else 0

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def add(self, kind: str, body: str) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            n = int(self.db.execute("SELECT COUNT(*) FROM records").fetchone()[0])
            if n >= self.max_records:
                oldest = self.db.execute("SELECT id FROM records WHERE batch IS NULL ORDER BY id LIMIT 1").fetchone()
                self.db.execute(
                    "INSERT INTO meta(key, value) VALUES('dropped', 1) ON CONFLICT(key) DO UPDATE SET value = value + 1"
                )
                if oldest is None:  # everything is in flight: the new record is the one dropped
                    return
                self.db.execute("DELETE FROM records WHERE id = ?", oldest)
            self.db.execute("INSERT INTO records(kind, body) VALUES(?, ?)", (kind, body))

    def next_batch(self) -> Batch | None:
        """The batch in flight, if any (resend it as is), else a new one of the oldest records; None if empty."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT batch FROM records WHERE batch IS NOT NULL ORDER BY id LIMIT 1").fetchone()
            if row is None:
                ids: list[int] = []
                size = 0
                rows = self.db.execute(
                    "SELECT id, length(CAST(body AS BLOB)) FROM records ORDER BY id LIMIT ?", (self.batch_size,)
                )
                for rid, n in rows:
                    if ids and size + int(n) > self.max_batch_bytes:
                        break
                    ids.append(int(rid))
                    size += int(n)
                if not ids:
                    return None
                batch_id = uuid.uuid4().hex
                self.db.executemany("UPDATE records SET batch = ? WHERE id = ?", [(batch_id, i) for i in ids])
            else:
                batch_id = row[0]
            rows = self.db.execute("SELECT id, kind, body FROM records WHERE batch = ? ORDER BY id", (batch_id,))
            return batch_id, [(int(r[0]), str(r[1]), str(r[2])) for r in rows]

    def ack(self, batch_id: str) -> None:
        """The server holds this batch: forget its records."""
        with self.db:
            self.db.execute("DELETE FROM records WHERE batch = ?", (batch_id,))

    def discard(self, ids: list[int]) -> int:
        """Forget these records (ones that can never be sent) and count them as dropped. Returns how many."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            n = sum(int(self.db.execute("DELETE FROM records WHERE id = ?", (i,)).rowcount) for i in ids)
            self._count_dropped(n)
            return n

    def drop(self, batch_id: str) -> int:
        """The server will never take this batch: forget its records and count them as dropped. Returns how many."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            n = int(self.db.execute("DELETE FROM records WHERE batch = ?", (batch_id,)).rowcount)
            self._count_dropped(n)
            return n

    def _count_dropped(self, n: int) -> None:
        if n:
            self.db.execute(
                "INSERT INTO meta(key, value) VALUES('dropped', ?) ON CONFLICT(key) DO UPDATE SET value = value + ?",
                (n, n),
            )
