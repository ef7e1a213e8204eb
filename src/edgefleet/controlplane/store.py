"""What one server process holds: settings, the database, the check-in cache and the TUF repository service."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from edgefleet.config import ServerSettings
from edgefleet.controlplane import nudge
from edgefleet.controlplane.checkin_cache import CheckinCache, flush_seen
from edgefleet.controlplane.db import Database
from edgefleet.controlplane.repo_service import RepoService

__all__ = ["Store"]


class Store:
    def __init__(self, settings: ServerSettings, db: Database, repo: RepoService) -> None:
        self.settings = settings
        self.db = db
        self.repo = repo
        self.cache = CheckinCache(settings.repository_url)
        self._wake: asyncio.Event | None = None
        # check-in nudges over MQTT (controlplane/nudge.py); None: devices learn changes at their next poll
        self.nudger: nudge.Nudger | None = None

    def refresh(self, device_ids: Iterable[str]) -> None:
        """Recompute the check-in cache for devices this process just changed (committed already)."""
        ids = list(device_ids)
        if ids:
            before = nudge.etags(self.cache.entries, ids) if self.nudger is not None else {}
            with self.db.session() as s:
                self.cache.load(s, ids)
                if self.nudger is not None:
                    self.nudger.after_refresh(s, before, nudge.etags(self.cache.entries, ids))

    def sync(self, *, nudge_changed: bool = True) -> None:
        """Pick up every change since the last sync; ``nudge_changed``: this process made them (a write that
        changes a whole group), so it nudges their devices. The periodic sync does not: the replica that wrote a
        change nudges for it, once."""
        before = nudge.etags(self.cache.entries) if nudge_changed and self.nudger is not None else {}
        with self.db.session() as s:
            self.cache.sync(s)
            if before and self.nudger is not None:
                self.nudger.after_refresh(s, before, nudge.etags(self.cache.entries))

    def flush_and_sync(self) -> None:
        seen = self.cache.take_seen()
        if seen:
            with self.db.session() as s:
                flush_seen(s, seen)
        self.sync(nudge_changed=False)

    def bind_loop(self) -> None:
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Ask the reconciler to run soon (a report arrived, a rollout started); cheap when nothing waits."""
        if self._wake is not None:
            self._wake.set()

    async def wait_wake(self, timeout: float) -> None:
        if self._wake is None:
            await asyncio.sleep(timeout)
            return
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that arrives as the event
        # is set, and the reconciler loop would then outlive the server's shutdown
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        self._wake.clear()
