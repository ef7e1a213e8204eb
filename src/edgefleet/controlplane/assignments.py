"""Several models per device: the pure decisions about a device's model assignments
(docs/adr/0108-several-models-per-device.md).

A device's *first* model is its desired state's top-level model (the ``Device.desired_model`` columns); every other
model is an *additional assignment* (``DesiredState.models``). A rollout of model M writes M's assignment and no
other, reverts only it, and judges only M's windows and M's status."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from edgefleet.protocol import ModelStatus, ServedModel


@dataclass(frozen=True)
class Held:
    """One model a device is assigned, first or additional, with the memory its package declares it needs."""

    model: str
    version: str
    memory_mb: int | None = None  # the package's min_memory_mb; None: it declares none


class Slot(StrEnum):
    first = "first"  # the top-level desired model
    additional = "additional"  # an entry of DesiredState.models


@dataclass(frozen=True)
class Move:
    """What moving a device for a rollout of ``model`` writes: which assignment, and the version a rollback returns
    that assignment to (None: the device had no such assignment; a rollback removes it)."""

    slot: Slot
    previous_version: str | None


def move_for(first_model: str | None, first_version: str | None, additional: Mapping[str, str], model: str) -> Move:
    """The assignment a rollout of ``model`` writes on a device whose first model is ``first_model`` and whose
    additional assignments are ``additional`` (model → version): the first one when the device has none or it is
    ``model`` itself, else ``model``'s additional assignment (added beside the others when it has none)."""
    if model in additional and first_model != model:
        return Move(Slot.additional, additional[model])
    if first_model is None or first_model == model:
        return Move(Slot.first, first_version if first_model == model else None)
    return Move(Slot.additional, additional.get(model))


def additional_of(doc: Iterable[object] | None) -> dict[str, str]:
    """The additional assignments (model → version) of a device's stored ``[{model, version, rollout_id}]``."""
    out: dict[str, str] = {}
    for x in doc or ():
        if isinstance(x, dict) and isinstance(x.get("model"), str) and isinstance(x.get("version"), str):
            out[x["model"]] = x["version"]
    return out


def assigned(doc: Iterable[object] | None, model: str, version: str | None, rollout_id: str | None) -> list[object]:
    """A device's stored additional assignments with ``model``'s set to ``version`` by ``rollout_id`` (None:
    removed); the others as they were, in name order."""
    keep = [x for x in doc or () if not (isinstance(x, dict) and x.get("model") == model)]
    if version is not None:
        keep.append({"model": model, "version": version, "rollout_id": rollout_id})
    return sorted(keep, key=lambda x: str(x.get("model")) if isinstance(x, dict) else "")


def held_by(doc: Iterable[object] | None, model: str) -> str | None:
    """The rollout that set ``model``'s additional assignment, if any."""
    for x in doc or ():
        if isinstance(x, dict) and x.get("model") == model:
            rid = x.get("rollout_id")
            return rid if isinstance(rid, str) else None
    return None


def beside(held: Iterable[Held], model: str) -> list[Held]:
    """The models that run beside ``model`` on a device assigned ``held``, in name order."""
    return sorted((h for h in held if h.model != model), key=lambda h: h.model)


def memory_problem(needs_mb: int | None, others: Sequence[Held], device_mb: int | None) -> str | None:
    """Why a package that needs ``needs_mb`` does not fit beside ``others`` in ``device_mb``, with the numbers;
    None when it fits, when the device's memory is unknown, or when nothing runs beside it (the single-model check,
    ``package.compat.check_requirements``, owns that message). Models that declare no memory count as 0 MB."""
    if device_mb is None or not others:
        return None
    theirs = sum(h.memory_mb or 0 for h in others)
    total = (needs_mb or 0) + theirs
    if total <= device_mb:
        return None
    named = ", ".join(f"{h.model} {h.version} ({h.memory_mb or 0} MB)" for h in others)
    return f"needs {needs_mb or 0} MB with {named} beside it ({total} MB in all); the device has {device_mb} MB"


def served_version(served: ServedModel, statuses: Iterable[ModelStatus], model: str) -> str | None:
    """The version of ``model`` the device reports serving: the first model's from ``served``, an additional
    model's from its status. A rollout of ``model`` counts a device already serving its version as committed."""
    if served.model == model:
        return served.version
    for st in statuses:
        if st.model == model:
            return st.version
    return None
