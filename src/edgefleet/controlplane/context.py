"""What a request handler may use of the server that answers it: :class:`ServerContext`.

Handlers take it as a dependency (``ctx: Context``) instead of reading ``request.app.state``; ``create_app``
builds one per app. The check-in hot path calls :func:`context_of` itself: it runs no dependency (each costs
FastAPI a resolution step per request), so reading the context there costs what reading ``app.state`` did."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

if TYPE_CHECKING:
    from edgefleet.config import ServerSettings
    from edgefleet.controlplane.checkin_cache import CheckinCache
    from edgefleet.controlplane.db import Database
    from edgefleet.controlplane.metrics import ServerMetrics
    from edgefleet.controlplane.repo_service import RepoService
    from edgefleet.controlplane.store import Store

__all__ = ["Context", "ServerContext", "context_of", "server_context"]


@dataclass(frozen=True, slots=True)
class ServerContext:
    """One server process's state: the :class:`Store` (settings, database, check-in cache, TUF repository) and
    its Prometheus metrics."""

    store: Store
    metrics: ServerMetrics

    @property
    def settings(self) -> ServerSettings:
        return self.store.settings

    @property
    def db(self) -> Database:
        return self.store.db

    @property
    def repo(self) -> RepoService:
        return self.store.repo

    @property
    def cache(self) -> CheckinCache:
        return self.store.cache


def context_of(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.context
    return ctx


async def server_context(request: Request) -> ServerContext:
    """The FastAPI dependency. ``async``: a plain ``def`` dependency would cost a thread hop per request."""
    return context_of(request)


Context = Annotated[ServerContext, Depends(server_context)]
