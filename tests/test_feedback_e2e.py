"""Ground-truth feedback end to end with real agents (docs/operations.md, "Field accuracy"): two `edgefleet agent`
processes, each serving the OIP port through its own inference worker, answer digits with request ids; the client
reports each image's true class to ``POST /v2/models/digits/feedback``. Field accuracy per version × tier reaches
the fleet API and the dashboard, feedback for an unknown id is a 404 counted as unmatched, and a canary of a
version that mispredicts on purpose is rolled back on its field accuracy against the control device."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from _fleet_support import TIER, AgentProc, Fleet
from conftest import free_port
from edgefleet import examples
from edgefleet.controlplane.reconciler import reconcile_once
from edgefleet.data import CallData
from edgefleet.package import build_package


def _argmin_model(path: Path) -> Path:
    """A "classifier" of digits that answers the index of the darkest pixel: valid, fast, and almost always wrong."""
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 64])
    y = helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])
    node = helper.make_node("ArgMin", ["X"], ["label"], axis=1, keepdims=0)
    model = helper.make_model(
        helper.make_graph([node], "argmin", [x], [y]), opset_imports=[helper.make_opsetid("", 13)]
    )
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _until(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        last = pred()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


class _Traffic:
    """Per agent, in a thread: infer one digit with a fresh id, then report its true class."""

    def __init__(self, urls: list[str], digits: examples.Digits) -> None:
        self.x, self.y = digits.x_test.astype(np.float32), digits.y_test
        self.stop = threading.Event()
        self.answers: dict[int, int] = {}
        self.threads = [threading.Thread(target=self._run, args=(u,), daemon=True) for u in urls]

    def _run(self, url: str) -> None:
        i = 0
        with httpx.Client(base_url=url, timeout=10) as c:
            while not self.stop.is_set():
                k = i % len(self.y)
                rid = f"{url[-5:]}-{i}"
                i += 1
                body = {
                    "id": rid,
                    "inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": self.x[k].tolist()}],
                }
                try:
                    r = c.post("/v2/models/digits/infer", json=body)
                    if r.status_code != 200:
                        time.sleep(0.05)  # switching versions: 503 for a moment
                        continue
                    assert r.json()["id"] == rid
                    f = c.post("/v2/models/digits/feedback", json={"id": rid, "label": int(self.y[k])})
                    self.answers[f.status_code] = self.answers.get(f.status_code, 0) + 1
                except httpx.HTTPError:
                    time.sleep(0.05)
                time.sleep(0.005)

    def __enter__(self) -> _Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)


@pytest.fixture
def agents(fleet: Fleet, tmp_path: Path) -> Iterator[list[AgentProc]]:
    procs = [
        AgentProc(fleet.url, fleet.enrollment_token(), tmp_path / f"dev{i}", free_port(), checkin=0.2, telemetry=0.5)
        for i in range(2)
    ]
    try:
        for a in procs:
            a.start()
        yield procs
    finally:
        for a in procs:
            a.stop()


def _rows(fleet: Fleet, version: str) -> list[dict[str, Any]]:
    return [r for r in fleet.api("GET", "/api/v1/fleet/field-accuracy") if r["version"] == version]


@pytest.mark.process
@pytest.mark.timeout(240)
def test_feedback_shows_as_field_accuracy_and_halts_a_canary(
    fleet: Fleet, agents: list[AgentProc], tmp_path: Path, mlp_path: Path, digits: examples.Digits
) -> None:
    calls = CallData({"X": digits.x_train[:8, None, :].astype(np.float32)})
    good = build_package(mlp_path, tmp_path / "digits-1.0.0.efpkg", name="digits", version="1.0.0", sample_inputs=calls)
    bad = build_package(
        _argmin_model(tmp_path / "argmin.onnx"),
        tmp_path / "digits-2.0.0.efpkg",
        name="digits",
        version="2.0.0",
        sample_inputs=calls,
    )
    fleet.publish(good, bad)
    _until(lambda: len(fleet.device_ids()) == 2, 60, "both agents to enroll")
    fleet.pin("1.0.0", probation_seconds=0.5, probation_requests=1000)
    for a in agents:
        a.wait_until(lambda a=a: a.serving() == "1.0.0", 90, "1.0.0 to serve")  # type: ignore[misc]

    # an id no request carried: a clear 404, counted as unmatched
    r = httpx.post(f"{agents[0].url}/v2/models/digits/feedback", json={"id": "never-served", "label": 3}, timeout=10)
    assert r.status_code == 404 and "no prediction to match feedback" in r.json()["error"], r.text

    with _Traffic([a.url for a in agents], digits) as traffic:
        row = _until(
            lambda: [x for x in _rows(fleet, "1.0.0") if x["matched"] >= 100 and x["unmatched"] >= 1],
            60,
            "field accuracy of 1.0.0",
        )[0]
        assert row["tier"] == TIER and row["accuracy"] > 0.8, row
        page = fleet.http.get("/", headers=fleet.h()).text
        assert 'id="field-accuracy"' in page and 'data-version="1.0.0"' in page

        policy = {
            "waves": [50, 100],
            "bake_s": 3600,
            "min_devices": 1,
            "min_requests": 0,
            "auto_rollback": True,
            "max_p95_ratio": 1000,
            "min_field_accuracy_vs_control": 0.9,
            "field_accuracy_min_samples": 40,
        }
        fleet.pin(None)
        rid = fleet.api("POST", "/api/v1/rollouts", json={"model": "digits", "version": "2.0.0", "policy": policy})[
            "rollout_id"
        ]

        def ended() -> dict[str, Any] | None:
            reconcile_once(fleet.store)
            ro: dict[str, Any] = fleet.api("GET", f"/api/v1/rollouts/{rid}")
            return ro if ro["state"] not in ("running", "draft", "blocked") else None

        ro = _until(ended, 150, "the 2.0.0 rollout to end")
        assert ro["state"] == "rolled_back" and "field accuracy" in ro["reason"], ro
        canary = _until(lambda: _rows(fleet, "2.0.0"), 30, "field accuracy of 2.0.0")[0]
        assert canary["tier"] == TIER and canary["accuracy"] < 0.5, canary
        assert canary["confusions"], canary
        # the control device never left 1.0.0 (the canary's previous desired state was a pin, lifted above: the
        # rollback leaves it without one rather than back on 1.0.0)
        assert [a.serving() for a in agents].count("1.0.0") >= 1
    assert traffic.answers.get(200, 0) >= 200, traffic.answers
