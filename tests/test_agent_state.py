"""The agent's state file survives what a device's disk and a downgrade do to it (``agent/state.py``): a newer
agent's fields are ignored, an unreadable file falls back to the previous step's copy, then to the slot files on
disk; :meth:`StateStore.load` never raises, and a real agent over a garbage state file serves its model (its
control plane, the real one, unreachable behind the faulty edge of ``tests/_fleet_support.py``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from _fleet_support import AgentProc, Fleet, install, make_packages
from conftest import free_port
from edgefleet import examples
from edgefleet.agent.state import PersistedState, SlotInfo, StateStore
from edgefleet.protocol import AgentState

V1 = SlotInfo(slot="A", model="digits", version="1.0.0", target="digits-1.0.0.efpkg", rollout_id="r1")
V2 = SlotInfo(slot="B", model="digits", version="2.0.0", target="digits-2.0.0.efpkg", rollout_id="r2")
COMMITTED = PersistedState(state=AgentState.committed, committed=V1, active=V1, refused=["r0|digits-0.efpkg"])
PROBATION = COMMITTED.with_(state=AgentState.probation, active=V2)


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory: pytest.TempPathFactory, mlp_path: Path, digits: examples.Digits) -> dict[str, Path]:
    return make_packages(mlp_path, digits.x_test, tmp_path_factory.mktemp("pkgs"), ["1.0.0", "2.0.0"])


def _two_steps(d: Path) -> StateStore:
    """A store whose file holds PROBATION, saved after COMMITTED (so ``prev`` holds COMMITTED)."""
    store = StateStore(d)
    store.save(COMMITTED)
    store.save(PROBATION)
    return store


def test_each_save_keeps_the_previous_step(tmp_path: Path) -> None:
    store = _two_steps(tmp_path)
    assert PersistedState.model_validate_json(store.prev.read_bytes()) == COMMITTED
    assert StateStore(tmp_path).load() == PROBATION
    assert not list(tmp_path.glob("*.tmp"))


def test_a_newer_agents_fields_are_ignored_and_not_written_back(tmp_path: Path) -> None:
    doc = json.loads(COMMITTED.model_dump_json())
    doc["fleet_epoch"] = 7  # a field some later agent writes
    doc["committed"]["signature"] = "ab" * 8
    (tmp_path / "state.json").write_text(json.dumps(doc))
    store = StateStore(tmp_path)
    assert store.load() == COMMITTED
    store.save(store.load().with_(reason="written by this agent"))
    written = json.loads((tmp_path / "state.json").read_text())
    assert "fleet_epoch" not in written and "signature" not in written["committed"]
    assert not (tmp_path / "state.json.unreadable").exists()


BAD = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "garbage": lambda raw: os.urandom(200) + b"\x00\xff",
    "empty": lambda raw: b"",
    "wrong type": lambda raw: raw.replace(b'"refused": [', b'"refused": 5, "x": ['),
    "unknown state": lambda raw: raw.replace(b'"probation"', b'"quarantined"'),
    "a list": lambda raw: b"[1, 2]",
}


@pytest.mark.parametrize("damage", list(BAD))
def test_an_unreadable_file_falls_back_to_the_previous_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    _two_steps(tmp_path)
    raw = (tmp_path / "state.json").read_bytes()
    bad = BAD[damage](raw)
    (tmp_path / "state.json").write_bytes(bad)
    with caplog.at_level(logging.WARNING, "edgefleet.agent"):
        s = StateStore(tmp_path).load()
    assert s == COMMITTED
    assert "is unreadable" in caplog.text and "restored from the previous step's" in caplog.text
    assert (tmp_path / "state.json.unreadable").read_bytes() == bad  # kept for whoever debugs the device
    # the fallback is on disk now: the next start reads it, and the damaged file never becomes ``prev``
    again = StateStore(tmp_path)
    assert again.load() == COMMITTED
    again.save(COMMITTED.with_(reason="next step"))
    assert PersistedState.model_validate_json((tmp_path / "state.json.prev").read_bytes()) == COMMITTED


def test_load_never_raises_whatever_the_truncation(tmp_path: Path) -> None:
    _two_steps(tmp_path)
    raw = (tmp_path / "state.json").read_bytes()
    prev = (tmp_path / "state.json.prev").read_bytes()
    for cut in range(0, len(raw), 7):
        (tmp_path / "state.json").write_bytes(raw[:cut])
        (tmp_path / "state.json.prev").write_bytes(prev[: cut // 2])  # both damaged: rebuilt from the (no) slots
        s = StateStore(tmp_path).load()
        assert s.state in (AgentState.idle, AgentState.committed, AgentState.probation)


def test_both_unreadable_and_no_slot_starts_clean(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "state.json").write_bytes(b"\x00garbage")
    (tmp_path / "state.json.prev").write_bytes(b"{")
    with caplog.at_level(logging.WARNING, "edgefleet.agent"):
        s = StateStore(tmp_path).load()
    assert s.state is AgentState.idle and s.active is None and s.committed is None
    assert "no installed model on disk" in (s.reason or "")
    assert "rebuilding the state from the slot files" in caplog.text


def _slot(d: Path, slot: str, pkg: Path, mtime: float) -> None:
    p = d / "slots" / f"{slot}.efpkg"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(pkg.read_bytes())
    os.utime(p, (mtime, mtime))


def test_both_unreadable_serves_the_single_slot_on_disk(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    _slot(tmp_path, "B", pkgs["1.0.0"], 1_000_000)
    (tmp_path / "state.json").write_bytes(b"garbage")
    s = StateStore(tmp_path).load()
    assert s.state is AgentState.committed and s.committed == s.active
    assert s.active is not None and (s.active.slot, s.active.version, s.active.target) == (
        "B",
        "1.0.0",
        "digits-1.0.0.efpkg",
    )
    assert s.active.model_sha256 is not None and s.active.package_sha256 is not None
    assert StateStore(tmp_path).load() == s  # written back: the next start reads it without a fallback


def test_of_two_slots_the_newer_serves_on_probation_over_the_older(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    _slot(tmp_path, "A", pkgs["2.0.0"], 2_000_000)  # staged last
    _slot(tmp_path, "B", pkgs["1.0.0"], 1_000_000)
    (tmp_path / "slots" / "junk").write_text("not a slot")
    (tmp_path / "state.json").write_bytes(b"{")
    s = StateStore(tmp_path).load()
    assert s.state is AgentState.probation
    assert s.active is not None and (s.active.slot, s.active.version) == ("A", "2.0.0")
    assert s.committed is not None and (s.committed.slot, s.committed.version) == ("B", "1.0.0")


def test_a_corrupt_slot_is_not_served(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    _slot(tmp_path, "A", pkgs["2.0.0"], 2_000_000)
    (tmp_path / "slots" / "A.efpkg").write_bytes((tmp_path / "slots" / "A.efpkg").read_bytes()[:5000])
    _slot(tmp_path, "B", pkgs["1.0.0"], 1_000_000)
    (tmp_path / "state.json").write_bytes(b"")
    s = StateStore(tmp_path).load()
    assert s.state is AgentState.committed and s.active is not None and s.active.slot == "B"


def test_an_intact_committed_entry_is_salvaged(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    _slot(tmp_path, "A", pkgs["1.0.0"], 1_000_000)
    _slot(tmp_path, "B", pkgs["2.0.0"], 2_000_000)
    doc = json.loads(COMMITTED.model_dump_json())
    doc["probation_resumes"] = "many"  # one field of a type this agent cannot read
    (tmp_path / "state.json").write_text(json.dumps(doc))
    s = StateStore(tmp_path).load()
    assert s.state is AgentState.committed and s.committed == V1 and s.active == V1  # its rollout id included


def test_a_missing_state_file_with_models_on_disk_is_rebuilt(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    assert StateStore(tmp_path).load() == PersistedState()  # a new device: nothing to rebuild, nothing written
    assert not (tmp_path / "state.json").exists()
    _slot(tmp_path, "A", pkgs["1.0.0"], 1_000_000)
    s = StateStore(tmp_path).load()
    assert s.state is AgentState.committed and s.active is not None and s.active.version == "1.0.0"


@pytest.mark.process
@pytest.mark.timeout(240)
def test_a_real_agent_over_a_garbage_state_file_serves(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    fleet = Fleet(tmp_path / "cp")
    fleet.publish(pkgs["1.0.0"])
    token = fleet.enrollment_token()  # minted before the link goes down: the admin API is behind the edge too
    fleet.faults.offline = True  # a device that cannot reach anyone: what it serves comes from its disk alone
    data = tmp_path / "device"
    install(data, pkgs["1.0.0"])
    garbage = b"\x7fELF\x00\x00 not a state file"
    (data / "state.json").write_bytes(garbage)
    agent = AgentProc(fleet.url, token, data, free_port())
    try:
        agent.start()
        agent.wait_until(lambda: agent.serving() == "1.0.0", 120, "the agent to serve 1.0.0 over a garbage state")
        assert (data / "state.json.unreadable").read_bytes() == garbage
        assert PersistedState.model_validate_json((data / "state.json").read_bytes()).active is not None
        agent.stop()
        # a newer agent's file (a downgrade): its unknown fields are ignored
        doc = json.loads((data / "state.json").read_text())
        (data / "state.json").write_text(json.dumps({**doc, "introduced_later": {"x": 1}}))
        agent.start()
        agent.wait_until(lambda: agent.serving() == "1.0.0", 120, "the agent to serve 1.0.0 over a newer state")
    finally:
        agent.stop()
        fleet.close()
