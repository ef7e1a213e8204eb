"""The A/B slot store: two package files on disk, ``slots/A.efpkg`` and ``slots/B.efpkg``.

An update is staged into the slot that is neither committed nor active, by a durable rename of the verified
download. Which slot serves is a field of the persisted state (``state.py``), so switching is the state file's
atomic rename, and a slot file is only ever replaced while nothing points at it.
"""

from __future__ import annotations

from pathlib import Path

from edgefleet.agent.durable import durable_rename
from edgefleet.agent.state import PersistedState, Slot

__all__ = ["SlotStore"]


class SlotStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "slots"
        self.downloads = data_dir / "downloads"
        self.root.mkdir(parents=True, exist_ok=True)
        self.downloads.mkdir(parents=True, exist_ok=True)

    def path(self, slot: Slot) -> Path:
        return self.root / f"{slot}.efpkg"

    @staticmethod
    def idle_slot(s: PersistedState) -> Slot:
        """The slot no one serves from or falls back to."""
        used = {x.slot for x in (s.committed, s.active) if x is not None}
        return "B" if "A" in used else "A"

    def stage(self, verified: Path, slot: Slot) -> Path:
        dst = self.path(slot)
        durable_rename(verified, dst, "stage")
        return dst

    def partial(self, target: str) -> Path:
        return self.downloads / f"{target}.partial"

    def clear_downloads(self, keep: str | None = None) -> None:
        for p in self.downloads.iterdir():
            if keep is None or not p.name.startswith(keep):
                p.unlink(missing_ok=True)
