"""Release vs production: the gate compares the candidate's evaluation with the version devices run today, on
hand-built optimize reports (no models, no timing), through the pure verdict and the real CLI."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

from _package_helpers import run_cli
from edgefleet.bench.env import fingerprint
from edgefleet.bench.report import BenchReport, BenchSettings
from edgefleet.errors import ConfigError
from edgefleet.gate import Verdict, evaluate, parse_policy, to_junit
from edgefleet.gate.checks import CheckResult

PARENT = "b" * 64  # the float model both versions were optimized from
CAND_SHA, PROD_SHA = "c" * 64, "d" * 64
BENCH = BenchReport(environment=fingerprint(), settings=BenchSettings(), results=[])
PARENT_SCORES = {"metric": "top1", "overall": 0.960, "per_slice": {"cat": 0.97, "dog": 0.95, "owl": 0.96}}
PROD_SCORES = {"metric": "top1", "overall": 0.950, "per_slice": {"cat": 0.96, "dog": 0.94, "owl": 0.95}}


def _report(chosen: dict[str, Any], *, output: str = CAND_SHA, model: str = PARENT) -> dict[str, Any]:
    """The fields of an optimize REPORT.json the gate reads."""
    return {
        "model_sha256": model,
        "output_sha256": output,
        "metric": chosen.get("metric", "top1"),
        "baseline_metrics": PARENT_SCORES,
        "chosen": {"name": "int8", "status": "chosen", "metrics": chosen},
    }


PROD = _report(PROD_SCORES, output=PROD_SHA)


def _verdict(policy: dict[str, Any], cand: dict[str, Any] | None, prod: dict[str, Any] | None) -> Verdict:
    return evaluate(parse_policy(policy), BENCH, cand, None, prod)


def _by_name(checks: list[CheckResult]) -> dict[str, CheckResult]:
    return {c.name: c for c in checks}


PRODUCTION = {"production": {"max_drop": 0.01, "max_slice_drop": 0.03}}


def test_a_candidate_worse_than_production_on_one_slice_fails_naming_the_slice() -> None:
    # Overall only 0.005 below production and within its float parent's tolerance: the parent check alone passes.
    cand = {"metric": "top1", "overall": 0.945, "per_slice": {"cat": 0.97, "dog": 0.89, "owl": 0.96}}
    v = _verdict({"accuracy": {"max_drop": 0.02, "max_slice_drop": 0.06}, **PRODUCTION}, _report(cand), PROD)
    checks = _by_name(v.checks)
    assert checks["accuracy.drop"].status == "pass" and checks["accuracy.worst_slice"].status == "pass"
    assert checks["accuracy.vs_production.drop"].status == "pass"
    worst = checks["accuracy.vs_production.worst_slice"]
    assert worst.status == "fail" and "'dog'" in worst.reason and "exceeds the 0.03 allowed" in worst.reason
    assert worst.measured == pytest.approx(0.05) and worst.limit == 0.03
    assert not v.passed and v.status == "fail" and "accuracy.vs_production.worst_slice" in v.reason
    # both comparisons are in the verdict with their numbers
    assert v.accuracy["vs_parent"].drop == pytest.approx(0.015)
    prod = v.accuracy["vs_production"]
    assert (prod.reference, prod.candidate, prod.drop) == pytest.approx((0.95, 0.945, 0.005))
    assert prod.worst_slice == "dog" and prod.worst_slice_drop == pytest.approx(0.05)
    assert prod.reference_sha256 == PROD_SHA
    # the two accuracy judgements sit together, in a fixed order
    assert [c.name for c in v.checks] == [
        "accuracy.drop",
        "accuracy.worst_slice",
        "accuracy.vs_production.drop",
        "accuracy.vs_production.worst_slice",
    ]


def test_worse_overall_fails_and_within_tolerance_passes() -> None:
    worse = {"metric": "top1", "overall": 0.92, "per_slice": {"cat": 0.96, "dog": 0.93, "owl": 0.94}}
    v = _verdict(PRODUCTION, _report(worse), PROD)
    drop = _by_name(v.checks)["accuracy.vs_production.drop"]
    assert drop.status == "fail" and "0.0300 worse, exceeds the 0.01 allowed" in drop.reason
    assert drop.measured == pytest.approx(0.03)

    close = {"metric": "top1", "overall": 0.942, "per_slice": {"cat": 0.95, "dog": 0.915, "owl": 0.96}}
    v = _verdict(PRODUCTION, _report(close), PROD)
    assert v.passed and [c.status for c in v.checks] == ["pass", "pass"], v.reason
    assert "within the 0.01 allowed" in v.checks[0].reason and "'dog'" in v.checks[1].reason

    better = {"metric": "top1", "overall": 0.97, "per_slice": {"cat": 0.98, "dog": 0.96, "owl": 0.97}}
    v = _verdict(PRODUCTION, _report(better), PROD)
    assert v.passed and "0.0200 better" in v.checks[0].reason


def test_the_default_tolerance_is_not_worse_at_all() -> None:
    v = _verdict({"production": {}}, _report({"metric": "top1", "overall": 0.949}), PROD)
    assert [c.name for c in v.checks] == ["accuracy.vs_production.drop"] and v.checks[0].status == "fail"
    v = _verdict({"production": {}}, _report(PROD_SCORES), PROD)
    assert v.passed and v.checks[0].reason.endswith("equal")


def test_no_production_report_skips_unless_required() -> None:
    policy = {"accuracy": {"max_drop": 0.02}, **PRODUCTION}
    v = _verdict(policy, _report(PROD_SCORES), None)
    checks = _by_name(v.checks)
    assert checks["accuracy.vs_production.drop"].status == "skipped"
    assert checks["accuracy.vs_production.worst_slice"].status == "skipped"
    assert "--production-report" in checks["accuracy.vs_production.drop"].reason
    # a skipped check does not block: the first release has no production to compare with
    assert v.passed and v.status == "pass" and v.counts["skipped"] == 2
    assert "(2 skipped" in v.reason and "vs_production" not in v.accuracy

    required = {"production": {"max_drop": 0.01, "required": True}}
    v = _verdict(required, _report(PROD_SCORES), None)
    assert not v.passed and v.checks[0].status == "fail"
    assert "requires a comparison with production" in v.checks[0].reason
    assert "--production-report" in v.checks[0].reason

    # nothing but skipped checks judged nothing: that is no pass
    v = _verdict(PRODUCTION, _report(PROD_SCORES), None)
    assert not v.passed and "every check was skipped" in v.reason


@pytest.mark.parametrize(
    ("cand", "prod", "why"),
    [
        # scored by different metrics
        (_report({"metric": "agreement", "overall": 0.99}), PROD, "scored by agreement but production by top1"),
        # agreement with its own input model: versions optimized from different models do not compare
        (
            _report({"metric": "agreement", "overall": 0.99}),
            _report({"metric": "agreement", "overall": 0.95}, output=PROD_SHA, model="e" * 64),
            "scores each model against its own input model",
        ),
        # so do CTC text agreement, the worst call's cosine and a user's metric (it is handed the input's outputs)
        *(
            (
                _report({"metric": m, "overall": 0.99}),
                _report({"metric": m, "overall": 0.95}, output=PROD_SHA, model="e" * 64),
                "scores each model against its own input model",
            )
            for m in ("ctc", "cosine-min", "my_metrics:cer")
        ),
        # no candidate scores
        (None, PROD, "no optimize report given"),
        ({"chosen": {}}, PROD, "lacks an overall score in chosen.metrics"),
    ],
)
def test_scores_that_do_not_compare_are_inconclusive_or_fail_when_required(
    cand: dict[str, Any] | None, prod: dict[str, Any], why: str
) -> None:
    v = _verdict({"production": {"max_drop": 0.01}}, cand, prod)
    assert v.checks[0].status == "inconclusive" and why in v.checks[0].reason and not v.passed
    v = _verdict({"production": {"max_drop": 0.01, "required": True}}, cand, prod)
    assert v.checks[0].status == "fail" and why in v.checks[0].reason


def test_label_free_scores_compare_when_both_come_from_the_same_input_model() -> None:
    prod = _report({"metric": "agreement", "overall": 0.99}, output=PROD_SHA)
    v = _verdict({"production": {"max_drop": 0.005}}, _report({"metric": "agreement", "overall": 0.97}), prod)
    assert v.checks[0].status == "fail" and v.checks[0].measured == pytest.approx(0.02)


def test_slices_that_do_not_line_up_are_not_judged() -> None:
    cand = {"metric": "top1", "overall": 0.95, "per_slice": {"cat": 0.96, "dog": 0.94}}
    v = _verdict(PRODUCTION, _report(cand), PROD)
    worst = _by_name(v.checks)["accuracy.vs_production.worst_slice"]
    assert worst.status == "inconclusive" and "'owl'" in worst.reason
    v = _verdict(PRODUCTION, _report({"metric": "top1", "overall": 0.95}), PROD)
    assert _by_name(v.checks)["accuracy.vs_production.worst_slice"].status == "inconclusive"
    assert v.checks[0].status == "pass"


def test_policy_section_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"unknown field 'production.max_slcie_drop'"):
        parse_policy({"production": {"max_slcie_drop": 0.03}})
    with pytest.raises(ConfigError, match=r"field 'production.max_drop'"):
        parse_policy({"production": {"max_drop": -0.01}})


def test_junit_carries_the_checks_and_both_comparisons() -> None:
    cand = {"metric": "top1", "overall": 0.945, "per_slice": {"cat": 0.97, "dog": 0.89, "owl": 0.96}}
    v = _verdict({"accuracy": {"max_drop": 0.02}, **PRODUCTION}, _report(cand), PROD)
    root = to_junit(v).getroot()
    suite = root.find("testsuite")
    assert suite is not None
    cases = {c.attrib["name"]: c for c in suite.findall("testcase")}
    assert cases["accuracy.vs_production.drop"].find("failure") is None
    failure = cases["accuracy.vs_production.worst_slice"].find("failure")
    assert failure is not None and "'dog'" in failure.attrib["message"]
    props = {p.attrib["name"]: p.attrib["value"] for p in suite.iter("property")}
    assert props["accuracy.vs_parent"].startswith("top1 0.9450 vs its float parent")
    assert "0.0150 worse" in props["accuracy.vs_parent"]
    assert props["accuracy.vs_production"].startswith(f"top1 0.9450 vs production ({PROD_SHA[:12]}) 0.9500")
    assert "worst slice 'dog' 0.0500 worse" in props["accuracy.vs_production"]
    assert suite.attrib["failures"] == "1" and suite.attrib["tests"] == str(len(cases))

    skipped = _verdict({"accuracy": {"max_drop": 0.02}, **PRODUCTION}, _report(cand), None)
    suite = to_junit(skipped).getroot().find("testsuite")
    assert suite is not None and suite.attrib["skipped"] == "2" and suite.attrib["failures"] == "0"
    for case in suite.findall("testcase"):
        outcome = [el.tag for el in case if el.tag in ("failure", "skipped")]
        assert outcome == (["skipped"] if "vs_production" in case.attrib["name"] else [])


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "policy.yaml").write_text("production: {max_drop: 0.01, max_slice_drop: 0.03}\n")
    (tmp_path / "bench.json").write_text(BENCH.model_dump_json())
    worse = {"metric": "top1", "overall": 0.946, "per_slice": {"cat": 0.96, "dog": 0.90, "owl": 0.95}}
    (tmp_path / "report.json").write_text(json.dumps(_report(worse)))
    (tmp_path / "prod.json").write_text(json.dumps(PROD))
    base: list[str | Path] = ["gate", "--policy", tmp_path / "policy.yaml", "--bench", tmp_path / "bench.json"]
    base += ["--optimize-report", tmp_path / "report.json"]

    code, out, _ = run_cli(capsys, *base, "--production-report", tmp_path / "prod.json", "--junit", tmp_path / "g.xml")
    assert code == 1
    assert "accuracy.vs_production.worst_slice" in out and "'dog'" in out
    assert "accuracy vs production: top1 0.9460 vs production" in out
    cases = [c.attrib["name"] for c in ET.parse(tmp_path / "g.xml").getroot().iter("testcase")]
    assert cases == ["accuracy.vs_production.drop", "accuracy.vs_production.worst_slice"]

    code, out, _ = run_cli(capsys, *base, "--production-report", tmp_path / "prod.json", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["inputs"]["production_report"] == str(tmp_path / "prod.json")
    assert doc["accuracy"]["vs_production"]["worst_slice"] == "dog"
    assert doc["accuracy"]["vs_parent"]["reference"] == PARENT_SCORES["overall"]

    # the wrong file (a bench report) is a usage error in one line
    code, out, err = run_cli(capsys, *base, "--production-report", tmp_path / "bench.json")
    assert code == 2 and "production report" in err and "chosen.metrics" in err and "Traceback" not in err
    code, out, err = run_cli(capsys, *base, "--production-report", tmp_path / "missing.json")
    assert code == 2 and "does not exist" in err


def test_the_commented_example_in_examples_policy_yaml_is_a_valid_section() -> None:
    text = (Path(__file__).resolve().parents[1] / "examples" / "policy.yaml").read_text()
    block = [line for line in text.splitlines() if line.startswith("# production:") or line.startswith("#   ")]
    uncommented = "\n".join(line[2:].split(" #")[0].rstrip() for line in block)
    section = yaml.safe_load(uncommented)
    assert set(section["production"]) == {"max_drop", "max_slice_drop", "required"}
    assert parse_policy(section).policy.production is not None
