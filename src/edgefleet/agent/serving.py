"""What the OIP app needs of the service behind it: :class:`Serving` (docs/adr/0106-agent-worker-process-boundary.md).

Two services implement it, one each side of the process boundary: the agent's
:class:`~edgefleet.agent.service.InferenceService` (a backend, telemetry, routing) and the worker's
``WorkerService`` (``worker/httpserve.py``: the model in the same process, facts batched to the agent, ADR 0032).
``oip.OIPApp`` is typed against this Protocol, so it imports neither; this module imports nothing of the agent's
but the OIP codec's error, so the lean worker may import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from edgefleet.agent.codec import BadRequest

if TYPE_CHECKING:
    from edgefleet.agent.shm import ShmRegistry

__all__ = ["Done", "ServedModel", "Serving"]

# done(outputs, compute_seconds, error): exactly one of outputs and error is None.
Done = Callable[[dict[str, Any] | None, float, BadRequest | None], None]


class ServedModel(Protocol):
    """What the app reads of the model served: the agent's ``ModelInfo``, or the worker's hello as attributes."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def platform(self) -> str: ...
    @property
    def inputs(self) -> list[dict[str, Any]]: ...
    @property
    def outputs(self) -> list[dict[str, Any]]: ...


class Serving(Protocol):
    """The service an :class:`~edgefleet.agent.oip.OIPApp` answers from."""

    @property
    def info(self) -> ServedModel | None:
        """The model whose interface requests are parsed against (None: none installed yet)."""
        ...

    @property
    def ready(self) -> bool:
        """A model is loaded and answering (``/v2/health/ready``)."""
        ...

    @property
    def unavailable_reason(self) -> str:
        """Why not ready, for the 503's message."""
        ...

    @property
    def shm(self) -> ShmRegistry | None:
        """The shared memory regions (agent/shm.py) when the service offers the extension, else None."""
        ...

    def submit(self, feeds: dict[str, Any], outputs: list[str] | None, done: Done) -> None:
        """Run one request; ``done`` is called with its outcome, maybe before this returns."""
        ...

    def record(self, outcome: str, total: float | None, compute: float = 0.0) -> None:
        """Count one request's outcome (and its seconds, total and in the model, when it was answered)."""
        ...

    def record_feedback(self, predicted: str | None, label: str) -> None:
        """Ground truth for a request, matched to its prediction (``predicted``) or not (None)."""
        ...

    def render_metrics(self, reply: Callable[[bytes], None]) -> None:
        """The Prometheus exposition, now or from a later callback."""
        ...
