"""The control plane: registry, devices, check-ins, rollouts gated on runtime metrics,
compatibility matrix, fleet KPIs, audit log, and the server's own TUF repository under ``/tuf/``.

``create_app(settings)`` builds the FastAPI app; ``edgefleet server`` runs it in uvicorn."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["create_app"]

if TYPE_CHECKING:
    from edgefleet.controlplane.app import create_app


def __getattr__(name: str) -> Any:
    # Lazy: the CLI imports the client without pulling in FastAPI and SQLAlchemy models.
    if name == "create_app":
        from edgefleet.controlplane.app import create_app

        return create_app
    raise AttributeError(name)
