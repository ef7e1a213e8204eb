"""Policy files: the shipped example loads; bad files get a clear error naming the field (exit code 2)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from edgefleet.errors import ConfigError
from edgefleet.gate import CheckResult, decide, load_policy, parse_policy, to_junit

ROOT = Path(__file__).resolve().parents[1]


def test_example_policy_loads() -> None:
    resolved = load_policy(ROOT / "examples" / "policy.yaml")
    p = resolved.policy
    assert list(resolved.tiers) == ["x86-avx2"]
    assert p.latency is not None and p.latency.p95_ms == {"x86-avx2": 5.0}
    assert p.regression is not None and p.regression.max_slowdown == 0.05
    assert p.accuracy is not None and p.accuracy.max_slice_drop == 0.03


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("latncy: {p95_ms: {x86-avx2: 5}}", "'latncy'"),  # unknown section
        ("latency: {p59_ms: {x86-avx2: 5}}", "'latency.p59_ms'"),  # unknown key in a section
        ("latency: {p95_ms: {x86-avx2: fast}}", "'latency.p95_ms.x86-avx2'"),  # wrong type
        ("regression: {max_slowdown: -1}", "'regression.max_slowdown'"),  # out of range
        ("allow_inconclusive: maybe", "'allow_inconclusive'"),
        ("tiers: [x86-avx2, pentium-4]", "'tiers[1]'"),  # a tier that does not exist
        ("latency: {p95_ms: {pentium-4: 5}}", "'latency.p95_ms.pentium-4'"),
        ("tiers: [x86-avx2]\nlatency: {p95_ms: {arm-a72: 5}}", "'latency.p95_ms.arm-a72'"),  # not a target tier
        ("version: 2", "'version'"),
    ],
)
def test_bad_policy_names_the_field(tmp_path: Path, text: str, field: str) -> None:
    p = tmp_path / "policy.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_policy(p)
    assert field in str(info.value)
    assert str(p) in str(info.value)
    assert info.value.exit_code == 2


def test_unreadable_policies(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_policy(tmp_path / "none.yaml")
    p = tmp_path / "policy.yaml"
    p.write_text("latency: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_policy(p)
    # the position of the problem, as editors count it (line:column), not just "while parsing a flow sequence"
    p.write_text("accuracy:\n  max_drop: 0.01\n latency: 3\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(p))}:3:\d+: .* \(not valid YAML\)$"):
        load_policy(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_policy(p)


def test_tier_files_resolve_relative_to_the_policy(tmp_path: Path) -> None:
    (tmp_path / "edge.yaml").write_text(
        "name: edge-box\narch: x86_64\ncpu_threads: 1\nmemory_mb: 300\nruntime_version: '1.20.0'\n"
    )
    resolved = parse_policy({"tiers": ["edge.yaml"]}, "policy", tmp_path)
    assert resolved.tiers["edge-box"].memory_mb == 300


def _validate_junit(root: ET.Element) -> None:
    """Structure rules of the JUnit XML schema (Jenkins/Ant junit.xsd) that CI parsers rely on."""
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert suites
    for suite in suites:
        for attr in ("name", "tests", "failures", "errors"):
            assert attr in suite.attrib, attr
        cases = suite.findall("testcase")
        assert int(suite.attrib["tests"]) == len(cases)
        n_fail = n_skip = 0
        for case in cases:
            assert case.attrib.get("name") and case.attrib.get("classname")
            float(case.attrib.get("time", "0"))
            outcome = [c for c in case if c.tag in ("failure", "error", "skipped")]
            assert len(outcome) <= 1
            for c in case:
                assert c.tag in ("failure", "error", "skipped", "system-out", "system-err", "properties")
            n_fail += sum(1 for c in outcome if c.tag == "failure")
            n_skip += sum(1 for c in outcome if c.tag == "skipped")
            for c in outcome:
                if c.tag == "failure":
                    assert c.attrib.get("message")
        assert int(suite.attrib["failures"]) == n_fail
        assert int(suite.attrib.get("skipped", "0")) == n_skip


@pytest.mark.parametrize("allow", [False, True])
def test_junit_has_one_testcase_per_check(allow: bool, tmp_path: Path) -> None:
    checks = [
        CheckResult(name="latency.p95[x86-avx2]", status="pass", reason="p95 1.0 ms within 5 ms"),
        CheckResult(name="regression[x86-avx2]", status="fail", reason='median ratio 2.1 <slower> & "quoted"'),
        CheckResult(name="accuracy.drop", status="inconclusive", reason="no optimize report given"),
    ]
    verdict = decide(checks, allow_inconclusive=allow)
    out = tmp_path / "gate.xml"
    to_junit(verdict).write(out, encoding="utf-8", xml_declaration=True)
    root = ET.parse(out).getroot()
    _validate_junit(root)
    cases = root.findall("testsuite/testcase")
    assert [c.attrib["name"] for c in cases] == [c.name for c in checks]
    assert cases[0].find("failure") is None
    assert cases[1].find("failure") is not None
    assert (cases[2].find("skipped") is not None) is allow
    assert (cases[2].find("failure") is not None) is (not allow)
