"""Fleet drift on the control plane: the registry keeps each package's drift reference, the fleet's per-bin counts
are merged across windows and devices and scored against it (never a maximum of per-window PSIs), a feature short
of the minimum sample is "not enough data", ``/metrics`` exports a PSI gauge per feature with data, the rollout's
drift threshold judges the treatment on its merged counts, and the dashboard shows the same figures — on SQLite
and on the real PostgreSQL."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from _cp_support import CP, SimDevice, build_pkg
from edgefleet.controlplane.db import ModelVersion
from edgefleet.controlplane.reconciler import reconcile_once
from edgefleet.controlplane.rollout import RolloutPolicy
from edgefleet.package import open_package
from edgefleet.telemetry.drift import MIN_DRIFT_SAMPLE, DriftReference, FeatureReference, psi


@pytest.fixture(scope="module")
def pkgs(mlp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pkgs")
    return {
        "1.0.0": build_pkg(mlp_path, d, "1.0.0", reference_calls=50),
        "2.0.0": build_pkg(mlp_path, d, "2.0.0", reference_calls=50),
        "plain": build_pkg(mlp_path, d / "plain", "9.0.0"),
    }


@pytest.fixture(scope="module")
def ref(pkgs: dict[str, Path]) -> DriftReference:
    r = open_package(pkgs["1.0.0"]).reference
    assert r is not None
    assert r == open_package(pkgs["2.0.0"]).reference  # same reference data: the versions' bins agree
    return r


def _feature(ref: DriftReference) -> FeatureReference:
    return next(f for f in ref.features if f.name == "in.X.mean")


def steady(f: FeatureReference, k: int) -> dict[str, Any]:
    """``k`` times the reference's own counts: no drift; the device's own PSI says nothing either way."""
    counts = [c * k for c in f.counts]
    return {"feature": f.name, "psi": 0.0, "n": round(sum(counts)), "counts": counts}


def drifted(f: FeatureReference, n: int) -> dict[str, Any]:
    """Every call in the first bin. The device's own PSI is reported as 0: the fleet figure must not read it."""
    return {"feature": f.name, "psi": 0.0, "n": n, "counts": [float(n)] + [0.0] * (len(f.counts) - 1)}


def _drift_row(cp: CP, feature: str, version: str = "1.0.0") -> dict[str, Any]:
    rows = cp.api("GET", "/api/v1/fleet")["drift"]
    return dict(next(x for x in rows if x["feature"] == feature and x["version"] == version))


def test_registry_keeps_the_packages_drift_reference(cp: CP, pkgs: dict[str, Path], ref: DriftReference) -> None:
    v = cp.upload(pkgs["1.0.0"])
    assert v["drift_features"] == [f.name for f in ref.features]
    plain = cp.upload(pkgs["plain"])
    assert plain["drift_features"] is None
    with cp.store.db.session() as s:
        stored = s.scalar(select(ModelVersion.drift_reference).where(ModelVersion.version == "1.0.0"))
        assert DriftReference.model_validate(stored) == ref
        assert s.scalar(select(ModelVersion.drift_reference).where(ModelVersion.version == "9.0.0")) is None
    full = cp.api("GET", "/api/v1/models/digits/versions/1.0.0")
    assert "in.X.mean" in full["drift_features"]


def test_fleet_psi_is_scored_on_counts_merged_across_devices(
    cp: CP, pkgs: dict[str, Path], ref: DriftReference
) -> None:
    cp.upload(pkgs["1.0.0"])
    f = _feature(ref)
    a, b = cp.device("t"), cp.device("t")
    half = MIN_DRIFT_SAMPLE * 3 // 4  # each device alone is short of the minimum sample
    a.report(model="digits", version="1.0.0", drift=[drifted(f, half)])
    row = _drift_row(cp, f.name)
    assert row["psi"] is None and row["status"] == "not enough data" and row["n"] == half
    assert cp.api("GET", "/api/v1/fleet")["drift_alerts"] == []
    metrics = cp.http.get("/metrics", headers=cp.h()).text
    assert "edgefleet_drift_psi{" not in metrics and "edgefleet_drift_alerts 0.0" in metrics

    b.report(model="digits", version="1.0.0", drift=[drifted(f, half)])
    merged = [2.0 * half] + [0.0] * (len(f.counts) - 1)
    row = _drift_row(cp, f.name)
    assert row["n"] == 2 * half and row["status"] == "alert"
    assert row["psi"] == pytest.approx(psi(f.counts, merged), abs=1e-4)
    others = [x for x in cp.api("GET", "/api/v1/fleet")["drift"] if x["feature"] != f.name]
    assert others and all(x["psi"] is None and x["status"] == "not enough data" for x in others)
    k = cp.api("GET", "/api/v1/fleet")
    assert k["drift_alerts"] == [{"model": "digits", "version": "1.0.0", "feature": f.name, "psi": row["psi"]}]
    metrics = cp.http.get("/metrics", headers=cp.h()).text
    gauge = re.findall(r"^edgefleet_drift_psi\{([^}]*)\} (\S+)$", metrics, re.M)
    assert len(gauge) == 1  # only the feature with enough data
    assert f'feature="{f.name}"' in gauge[0][0] and 'version="1.0.0"' in gauge[0][0]
    assert float(gauge[0][1]) == pytest.approx(row["psi"])
    assert "edgefleet_drift_alerts 1.0" in metrics

    # the dashboard shows the same figure, and "not enough data" where there is none
    page = cp.http.get("/", headers=cp.h()).text
    m = re.search(rf'<tr data-feature="{re.escape(f.name)}" data-version="1.0.0">.*?data-psi>([^<]*)<', page, re.S)
    assert m and m.group(1) == f"{row['psi']:.3f}"
    assert "not enough data" in page and re.search(r'data-testid="kpi-drift">1<', page)

    # steady traffic from a third device dilutes the merged counts: the figure follows the fleet, not a maximum
    c = cp.device("t")
    c.report(model="digits", version="1.0.0", drift=[steady(f, 40)])
    assert _drift_row(cp, f.name)["psi"] < row["psi"]


