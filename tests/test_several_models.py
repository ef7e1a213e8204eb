"""Several models per device: the wire (additional assignments and per-model status, left out when empty so older
agents and servers keep working) and the pure decisions of controlplane/assignments.py."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from pydantic import ValidationError

from edgefleet.agent.modelunit import folder_name_ok
from edgefleet.agent.updater import ControlPlaneClient
from edgefleet.controlplane.assignments import (
    Held,
    Move,
    Slot,
    additional_of,
    assigned,
    beside,
    held_by,
    memory_problem,
    move_for,
    served_version,
)
from edgefleet.controlplane.devices import render
from edgefleet.protocol import AgentState, DesiredState, ModelAssignment, ModelStatus, Report, ServedModel

B1 = ModelAssignment(model="b", version="1.0.0", target="b-1.0.0.efpkg")

# ------------------------------------------------------------------------------------------------ the wire


def test_a_desired_state_without_additional_models_renders_as_before() -> None:
    body = render(DesiredState(device_id="d1", model="a", version="1.0.0", target="a-1.0.0.efpkg"))
    assert b"models" not in body
    # an agent that predates the field reads it (the wire forbids unknown fields, so absence is what matters)
    assert DesiredState.model_validate_json(body).models == []


def test_a_desired_state_carries_additional_models_beside_the_first() -> None:
    ds = DesiredState(device_id="d1", model="a", version="1.0.0", target="a-1.0.0.efpkg", models=[B1])
    doc = json.loads(render(ds))
    assert doc["models"] == [
        {
            "model": "b",
            "version": "1.0.0",
            "target": "b-1.0.0.efpkg",
            "package_sha256": None,
            "rollout_id": None,
            "pinned": False,
        }
    ]
    assert DesiredState.model_validate(doc) == ds


@pytest.mark.parametrize(
    ("models", "why"),
    [
        ([B1, B1], "names a model twice"),
        ([ModelAssignment(model="a", version="2.0.0", target="a-2.0.0.efpkg")], "names a, the first model, again"),
    ],
)
def test_a_desired_state_names_each_model_once(models: list[ModelAssignment], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        DesiredState(device_id="d1", model="a", version="1.0.0", models=models)


def test_a_report_names_each_additional_model_once() -> None:
    st = ModelStatus(model="b", state=AgentState.committed, version="1.0.0")
    with pytest.raises(ValidationError, match="names a model twice"):
        Report(batch_id="b1", state=AgentState.idle, models=[st, st])


def _sent_report(report: Report) -> dict[str, object]:
    """The body the agent's control-plane client sends for ``report``."""
    seen: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        return httpx.Response(200, json={"accepted_batch_ids": [report.batch_id]})

    async def send() -> None:
        cp = ControlPlaneClient("http://cp.test", transport=httpx.MockTransport(answer))
        cp.device_id, cp.credential = "d1", "c"
        try:
            await cp.report(report)
        finally:
            await cp.aclose()

    asyncio.run(send())
    doc: dict[str, object] = json.loads(seen[0])
    return doc


def test_the_agent_leaves_per_model_status_out_of_a_report_without_additional_models() -> None:
    assert "models" not in _sent_report(Report(batch_id="b1", state=AgentState.idle))


def test_the_agent_reports_each_additional_models_status() -> None:
    st = ModelStatus(model="b", state=AgentState.rolled_back, version="1.0.0", reason="health check failed")
    doc = _sent_report(Report(batch_id="b1", state=AgentState.committed, models=[st]))
    assert doc["models"] == [st.model_dump(mode="json")]
    assert Report.model_validate(doc).models == [st]


# ------------------------------------------------------------------------------------------------ which assignment


@pytest.mark.parametrize(
    ("first", "additional", "model", "move"),
    [
        ((None, None), {}, "b", Move(Slot.first, None)),  # a bare device: its first model
        (("a", "1.0.0"), {}, "a", Move(Slot.first, "1.0.0")),  # a new version of the first model
        (("a", "1.0.0"), {}, "b", Move(Slot.additional, None)),  # b added beside a
        (("a", "1.0.0"), {"b": "1.0.0"}, "b", Move(Slot.additional, "1.0.0")),  # b's assignment moves
        (("a", "1.0.0"), {"b": "1.0.0"}, "c", Move(Slot.additional, None)),  # c beside both
    ],
)
def test_a_move_writes_the_rolled_out_models_assignment_only(
    first: tuple[str | None, str | None], additional: dict[str, str], model: str, move: Move
) -> None:
    assert move_for(first[0], first[1], additional, model) == move


def test_a_move_adds_or_replaces_only_its_models_assignment_and_a_rollback_returns_it() -> None:
    doc: list[object] = [{"model": "c", "version": "1.0.0", "rollout_id": "r0"}]
    moved = assigned(doc, "b", "2.0.0", "r1")
    assert additional_of(moved) == {"b": "2.0.0", "c": "1.0.0"} and held_by(moved, "b") == "r1"
    assert additional_of(assigned(moved, "b", "1.0.0", None)) == {"b": "1.0.0", "c": "1.0.0"}  # its previous version
    assert assigned(moved, "b", None, None) == doc  # it had none: removed
    assert doc == [{"model": "c", "version": "1.0.0", "rollout_id": "r0"}]  # not changed in place
    assert additional_of([{"model": "x"}, "junk", None]) == {}  # a stored entry that no longer parses is skipped


# ------------------------------------------------------------------------------------------------ memory


def test_the_memory_check_sums_every_model_assigned_and_names_the_numbers() -> None:
    others = beside([Held("b", "1.0.0", 300), Held("a", "1.0.0", 400), Held("c", "2.0.0", 100)], "c")
    assert [h.model for h in others] == ["a", "b"]
    assert memory_problem(200, others, 1024) is None  # 900 MB in all
    assert memory_problem(400, others, 1024) == (
        "needs 400 MB with a 1.0.0 (400 MB), b 1.0.0 (300 MB) beside it (1100 MB in all); the device has 1024 MB"
    )


def test_the_memory_check_leaves_single_models_and_unknown_memory_to_the_package_check() -> None:
    assert memory_problem(4096, [], 1024) is None  # package.compat.check_requirements says that one
    assert memory_problem(4096, [Held("a", "1.0.0", 400)], None) is None
    # a model that declares no memory counts as 0 MB, not as "does not fit"
    assert memory_problem(None, [Held("a", "1.0.0", None)], 1) is None
    assert memory_problem(None, [Held("a", "1.0.0", 2)], 1) == (
        "needs 0 MB with a 1.0.0 (2 MB) beside it (2 MB in all); the device has 1 MB"
    )


# ------------------------------------------------------------------------------------------------ served version


def test_the_served_version_of_a_model_is_read_from_its_own_status() -> None:
    served = ServedModel(model="a", version="1.0.0")
    statuses = [ModelStatus(model="b", state=AgentState.committed, version="2.0.0")]
    assert served_version(served, statuses, "a") == "1.0.0"
    assert served_version(served, statuses, "b") == "2.0.0"
    assert served_version(served, statuses, "c") is None


@pytest.mark.parametrize(
    ("name", "ok"),
    [("beta", True), ("det-v2.onnx_x", True), ("../x", False), ("a/b", False), (".hidden", False), ("a..b", False)],
)
def test_an_additional_models_folder_is_named_by_the_model_only_when_safe(name: str, ok: bool) -> None:
    assert folder_name_ok(name) is ok
