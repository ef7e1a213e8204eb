"""The device agent: OIP v2 serving from a supervised worker, A/B slots, trusted resumable updates,
health check, probation and self-rollback, offline-first telemetry with drift.

Names are imported on first use (PEP 562): ``edgefleet serve`` needs the HTTP server, the service and the
supervisor, not the updater, the TUF client or the telemetry buffer — each import is resident memory on a device.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgefleet.agent.agent import Agent
    from edgefleet.agent.backend import Backend, InProcessBackend
    from edgefleet.agent.oip import OIPApp
    from edgefleet.agent.service import InferenceService
    from edgefleet.agent.standalone import serve_standalone
    from edgefleet.agent.supervisor import Supervisor
    from edgefleet.agent.worker.spec import ModelInfo, WorkerSpec

__all__ = [
    "Agent",
    "Backend",
    "InProcessBackend",
    "InferenceService",
    "ModelInfo",
    "OIPApp",
    "Supervisor",
    "WorkerSpec",
    "serve_standalone",
]

_WHERE = {
    "Agent": "agent",
    "serve_standalone": "standalone",
    "Backend": "backend",
    "InProcessBackend": "backend",
    "OIPApp": "oip",
    "InferenceService": "service",
    "Supervisor": "supervisor",
    "ModelInfo": "worker.spec",
    "WorkerSpec": "worker.spec",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"edgefleet.agent.{module}"), name)
    globals()[name] = value
    return value