def test_windows_of_a_package_without_reference_have_no_drift_figure(cp: CP, pkgs: dict[str, Path]) -> None:
    cp.upload(pkgs["plain"])
    d = cp.device("t")
    counts = [100.0] * 10
    d.report(model="digits", version="9.0.0", drift=[{"feature": "in.X.mean", "psi": 3.0, "n": 1000, "counts": counts}])
    k = cp.api("GET", "/api/v1/fleet")
    assert k["drift"] == [] and k["drift_alerts"] == []  # a device's own PSI of 3.0 is not a fleet figure


def _baseline(cp: CP, devs: list[SimDevice]) -> None:
    """Everyone on 1.0.0 through a completed first rollout."""
    rid = cp.api(
        "POST",
        "/api/v1/rollouts",
        json={"model": "digits", "version": "1.0.0", "policy": {"waves": [100], "bake_s": 0, "min_devices": 1}},
    )["rollout_id"]
    reconcile_once(cp.store)
    for d in devs:
        d.served = "1.0.0"
        d.report(model="digits", version="1.0.0", events=[("committed", None)], rollout_id=rid, requests=100)
    reconcile_once(cp.store)
    assert cp.api("GET", f"/api/v1/rollouts/{rid}")["state"] == "completed"


def test_a_rollout_whose_treatment_drifts_beyond_max_psi_is_rolled_back(
    cp: CP, pkgs: dict[str, Path], ref: DriftReference
) -> None:
    cp.upload(pkgs["1.0.0"])
    cp.upload(pkgs["2.0.0"])
    f = _feature(ref)
    devs = [cp.device("t") for _ in range(4)]
    _baseline(cp, devs)
    policy = {"waves": [50, 100], "bake_s": 3600, "min_devices": 1, "min_requests": 10, "auto_rollback": True}
    rid = cp.api("POST", "/api/v1/rollouts", json={"model": "digits", "version": "2.0.0", "policy": policy})[
        "rollout_id"
    ]
    reconcile_once(cp.store)
    canary = [d for d in devs if d.desired()["version"] == "2.0.0"]
    control = [d for d in devs if d not in canary]
    assert len(canary) == 2

    def report_round(n: int) -> None:
        for d in canary:
            first = d.served != "2.0.0"
            d.served = "2.0.0"
            d.report(
                model="digits",
                version="2.0.0",
                events=[("committed", None)] if first else [],
                rollout_id=rid,
                drift=[drifted(f, n)],
            )
        for d in control:
            d.report(model="digits", version="1.0.0", drift=[steady(f, 3)])

    report_round(MIN_DRIFT_SAMPLE // 4)  # drifting, but the canary's merged sample is still short of the minimum
    reconcile_once(cp.store)
    r = cp.api("GET", f"/api/v1/rollouts/{rid}")
    assert r["state"] == "running" and "baking" in r["reason"], r["reason"]
    report_round(MIN_DRIFT_SAMPLE // 2)  # now it has it
    reconcile_once(cp.store)
    r = cp.api("GET", f"/api/v1/rollouts/{rid}")
    assert r["state"] == "rolled_back", r["reason"]
    assert r["reason"].startswith("automatic rollback: wave 0 failed: drift PSI") and f"on {f.name}" in r["reason"]
    assert "vs control" in r["reason"]
    assert all(d.desired()["version"] == "1.0.0" for d in devs)

    # the rollout page shows the canary's and the control's drift the way the reconciler judged them
    page = cp.http.get(f"/rollouts/{rid}", headers=cp.h()).text
    wave0 = re.search(r'<tr data-wave="0".*?</tr>', page, re.S)
    assert wave0
    canary_psi = re.search(r"data-canary-psi>([\d.]+)<", wave0.group(0))
    control_psi = re.search(r"data-control-psi>([\d.]+)<", wave0.group(0))
    assert canary_psi and control_psi
    assert float(canary_psi.group(1)) > RolloutPolicy().max_psi > float(control_psi.group(1))
