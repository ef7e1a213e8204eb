"""The server's background tasks, started by the app's lifespan: the check-in cache's last-seen flush and sync
with other replicas, the reconciler, the TUF metadata refresh and the retention prune. The blocking work they hand
to the thread pool here, so that the domain modules they call stay free of the web framework."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

from edgefleet.controlplane.reconciler import owner_id, reconcile_once
from edgefleet.controlplane.retention import Retention, prune_once

if TYPE_CHECKING:
    from edgefleet.controlplane.metrics import ServerMetrics
    from edgefleet.controlplane.repo_service import RepoService
    from edgefleet.controlplane.store import Store

__all__ = ["flush_loop", "prune_loop", "reconcile_loop", "refresh_loop"]

log = logging.getLogger(__name__)


async def flush_loop(store: Store) -> None:
    """Write pending last-seen times, then sync the cache with other replicas' changes."""
    while True:
        await asyncio.sleep(store.settings.lastseen_flush_s)
        try:
            await run_in_threadpool(store.flush_and_sync)
        except Exception as exc:  # a database hiccup must not end the loop; the next round retries
            log.error("check-in cache flush/sync failed: %s", exc)


async def reconcile_loop(store: Store, metrics: ServerMetrics) -> None:
    while True:
        await store.wait_wake(store.settings.reconcile_interval_s)
        started = time.monotonic()
        try:
            transitions = await run_in_threadpool(reconcile_once, store)
        except Exception as exc:  # keep reconciling; the failure is logged and retried next round
            metrics.reconciled(time.monotonic() - started, ok=False)
            log.error("reconcile failed: %s", exc)
            continue
        metrics.reconciled(time.monotonic() - started, ok=True)
        for t in transitions:
            log.info("%s", t)
        # reports wake the loop; this spacing keeps a burst of them from reconciling back to back
        await asyncio.sleep(min(0.5, store.settings.reconcile_interval_s))


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


async def prune_loop(store: Store) -> None:
    """Delete telemetry, report batches and events past their retention: one replica per interval (a lease)."""
    st = store.settings
    keep = Retention(st.telemetry_retention_s, st.events_retention_s, st.rollup_retention_s)
    # checks often, prunes once per interval: whichever replica finds the job due and free takes it
    check_s = min(st.prune_interval_s, 60.0)
    while True:
        try:
            deleted = await run_in_threadpool(prune_once, store.db, keep, owner_id(), every_s=st.prune_interval_s)
            if deleted and any(deleted.values()):
                log.info("retention prune deleted %s", ", ".join(f"{n} {t}" for t, n in deleted.items() if n))
        except Exception as exc:  # keep the loop alive; the next round retries
            log.error("retention prune failed: %s", exc)
        await asyncio.sleep(check_s)
