"""The server's background tasks, started by the app's lifespan: the check-in cache's last-seen flush and sync
with other replicas, the reconciler, and the TUF metadata refresh. The blocking work they hand to the thread pool
here, so that the domain modules they call stay free of the web framework."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

from edgefleet.controlplane.reconciler import reconcile_once

if TYPE_CHECKING:
    from edgefleet.controlplane.repo_service import RepoService
    from edgefleet.controlplane.store import Store

__all__ = ["flush_loop", "reconcile_loop", "refresh_loop"]

log = logging.getLogger(__name__)


async def flush_loop(store: Store) -> None:
    """Write pending last-seen times, then sync the cache with other replicas' changes."""
    while True:
        await asyncio.sleep(store.settings.lastseen_flush_s)
        try:
            await run_in_threadpool(store.flush_and_sync)
        except Exception as exc:  # a database hiccup must not end the loop; the next round retries
            log.error("check-in cache flush/sync failed: %s", exc)


async def reconcile_loop(store: Store) -> None:
    while True:
        await store.wait_wake(store.settings.reconcile_interval_s)
        try:
            for t in await run_in_threadpool(reconcile_once, store):
                log.info("%s", t)
            # reports wake the loop; this spacing keeps a burst of them from reconciling back to back
            await asyncio.sleep(min(0.5, store.settings.reconcile_interval_s))
        except Exception as exc:  # keep reconciling; the failure is logged and retried next round
            log.error("reconcile failed: %s", exc)


async def refresh_loop(service: RepoService, interval_s: float) -> None:
    """Re-sign timestamp/snapshot near expiry on a timer, so devices never meet expired metadata."""
    while True:
        try:
            roles = await run_in_threadpool(service.refresh)
            if roles:
                log.info("re-signed TUF metadata: %s", ", ".join(roles))
        except Exception as exc:  # keep the loop alive; the next round retries and `repo status` warns
            log.error("TUF metadata refresh failed: %s", exc)
        await asyncio.sleep(interval_s)
