"""The agent's persisted state machine.

``idle → downloading → verifying → staged → health_check → probation → committed``, or ``→ rolled_back(reason)``.
The whole state is one small JSON document rewritten atomically after every step (``durable.atomic_write``), so
a power cut leaves either the previous or the next step on disk. The *active* slot is a field of that document,
which makes the slot switch the same single rename.

:func:`recover` is pure: it turns whatever was on disk at a crash into the state to resume from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edgefleet.agent.durable import atomic_write
from edgefleet.errors import AgentError
from edgefleet.protocol import AgentState

__all__ = [
    "MAX_PROBATION_RESUMES",
    "Pending",
    "PersistedState",
    "SlotInfo",
    "StateStore",
    "recover",
    "refusal_key",
    "rolled_back_in_recovery",
]

Slot = Literal["A", "B"]


class SlotInfo(BaseModel):
    """What a slot holds: enough to serve it and to report it."""

    model_config = ConfigDict(extra="forbid")

    slot: Slot
    model: str | None = None
    version: str | None = None
    target: str | None = None
    model_sha256: str | None = None
    package_sha256: str | None = None
    rollout_id: str | None = None


class Pending(BaseModel):
    """The update in flight (from the desired state)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    version: str
    target: str
    package_sha256: str | None = None
    rollout_id: str | None = None
    slot: Slot | None = None
    model_sha256: str | None = None
    failures: int = Field(
        0, ge=0, description="failed attempts so far (verification, metadata, download): bounded before a refusal"
    )


class PersistedState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: AgentState = AgentState.idle
    reason: str | None = None
    committed: SlotInfo | None = None
    active: SlotInfo | None = None
    pending: Pending | None = None
    refused: list[str] = Field(default_factory=list, description="refusal keys never retried (rollout|target)")
    probation_resumes: int = 0

    def with_(self, **changes: object) -> PersistedState:
        return self.model_copy(update=changes, deep=True)


def refusal_key(rollout_id: str | None, target: str) -> str:
    """A rolled-back or refused version is not retried until the desired state names a new rollout id."""
    return f"{rollout_id or '-'}|{target}"


MAX_PROBATION_RESUMES = 2
PROBATION_DEATHS = "agent restarted repeatedly during probation"


def recover(s: PersistedState) -> PersistedState:
    """Where to resume after a crash. Before the switch the committed slot serves and the update resumes on the
    next check-in (the partial download and a staged slot are kept); in probation the candidate keeps serving and
    probation starts over, unless the agent already died in probation :data:`MAX_PROBATION_RESUMES` times before:
    then the candidate is the suspect and is rolled back, with its refusal recorded like any other rollback (the
    caller reports the ``rolled_back`` event: see :func:`rolled_back_in_recovery`)."""
    if s.state in (AgentState.downloading, AgentState.verifying, AgentState.staged, AgentState.health_check):
        return s.with_(
            state=AgentState.idle, reason=f"resuming an update interrupted in {s.state.value}", active=s.committed
        )
    if s.state is AgentState.probation:
        if s.probation_resumes >= MAX_PROBATION_RESUMES:
            cand = s.active
            key = [refusal_key(cand.rollout_id, cand.target)] if cand is not None and cand.target else []
            return s.with_(
                state=AgentState.rolled_back,
                reason=f"{PROBATION_DEATHS} ({s.probation_resumes + 1} deaths)",
                active=s.committed,
                pending=None,
                probation_resumes=0,
                refused=[*s.refused[-50:], *key],
            )
        return s.with_(probation_resumes=s.probation_resumes + 1)
    return s


def rolled_back_in_recovery(before: PersistedState, after: PersistedState) -> SlotInfo | None:
    """The candidate :func:`recover` rolled back (its event is still to be reported), or None."""
    if before.state is AgentState.probation and after.state is AgentState.rolled_back:
        return before.active
    return None


class StateStore:
    """The state file ``<data_dir>/state.json``; each save is one atomic, durable step."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "state.json"

    def load(self) -> PersistedState:
        if not self.path.exists():
            return PersistedState()
        try:
            return PersistedState.model_validate_json(self.path.read_bytes())
        except ValueError as err:
            raise AgentError(f"agent state {self.path} is unreadable ({err}); move it away to start fresh")

    def save(self, s: PersistedState) -> None:
        atomic_write(self.path, s.model_dump_json(indent=1).encode(), f"state.{s.state.value}")
