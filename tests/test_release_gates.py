"""Release gates the control plane enforces: a version is promoted or rolled out only with a passing gate verdict
bound to its package's SHA-256 (the default release policy), evidence for another package is refused, an admin's
``--force`` overrides and is audited, the policy has a global default and per-model overrides; the pipeline attaches
the evidence (``models attach``, ``publish --gate --bench``) and ``package`` fills lineage and metrics from the
optimize and bench reports; the dashboard's model page shows each version's evidence chain — on SQLite and on the
real PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from _cp_support import CP, build_pkg, gate_verdict
from _package_helpers import assert_refused, run_cli

POLICY = {"waves": [100], "bake_s": 0, "min_devices": 1, "min_requests": 1}
NOWHERE = "http://127.0.0.1:9"  # never reached: these commands stop at their files


@pytest.fixture(scope="module")
def pkgs(mlp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pkgs")
    return {v: build_pkg(mlp_path, d, v) for v in ("1.0.0", "2.0.0")}


def _cli(capsys: pytest.CaptureFixture[str], cp: CP, *args: str, token: str | None = None) -> tuple[int, str, str]:
    return run_cli(capsys, *args, "--server", cp.url, "--api-token", token or cp.admin)


def _write(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _post(cp: CP, path: str, body: dict[str, Any], token: str | None = None) -> Any:
    return cp.http.post(path, json=body, headers=cp.h(token))


def _rollout(version: str, **extra: Any) -> dict[str, Any]:
    return {"model": "digits", "version": version, "policy": POLICY, **extra}


def _bench_report(results: list[tuple[str, str]]) -> dict[str, Any]:
    """A BENCH.json with one ok result per (model sha256, tier)."""
    from edgefleet.bench.env import fingerprint
    from edgefleet.bench.report import (
        BenchReport,
        BenchSettings,
        CompatEntry,
        LatencyQuantile,
        LatencyStats,
        ModelResult,
    )
    from edgefleet.bench.tiers import get_tier

    out = []
    for i, (sha, tier) in enumerate(results):
        p95 = 1.5 + i
        qs = [
            LatencyQuantile(q=q, value_ms=v, ci_low_ms=v * 0.9, ci_high_ms=v * 1.1, n=2000, relative_half_width=0.01)
            for q, v in ((0.5, p95 / 2), (0.95, p95), (0.99, p95 * 1.2))
        ]
        out.append(
            ModelResult(
                model=f"model-{sha[:4]}.onnx",
                model_sha256=sha,
                model_size_bytes=40_000,
                tier=tier,
                tier_profile=get_tier(tier),
                status="ok",
                inputs="generated",
                cold_start_ms=20.0 + i,
                peak_rss_mb=80.0 + i,
                latency=LatencyStats(
                    n=2000,
                    mean_ms=p95 / 2,
                    quantiles=qs,
                    stopped_by="precision",
                    target_relative_half_width=0.02,
                    duration_s=1.0,
                ),
                compat=CompatEntry(tier=tier, runtime_version="1.32.0", model_sha256=sha, result="verified"),
            )
        )
    return BenchReport(environment=fingerprint(), settings=BenchSettings(), results=out).model_dump(mode="json")


def _optimize_report(output_sha256: str, parent_sha256: str) -> dict[str, Any]:
    from edgefleet.optimize.candidates import Recipe
    from edgefleet.optimize.evaluate import MetricValues
    from edgefleet.optimize.report import CandidateReport, OpCoverage, OptimizeReport

    base = MetricValues(metric="top1", overall=0.975, per_slice={"0": 1.0, "1": 0.95})
    got = MetricValues(metric="top1", overall=0.97, per_slice={"0": 1.0, "1": 0.93})
    recipe = Recipe(kind="static", per_channel=True)
    chosen = CandidateReport(
        name=recipe.name,
        recipe=recipe,
        status="chosen",
        metrics=got,
        within_tolerance=True,
        op_coverage=OpCoverage(quantized=["fc1", "fc2"], float=["softmax"]),
        size_bytes=12_000,
    )
    first = CandidateReport(name="input", recipe=Recipe(kind="input"), status="baseline", metrics=base)
    return OptimizeReport(
        model="model.onnx",
        model_sha256=parent_sha256,
        output="model.opt.onnx",
        output_sha256=output_sha256,
        tier="x86-avx2",
        metric="top1",
        max_accuracy_drop=0.01,
        max_slice_drop=0.05,
        eval_calls=360,
        calib_calls=200,
        baseline_metrics=base,
        input_size_bytes=40_000,
        float_size_bytes=40_000,
        kept_input=False,
        chosen=chosen,
        candidates=[first, chosen],
        reason="fastest within tolerance",
        runtime_version="1.20.0",
        time_budget_s=60,
        time_spent_s=12,
    ).model_dump(mode="json")


# ------------------------------------------------------------------------------------------------ enforcement


def test_an_ungated_version_is_refused_until_a_verdict_for_its_package_is_attached(
    cp: CP, pkgs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sha = cp.upload(pkgs["2.0.0"], gate=False)["package_sha256"]
    why = f"digits 2.0.0 has no passing gate verdict for package sha256 {sha[:12]}"
    r = _post(cp, "/api/v1/rollouts", _rollout("2.0.0"))
    assert r.status_code == 409 and why in r.json()["detail"] and "edgefleet models attach" in r.json()["detail"]
    r = _post(cp, "/api/v1/models/digits/versions/2.0.0/promote", {})
    assert r.status_code == 409 and why in r.json()["detail"]
    code, _, err = _cli(capsys, cp, "rollout", "start", "digits", "2.0.0", "--waves", "100")
    assert_refused(code, err, match=why, exit_code=3)  # a conflict
    code, _, err = _cli(capsys, cp, "models", "promote", "digits", "2.0.0")
    assert_refused(code, err, match=why, exit_code=3)
    code, out, _ = _cli(capsys, cp, "rollout", "start", "digits", "2.0.0", "--dry-run")
    assert code == 0 and "the release policy refuses it" in out and sha[:12] in out
    assert cp.api("GET", "/api/v1/rollouts") == []
    assert cp.api("GET", "/api/v1/models/digits/versions/2.0.0")["channel"] == "dev"

    # the verdict `edgefleet gate --package PKG --json` printed: it names the package file it judged
    gate = _write(tmp_path / "gate.json", {**gate_verdict(), "inputs": {"package": str(pkgs["2.0.0"])}})
    code, out, err = _cli(capsys, cp, "models", "attach", "digits", "2.0.0", "--gate", str(gate))
    assert code == 0, err
    assert "the release policy admits it" in out
    release = cp.api("GET", "/api/v1/models/digits/versions/2.0.0")["release"]
    assert release["allowed"] and release["gate_matches_package"] and release["gate"]["package_sha256"] == sha
    code, out, err = _cli(capsys, cp, "rollout", "start", "digits", "2.0.0", "--waves", "100")
    assert code == 0 and "rollout ro-" in out, err
    assert cp.api("POST", "/api/v1/models/digits/versions/2.0.0/promote")["channel"] == "canary"


def test_force_takes_an_admin_and_a_reason_and_is_audited(
    cp: CP, pkgs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cp.upload(pkgs["2.0.0"], gate=False)
    op = cp.token("operator")
    r = _post(cp, "/api/v1/rollouts", _rollout("2.0.0", force=True))
    assert r.status_code == 400 and "--force needs --reason" in r.json()["detail"]
    r = _post(cp, "/api/v1/rollouts", _rollout("2.0.0", force=True, reason="hotfix"), token=op)
    assert r.status_code == 403 and "admin" in r.json()["detail"]
    code, out, err = _cli(
        capsys, cp, "rollout", "start", "digits", "2.0.0", "--waves", "100", "--force", "--reason", "hotfix #7"
    )
    assert code == 0, err
    found = re.search(r"rollout (ro-\w+)", out)
    assert found is not None, out
    rid = found.group(1)
    first = cp.api("GET", f"/api/v1/rollouts/{rid}")["transitions"][0]
    assert "overriding the release policy: hotfix #7" in first["reason"]
    cp.api("POST", f"/api/v1/rollouts/{rid}/abort")
    cp.api("POST", "/api/v1/models/digits/versions/2.0.0/promote", json={"force": True, "reason": "staging"})
    entries = cp.api("GET", "/api/v1/audit", params={"action": "release.override"})
    by_what = {e["detail"]["overrode"]: e for e in entries}
    assert set(by_what) == {"rollout.start", "model.promote"}
    start = by_what["rollout.start"]
    assert start["actor"].startswith("token:") and start["target"] == "digits:2.0.0"
    assert start["detail"]["reason"] == "hotfix #7" and "no passing gate verdict" in start["detail"]["refusal"]
    assert by_what["model.promote"]["detail"]["reason"] == "staging"
    overrides = cp.api("GET", "/api/v1/models/digits/versions/2.0.0")["release"]["overrides"]
    assert sorted(o["reason"] for o in overrides) == ["hotfix #7", "staging"]


def test_evidence_for_another_package_or_model_is_refused(cp: CP, pkgs: dict[str, Path]) -> None:
    v1 = cp.upload(pkgs["1.0.0"], gate=False)
    v2 = cp.upload(pkgs["2.0.0"], gate=False)
    url = "/api/v1/models/digits/versions/2.0.0"

    def put(kind: str, body: dict[str, Any], sha: str | None = None) -> Any:
        params = {"package_sha256": sha} if sha else None
        return cp.http.put(f"{url}/{kind}", json=body, params=params, headers=cp.h())

    r = put("gate", gate_verdict(), v1["package_sha256"])
    assert r.status_code == 409, r.text
    assert v1["package_sha256"][:12] in r.json()["detail"] and v2["package_sha256"][:12] in r.json()["detail"]
    assert put("gate", {**gate_verdict(), "package_sha256": v1["package_sha256"]}).status_code == 409
    assert (
        put("gate", {**gate_verdict(), "package_sha256": v2["package_sha256"]}, v1["package_sha256"]).status_code == 409
    )
    assert put("gate", {"verdict": "pass"}).status_code == 400  # not a verdict
    assert put("bench", {"results": [{"package_sha256": v1["package_sha256"], "tier": "rpi4"}]}).status_code == 409
    r = put("bench", _bench_report([("c" * 64, "x86-avx2")]))
    assert r.status_code == 409 and "measured other models" in r.json()["detail"]
    assert cp.api("GET", url)["gate"] is None and cp.api("GET", url)["bench"] is None  # nothing was kept

    # a report holding this model and another: only this model's results count for the matrix
    mixed = _bench_report([(v2["model_sha256"], "x86-avx2"), ("c" * 64, "arm-a72")])
    release = put("bench", mixed).json()["release"]
    assert release["bench"]["bound"] and release["bench"]["results"] == 1 and release["bench"]["other_results"] == 1
    cells = {(c["tier"], c["version"]) for c in cp.api("GET", "/api/v1/compat")}
    assert ("x86-avx2", "2.0.0") in cells and ("arm-a72", "2.0.0") not in cells

    def refusal() -> str:
        plan = cp.api("POST", "/api/v1/rollouts/plan", json=_rollout("2.0.0"))
        return str(plan["release"]["refusal"] or "")

    assert "none is attached" in refusal()
    put("gate", gate_verdict())  # names no package: kept and shown, but it cannot let the version through
    assert "the attached verdict names no package" in refusal()
    put("gate", gate_verdict(passed=False), v2["package_sha256"])
    assert "digits 2.0.0 failed its gate" in refusal()
    # a failing verdict blocks even where the policy asks for none
    cp.api("PUT", "/api/v1/models/digits/release-policy", json={"require_gate": False})
    assert "failed its gate" in refusal()
    put("gate", gate_verdict(), v2["package_sha256"])
    assert refusal() == ""
    assert cp.api("POST", "/api/v1/rollouts", json=_rollout("2.0.0"))["rollout_id"]


def test_release_policy_has_a_global_default_and_per_model_overrides(
    cp: CP, pkgs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    doc = cp.api("GET", "/api/v1/release-policy")
    assert doc["effective"] == {"require_gate": True, "require_bench": False}
    assert doc["source"]["require_gate"] == "default" and doc["models"] == {}
    v = cp.upload(pkgs["2.0.0"], gate=False)
    op = cp.token("operator")
    assert cp.http.put("/api/v1/release-policy", json={"require_gate": False}, headers=cp.h(op)).status_code == 403

    def refusal() -> str | None:
        plan = cp.api("POST", "/api/v1/rollouts/plan", json=_rollout("2.0.0"))
        return plan["release"]["refusal"]

    code, out, err = _cli(capsys, cp, "models", "policy", "digits", "--no-require-gate", "--reason", "internal")
    assert code == 0 and "require_gate = false (model)" in out, err
    assert refusal() is None
    code, out, err = _cli(capsys, cp, "models", "policy", "--require-bench")
    assert code == 0 and "require_bench = true (global)" in out, err
    assert "has no bench results" in (refusal() or "")
    cp.api("PUT", "/api/v1/models/digits/versions/2.0.0/bench", json=_bench_report([(v["model_sha256"], "arm-a72")]))
    assert refusal() is None
    code, out, err = _cli(capsys, cp, "models", "policy", "digits", "--inherit")
    assert code == 0 and "require_gate = true (default)" in out, err
    assert "no passing gate verdict" in (refusal() or "")
    assert cp.http.delete("/api/v1/models/digits/release-policy", headers=cp.h()).status_code == 404
    changes = cp.api("GET", "/api/v1/audit", params={"action": "release.policy"})
    assert {e["target"] for e in changes} == {"digits", "*"}
    assert any(e["detail"].get("reason") == "internal" for e in changes)


def test_publish_attaches_gate_and_bench(
    cp: CP, pkgs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pkg = pkgs["1.0.0"]
    from edgefleet.package import open_package

    model_sha = open_package(pkg).model_sha256
    gate = _write(tmp_path / "gate.json", {**gate_verdict(), "inputs": {"package": str(pkg)}})
    bench = _write(tmp_path / "bench.json", _bench_report([(model_sha, "x86-avx2")]))
    args = ["publish", str(pkg), "--gate", str(gate), "--bench", str(bench), "--json"]
    code, out, err = _cli(capsys, cp, *args)
    assert code == 0, err
    release = json.loads(out)["release"]
    assert release["allowed"] and release["gate_matches_package"] and release["bench"]["tiers"] == ["x86-avx2"]
    assert release["package_sha256"] == _sha(pkg)
    # the verdict of another package is refused before anything is uploaded
    other = _write(tmp_path / "other.json", {**gate_verdict(), "inputs": {"package": str(pkg)}})
    code, _, err = _cli(capsys, cp, "publish", str(pkgs["2.0.0"]), "--gate", str(other))
    assert_refused(code, err, match="gate this package")
    assert [v["version"] for v in cp.api("GET", "/api/v1/models/digits")["versions"]] == ["1.0.0"]
    code, _, err = run_cli(capsys, "publish", str(pkg), "--repo", str(tmp_path / "repo"), "--gate", str(gate))
    assert_refused(code, err, match="use them with --server")


def test_model_page_shows_each_versions_evidence_chain(cp: CP, pkgs: dict[str, Path]) -> None:
    v1 = cp.upload(pkgs["1.0.0"])
    cp.api("PUT", "/api/v1/models/digits/versions/1.0.0/bench", json=_bench_report([(v1["model_sha256"], "arm-a72")]))
    cp.upload(pkgs["2.0.0"], gate=False)
    cp.api("POST", "/api/v1/models/digits/versions/2.0.0/promote", json={"force": True, "reason": "demo day"})
    page = cp.http.get("/models/digits", headers=cp.h()).text

    def section(version: str) -> str:
        m = re.search(rf'id="evidence-{re.escape(version)}".*?</table>', page, re.S)
        assert m, page
        return m.group(0)

    one, two = section("1.0.0"), section("2.0.0")
    assert "require_gate = yes" in one and "(default)" in one
    assert "admitted" in one and "matches" in one and v1["package_sha256"][:12] in one
    assert "present" in one and "arm-a72" in one
    assert "refused" in two and "has no passing gate verdict" in two
    assert "none attached" in two and "demo day" in two and "model.promote" in two
    assert re.search(r'<tr data-version="2.0.0">.*?data-release="refused".*?forced', page, re.S)


# ------------------------------------------------------------------------------------------------ files (no server)


def test_models_attach_refuses_the_wrong_file_in_one_line(
    pkgs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _write(tmp_path / "bench.json", _bench_report([("a" * 64, "x86-avx2")]))
    bare = _write(tmp_path / "bare.json", gate_verdict())  # gated without --package: names none
    judged = _write(tmp_path / "judged.json", {**gate_verdict(), "inputs": {"package": str(pkgs["1.0.0"])}})

    def attach(*args: str) -> tuple[int, str, str]:
        return run_cli(capsys, "models", "attach", "digits", "2.0.0", *args, "--server", NOWHERE)

    assert_refused(*attach("--gate", str(bench))[::2], match="is a bench report, not a gate verdict")
    assert_refused(*attach("--bench", str(judged))[::2], match="is a gate verdict, not a bench report")
    assert_refused(*attach("--gate", str(bare))[::2], match="does not say which package it judged")
    code, _, err = attach("--gate", str(judged), "--package", str(pkgs["2.0.0"]))
    assert_refused(code, err, match="not " + str(pkgs["2.0.0"]))
    assert_refused(*attach()[::2], match="--gate gate.json and/or --bench")


def test_package_fills_lineage_and_metrics_from_the_reports(
    mlp_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sha = _sha(mlp_path)
    opt = _write(tmp_path / "optimize.json", _optimize_report(sha, "d" * 64))
    bench = _write(
        tmp_path / "bench.json", _bench_report([(sha, "x86-avx2"), ("e" * 64, "x86-avx2"), (sha, "arm-a72")])
    )
    base = ["package", str(mlp_path), "--name", "digits", "--version", "1.0.0"]
    code, out, err = run_cli(
        capsys, *base, "-o", str(tmp_path / "a.efpkg"), "--optimize-report", str(opt), "--bench", str(bench), "--json"
    )
    assert code == 0, err
    m = json.loads(out)["manifest"]
    lin = m["lineage"]
    assert lin["parent_sha256"] == "d" * 64 and lin["recipe"]["kind"] == "static" and lin["recipe"]["per_channel"]
    assert lin["quantized_ops"] == ["fc1", "fc2"]
    acc = lin["accuracy"]
    assert acc["metric"] == "top1" and acc["parent"] == 0.975 and acc["value"] == 0.97
    assert acc["drop"] == pytest.approx(0.005) and acc["slice_drops"] == {"0": 0.0, "1": pytest.approx(0.02)}
    assert acc["max_drop"] == 0.01 and acc["max_slice_drop"] == 0.05
    # only the packaged model's results (the second model's p95 would be 2.5 ms)
    assert m["metrics"]["latency_p95_ms"] == {"x86-avx2": 1.5, "arm-a72": 3.5}
    assert m["metrics"]["latency_p99_ms"]["x86-avx2"] == pytest.approx(1.8)
    assert m["metrics"]["cold_start_ms"] == {"x86-avx2": 20.0, "arm-a72": 22.0}
    assert m["metrics"]["peak_rss_mb"] == {"x86-avx2": 80.0, "arm-a72": 82.0}
    # explicit files win over the reports
    mine = _write(tmp_path / "metrics.json", {"latency_p95_ms": {"x86-avx2": 9.0}, "owner": "team-a"})
    code, out, err = run_cli(
        capsys, *base, "-o", str(tmp_path / "b.efpkg"), "--bench", str(bench), "--metrics-json", str(mine), "--json"
    )
    assert code == 0, err
    metrics = json.loads(out)["manifest"]["metrics"]
    assert metrics["latency_p95_ms"] == {"x86-avx2": 9.0} and metrics["owner"] == "team-a"
    # without the reports the manifest has no trace of the new fields: packages built before them are unchanged
    code, out, err = run_cli(capsys, *base, "-o", str(tmp_path / "c.efpkg"), "--json")
    assert code == 0, err
    assert set(json.loads(out)["manifest"]["lineage"]) == {"parent_sha256", "recipe", "calibration_sha256"}


def test_package_refuses_the_wrong_report_in_one_line(
    mlp_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sha = _sha(mlp_path)
    opt = _write(tmp_path / "optimize.json", _optimize_report(sha, "d" * 64))
    foreign_opt = _write(tmp_path / "foreign.json", _optimize_report("f" * 64, "d" * 64))
    bench = _write(tmp_path / "bench.json", _bench_report([(sha, "x86-avx2")]))
    foreign_bench = _write(tmp_path / "foreign-bench.json", _bench_report([("e" * 64, "x86-avx2")]))
    base = ["package", str(mlp_path), "-o", str(tmp_path / "x.efpkg"), "--name", "digits", "--version", "1.0.0"]
    cases = [
        (["--metrics-json", str(bench)], "is a whole bench report: pass it as --bench"),
        (["--lineage-json", str(opt)], "is an optimize report: pass it as --optimize-report"),
        (["--optimize-report", str(bench)], "is a bench report: pass it as --bench"),
        (["--bench", str(opt)], "is an optimize report: pass it as --optimize-report"),
        (["--optimize-report", str(foreign_opt)], "describes model.opt.onnx"),
        (["--bench", str(foreign_bench)], "has no result for"),
        (["--optimize-report", str(_write(tmp_path / "junk.json", {"chosen": 1}))], "is not the report.json"),
        (["--bench", str(_write(tmp_path / "junk2.json", {"results": []}))], "is not a bench report"),
    ]
    for args, match in cases:
        code, _, err = run_cli(capsys, *base, *args)
        assert_refused(code, err, match=match)
    assert not (tmp_path / "x.efpkg").exists()
