"""The agent's persisted state machine.

``idle → downloading → verifying → staged → health_check → probation → committed``, or ``→ rolled_back(reason)``.
The whole state is one small JSON document rewritten atomically after every step (``durable.atomic_write``), so
a power cut leaves either the previous or the next step on disk. The *active* slot is a field of that document,
which makes the slot switch the same single rename.

:func:`recover` is pure: it turns whatever was on disk at a crash into the state to resume from.

A state file the agent cannot read must not stop it: under systemd that is a crash loop on a device nobody can
reach. Fields this agent does not know (a newer agent's file, after a downgrade) are ignored, and only known
fields are written. A file that does not parse (truncated, garbage, a field of the wrong type) is moved aside to
``state.json.unreadable`` and the previous step's state, ``state.json.prev``, is used instead; when that cannot
be read either, the state is rebuilt from the slot files on disk (:meth:`StateStore.rebuild`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.agent.durable import atomic_write
from edgefleet.errors import EdgefleetError
from edgefleet.protocol import AgentState, target_name

__all__ = [
    "MAX_PROBATION_RESUMES",
    "Pending",
    "PersistedState",
    "SlotInfo",
    "StateStore",
    "committed",
    "recover",
    "refusal_key",
    "rolled_back",
    "rolled_back_in_recovery",
]

log = logging.getLogger("edgefleet.agent")

Slot = Literal["A", "B"]
_SLOTS: tuple[Slot, ...] = ("A", "B")


class SlotInfo(BaseModel):
    """What a slot holds: enough to serve it and to report it."""

    model_config = ConfigDict(extra="ignore")  # a newer agent's fields: see the module doc

    slot: Slot
    model: str | None = None
    version: str | None = None
    target: str | None = None
    model_sha256: str | None = None
    package_sha256: str | None = None
    rollout_id: str | None = None


class Pending(BaseModel):
    """The update in flight (from the desired state)."""

    model_config = ConfigDict(extra="ignore")  # a newer agent's fields: see the module doc

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
    model_config = ConfigDict(extra="ignore")  # a newer agent's fields: see the module doc

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


def committed(s: PersistedState) -> PersistedState:
    """Probation passed: the active slot is the committed one."""
    return s.with_(state=AgentState.committed, reason=None, committed=s.active, pending=None, probation_resumes=0)


def rolled_back(s: PersistedState, reason: str) -> PersistedState:
    """Probation failed: back to the committed slot, and the candidate refused until a new rollout names it."""
    a = s.active
    key = refusal_key(a.rollout_id, a.target or "") if a else None
    return s.with_(
        state=AgentState.rolled_back,
        reason=reason,
        active=s.committed,
        pending=None,
        refused=[*s.refused[-50:], *([key] if key else [])],
    )


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
    """The state file ``<data_dir>/state.json``; each save is one atomic, durable step.

    Before a save replaces a state file known to be good (loaded or written by this store), that file becomes
    ``state.json.prev`` — by a hard link, so it costs no copy and no fsync of its own: the new name is made
    durable by the same directory fsync as the save's rename. :meth:`load` never raises: see the module doc."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "state.json"
        self.prev = data_dir / "state.json.prev"
        self.unreadable = data_dir / "state.json.unreadable"
        self._good = False  # whether the file at ``path`` is known to parse: only such a file becomes ``prev``

    def _slot_path(self, slot: Slot) -> Path:
        return self.path.parent / "slots" / f"{slot}.efpkg"  # the layout of ``slots.SlotStore``

    def load(self) -> PersistedState:
        self._good = False
        if not self.path.exists() and not self.prev.exists():
            if not any(self._slot_path(x).is_file() for x in _SLOTS):
                return PersistedState()  # a new device
            log.warning("no agent state file, but models are installed: rebuilding the state from the slot files")
            return self._restored(self.rebuild(), "the slot files")
        raw = b""
        try:
            raw = self.path.read_bytes()
            s = PersistedState.model_validate_json(raw)
        except (OSError, ValueError) as err:
            why = _one_line(err)
        else:
            self._good = True
            return s
        log.warning("agent state %s is unreadable (%s); falling back to %s", self.path, why, self.prev.name)
        with contextlib.suppress(FileNotFoundError):  # kept for whoever debugs the device
            os.replace(self.path, self.unreadable)
        try:
            return self._restored(
                PersistedState.model_validate_json(self.prev.read_bytes()), f"the previous step's ({self.prev.name})"
            )
        except (OSError, ValueError) as err:
            log.warning(
                "%s is unreadable too (%s); rebuilding the state from the slot files", self.prev, _one_line(err)
            )
        return self._restored(self.rebuild(self.salvage_committed(raw)), "the slot files")

    def _restored(self, s: PersistedState, source: str) -> PersistedState:
        self.save(s)  # ``_good`` is False: a damaged or missing file never becomes ``prev``
        served = s.active.target if s.active is not None else "nothing"
        log.warning("agent state restored from %s: %s, serving %s", source, s.state.value, served)
        return s

    def salvage_committed(self, raw: bytes) -> SlotInfo | None:
        """The ``committed`` entry of an unreadable state file when that entry alone is intact (another field has
        the wrong type, say) and its slot file exists."""
        try:
            doc = json.loads(raw)
            info = SlotInfo.model_validate(doc["committed"]) if isinstance(doc, dict) else None
        except (ValueError, KeyError, TypeError):
            return None
        return info if info is not None and self._slot_path(info.slot).is_file() else None

    def rebuild(self, committed: SlotInfo | None = None) -> PersistedState:
        """A clean state from what is on disk, when no state file can be read. ``committed``: a salvaged entry.

        The slot files say what was installed, not which one was committed: a single valid slot is committed; of
        two, the one staged last (the newer file) serves on probation with the other as the committed fallback, so
        a bad candidate is rolled back as any other would be and a good one is committed again. Refusals are lost:
        a refused version may be tried once more, and refused again."""
        if committed is not None:
            return PersistedState(
                state=AgentState.committed,
                reason="state rebuilt from a damaged state file",
                committed=committed,
                active=committed,
            )
        found = sorted((x for x in map(self._slot_info, _SLOTS) if x is not None), key=lambda x: x[0])
        if not found:
            return PersistedState(reason="state rebuilt from a damaged state file: no installed model on disk")
        reason = f"state rebuilt from the slot files ({', '.join(i.target or i.slot for _, i in found)})"
        if len(found) == 1:
            only = found[0][1]
            return PersistedState(state=AgentState.committed, reason=reason, committed=only, active=only)
        (_, older), (_, newer) = found
        return PersistedState(state=AgentState.probation, reason=reason, committed=older, active=newer)

    def _slot_info(self, slot: Slot) -> tuple[float, SlotInfo] | None:
        from edgefleet.package import open_package

        path = self._slot_path(slot)
        if not path.is_file():
            return None
        try:
            opened = open_package(path)  # no key: an encrypted model is checked by the worker that decrypts it
            mtime = path.stat().st_mtime
        except (OSError, EdgefleetError) as err:
            log.warning("slot %s is not a usable package: %s", slot, _one_line(err))
            return None
        m = opened.manifest
        return mtime, SlotInfo(
            slot=slot,
            model=m.name,
            version=m.version,
            target=target_name(m.name, m.version),
            model_sha256=m.model_sha256,
            package_sha256=opened.package_sha256,
        )

    def save(self, s: PersistedState) -> None:
        if self._good:
            self._keep_previous()
        atomic_write(self.path, s.model_dump_json(indent=1).encode(), f"state.{s.state.value}")
        self._good = True

    def _keep_previous(self) -> None:
        """Make the current state file ``prev``. The link is durable with the save's own directory fsync; a
        filesystem without hard links (FAT on an SD card) gets a durable copy instead."""
        tmp = self.prev.with_name(self.prev.name + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(self.path, tmp)
        except FileNotFoundError:
            return
        except OSError:
            try:
                atomic_write(self.prev, self.path.read_bytes(), "state.prev")
            except FileNotFoundError:
                pass
            return
        os.replace(tmp, self.prev)


def _one_line(err: BaseException) -> str:
    if isinstance(err, ValidationError):
        e = err.errors()[0]
        where = ".".join(str(x) for x in e["loc"]) or "(root)"
        return f"{where}: {e['msg']}"[:300]
    return " ".join(str(err).split())[:300]
