"""What one server process holds: settings, the database, the check-in cache and the TUF repository service."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from edgefleet.config import ServerSettings
from edgefleet.controlplane.checkin_cache import CheckinCache, flush_seen
from edgefleet.controlplane.db import Database
from edgefleet.controlplane.repo_service import RepoService

__all__ = ["Store"]


class Store:
    def __init__(self, settings: ServerSettings, db: Database, repo: RepoService) -> None:
        self.settings = settings
        self.db = db
        self.repo = repo
        self.cache = CheckinCache()
        self._wake: asyncio.Event | None = None

    def refresh(self, device_ids: Iterable[str]) -> None:
        """Recompute the check-in cache for devices this process just changed (committed already)."""
        ids = list(device_ids)
        if ids:
            with self.db.session() as s:
                self.cache.load(s, ids)

    def sync(self) -> None:
        with self.db.session() as s:
            self.cache.sync(s)

    def flush_and_sync(self) -> None:
        seen = self.cache.take_seen()
        if seen:
            with self.db.session() as s:
                flush_seen(s, seen)
        self.sync()

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
