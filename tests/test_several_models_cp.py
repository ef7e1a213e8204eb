"""Several models per device on the real control plane, its devices speaking the check-in protocol (no agents):
a rollout of a second model adds it beside the first on devices whose agent declares it serves several, its own
rollback returns only it, a rollout of the first model proceeds beside it, and the memory of every model assigned
must fit. The reconciler is stepped by the test."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _cp_support import CP, SimDevice
from edgefleet.controlplane import reconciler
from edgefleet.controlplane.db import Rollout
from edgefleet.data import CallData
from edgefleet.protocol import SEVERAL_MODELS_HEADER, Report
from edgefleet.telemetry.sketch import LatencySketch

POLICY = {"waves": [100], "bake_s": 0, "min_devices": 1, "min_requests": 0, "device_timeout_s": 0}


def pkg(mlp_path: Path, out: Path, name: str, version: str, memory_mb: int | None = None) -> Path:
    from edgefleet.package import Requirements, build_package

    x = np.random.default_rng(0).random((4, 1, 64), dtype=np.float32)
    out.mkdir(parents=True, exist_ok=True)
    return build_package(
        mlp_path,
        out / f"{name}-{version}.efpkg",
        name=name,
        version=version,
        sample_inputs=CallData({"X": x}),
        requirements=Requirements(min_memory_mb=memory_mb),
    )


def report(
    dev: SimDevice,
    *,
    first: tuple[str, str] | None,
    models: dict[str, tuple[str, str | None]] | None = None,
    events: Sequence[tuple[str, str, str, str | None]] = (),
    windows: Sequence[tuple[str, str]] = (),
    several: bool = True,
) -> None:
    """One report: the first model served, each additional model's (state, served version), update events
    (kind, model, version, rollout) and one window of 50 requests per (model, version)."""
    now = datetime.now(UTC)
    sk = LatencySketch()
    sk.extend([0.002] * 50)
    body = Report(
        batch_id=secrets.token_hex(6),
        state="committed",
        served={"model": first[0], "version": first[1]} if first else {},
        models=[{"model": m, "state": st, "version": v} for m, (st, v) in sorted((models or {}).items())],
        events=[
            {"event_id": secrets.token_hex(6), "at": now, "kind": k, "model": m, "version": v, "rollout_id": rid}
            for k, m, v, rid in events
        ],
        telemetry=[
            {
                "window_id": secrets.token_hex(6),
                "start": now - timedelta(seconds=10),
                "end": now,
                "model": m,
                "version": v,
                "requests": 50,
                "latency": sk.to_data(),
            }
            for m, v in windows
        ],
    )
    headers = {"Authorization": f"Bearer {dev.credential}", "Content-Type": "application/json"}
    if several:
        headers[SEVERAL_MODELS_HEADER] = "1"
    r = dev.cp.http.post(
        f"/api/v1/devices/{dev.id}/report",
        content=body.model_dump_json(exclude=None if body.models else {"models"}),
        headers=headers,
    )
    assert r.status_code == 200, r.text


def start(cp: CP, model: str, version: str, **policy: Any) -> str:
    body = {"model": model, "version": version, "policy": POLICY | policy}
    return str(cp.api("POST", "/api/v1/rollouts", json=body)["rollout_id"])


def step(cp: CP, rid: str) -> dict[str, Any]:
    with cp.store.db.session() as s:
        r = s.get(Rollout, rid)
        assert r is not None
        res = reconciler.step(s, r, "test", datetime.now(UTC))
    cp.store.refresh(res.touched)
    return dict(cp.api("GET", f"/api/v1/rollouts/{rid}"))


def additional(dev: SimDevice) -> dict[str, str]:
    return {m["model"]: m["version"] for m in dev.desired().get("models", [])}


@pytest.fixture
def fleet(cp: CP, tmp_path: Path, mlp_path: Path) -> tuple[CP, SimDevice, SimDevice]:
    """Two devices serving alpha 1.0.0 (600 MB): ``several`` declares it serves several models, ``single`` not."""
    out = tmp_path / "pkgs"
    for name, version, mb in [
        ("alpha", "1.0.0", 600),
        ("alpha", "2.0.0", 600),
        ("beta", "1.0.0", 200),
        ("beta", "2.0.0", 200),
        ("gamma", "1.0.0", 500),
    ]:
        cp.upload(pkg(mlp_path, out, name, version, mb))
    several, single = cp.device("x86"), cp.device("x86")
    rid = start(cp, "alpha", "1.0.0")
    step(cp, rid)
    for dev, declares in ((several, True), (single, False)):
        events = [("committed", "alpha", "1.0.0", rid)]
        report(dev, first=("alpha", "1.0.0"), events=events, windows=[("alpha", "1.0.0")], several=declares)
    assert step(cp, rid)["state"] == "completed"
    return cp, several, single


def test_a_second_model_joins_the_first_only_where_the_agent_serves_several(
    fleet: tuple[CP, SimDevice, SimDevice],
) -> None:
    cp, several, single = fleet
    rid = start(cp, "beta", "1.0.0")
    step(cp, rid)
    ds = several.desired()
    assert (ds["model"], ds["version"]) == ("alpha", "1.0.0")  # the first model stays
    assert ds["models"] == [
        {
            "model": "beta",
            "version": "1.0.0",
            "target": "beta-1.0.0.efpkg",
            "package_sha256": ds["models"][0]["package_sha256"],
            "rollout_id": rid,
            "pinned": False,
        }
    ]
    # an agent that never declared several models is not given a second one: its body is as before
    assert "models" not in single.desired() and single.desired()["model"] == "alpha"
    r = cp.api("GET", f"/api/v1/rollouts/{rid}")
    assert [d["device_id"] for d in r["devices"]] == [several.id]

    report(
        several,
        first=("alpha", "1.0.0"),
        models={"beta": ("committed", "1.0.0")},
        events=[("committed", "beta", "1.0.0", rid)],
        windows=[("alpha", "1.0.0"), ("beta", "1.0.0")],
    )
    assert step(cp, rid)["state"] == "completed"
    shown = cp.api("GET", f"/api/v1/devices/{several.id}")
    assert shown["several_models"] is True
    assert shown["models"] == [
        {
            "model": "beta",
            "desired_version": "1.0.0",
            "rollout_id": rid,
            "state": "committed",
            "served_version": "1.0.0",
            "reason": None,
        }
    ]
    listed = {d["device_id"]: d for d in cp.api("GET", "/api/v1/devices")}
    assert [m["model"] for m in listed[several.id]["models"]] == ["beta"] and listed[single.id]["models"] == []


def test_a_failed_second_model_rolls_back_alone_and_the_first_rolls_out_beside_it(
    fleet: tuple[CP, SimDevice, SimDevice],
) -> None:
    cp, several, _ = fleet
    rid1 = start(cp, "beta", "1.0.0")
    step(cp, rid1)
    report(several, first=("alpha", "1.0.0"), models={"beta": ("committed", "1.0.0")},
           events=[("committed", "beta", "1.0.0", rid1)], windows=[("beta", "1.0.0")])  # fmt: skip
    assert step(cp, rid1)["state"] == "completed"

    bad = start(cp, "beta", "2.0.0", auto_rollback=True)
    step(cp, bad)
    assert additional(several) == {"beta": "2.0.0"} and several.desired()["version"] == "1.0.0"
    report(
        several,
        first=("alpha", "1.0.0"),
        models={"beta": ("rolled_back", "1.0.0")},
        events=[("switched", "beta", "2.0.0", bad), ("rolled_back", "beta", "2.0.0", bad)],
        windows=[("alpha", "1.0.0"), ("beta", "1.0.0")],
    )
    r = step(cp, bad)
    assert r["state"] == "rolled_back", r["reason"]
    ds = several.desired()
    assert additional(several) == {"beta": "1.0.0"}  # its previous version, not removed
    assert (ds["model"], ds["version"]) == ("alpha", "1.0.0")  # the first model untouched

    # a rollout of the first model proceeds independently: beta's assignment stays as it is
    rid2 = start(cp, "alpha", "2.0.0")
    step(cp, rid2)
    ds = several.desired()
    assert (ds["model"], ds["version"], additional(several)) == ("alpha", "2.0.0", {"beta": "1.0.0"})
    report(several, first=("alpha", "2.0.0"), models={"beta": ("committed", "1.0.0")},
           events=[("committed", "alpha", "2.0.0", rid2)], windows=[("alpha", "2.0.0")])  # fmt: skip
    assert step(cp, rid2)["state"] == "completed"


def test_a_rollback_removes_a_model_the_device_did_not_have(fleet: tuple[CP, SimDevice, SimDevice]) -> None:
    cp, several, _ = fleet
    bad = start(cp, "beta", "2.0.0", auto_rollback=True)
    step(cp, bad)
    assert additional(several) == {"beta": "2.0.0"}
    report(several, first=("alpha", "1.0.0"), models={"beta": ("rolled_back", None)},
           events=[("health_check_failed", "beta", "2.0.0", bad)], windows=[("alpha", "1.0.0")])  # fmt: skip
    assert step(cp, bad)["state"] == "rolled_back"
    assert "models" not in several.desired() and several.desired()["version"] == "1.0.0"


def test_a_model_that_does_not_fit_beside_the_others_is_refused_with_the_numbers(
    fleet: tuple[CP, SimDevice, SimDevice],
) -> None:
    cp, several, _ = fleet
    rid = start(cp, "gamma", "1.0.0")
    r = step(cp, rid)
    assert r["state"] == "blocked"
    plan = cp.api("POST", "/api/v1/rollouts/plan", json={"model": "gamma", "version": "1.0.0", "policy": POLICY})
    assert plan["excluded"][several.id] == (
        "incompatible: needs 500 MB with alpha 1.0.0 (600 MB) beside it (1100 MB in all); the device has 1024 MB"
    )
    assert "models" not in several.desired()
