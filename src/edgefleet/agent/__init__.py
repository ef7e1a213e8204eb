"""The device agent (DESIGN §7): OIP v2 serving from a supervised worker, A/B slots, trusted resumable updates,
health check, probation and self-rollback, offline-first telemetry with drift."""

from edgefleet.agent.agent import Agent, serve_standalone
from edgefleet.agent.backend import Backend, InProcessBackend
from edgefleet.agent.oip import OIPApp
from edgefleet.agent.service import InferenceService
from edgefleet.agent.supervisor import Supervisor
from edgefleet.agent.worker import ModelInfo, WorkerSpec

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
