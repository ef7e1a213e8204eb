"""The Prometheus alert rules in deploy/prometheus/: valid for promtool, each alert firing in the case it is for and
quiet in a healthy one (promtool's unit tests, edgefleet-alerts.test.yml), each with a ``for:``, a severity and a
summary and description that point at its section of docs/alerts.md — and built only on metric names and label
values that the control plane's ``/metrics`` and the agent's registry really export."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from _cp_support import CP
from conftest import starts_processes
from edgefleet.agent.metrics import OUTCOMES, AgentMetrics
from edgefleet.controlplane.metrics import CHECKIN_ANSWERS
from edgefleet.controlplane.rollout import RolloutState
from edgefleet.telemetry.drift import PSI_ALERT

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "edgefleet-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "edgefleet-alerts.test.yml"
ALERTS_DOC = ROOT / "docs" / "alerts.md"
SEVERITIES = {"critical", "warning", "info"}


def _rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (`make system-deps` installs Debian's prometheus package, which has it)")
    return path


# ------------------------------------------------------------------------------------------------ promtool


@pytest.mark.process
def test_promtool_accepts_the_rules() -> None:
    r = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.process
def test_each_alert_fires_when_it_should_and_not_when_healthy() -> None:
    # promtool resolves rule_files relative to the test file
    r = subprocess.run(
        [_promtool(), "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {r["alert"] for r in _rules()}
    assert names - fires == set(), "alerts no promtool test sees firing"
    assert names - quiet == set(), "alerts no promtool test sees quiet in a healthy case"


# ------------------------------------------------------------------------------------------------ shape


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for m in re.finditer(r"^#+\s+(.+?)\s*$", markdown, re.M):
        out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_every_alert_waits_has_a_severity_and_says_what_to_do_with_a_link() -> None:
    anchors = _anchors(ALERTS_DOC.read_text())
    rules = _rules()
    assert len({r["alert"] for r in rules}) == len(rules), "two alerts share a name"
    for r in rules:
        name = r["alert"]
        assert "for" in r, f"{name} has no `for:`"
        assert r.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity not one of {sorted(SEVERITIES)}"
        notes = r.get("annotations", {})
        assert notes.get("summary") and notes.get("description"), f"{name} lacks a summary or a description"
        link = f"docs/alerts.md#{name.lower()}"
        assert notes.get("runbook") == link and notes["description"].endswith(f"See {link}"), name
        assert name.lower() in anchors, f"docs/alerts.md has no section {name}"


def test_the_drift_alert_uses_the_fleets_own_threshold() -> None:
    (drift,) = [r for r in _rules() if r["alert"] == "EdgefleetDriftHigh"]
    assert drift["expr"].endswith(f"> {PSI_ALERT}")


# ------------------------------------------------------------------------------------------------ metric names

_KEYWORDS = {"and", "or", "unless", "bool", "inf", "nan"}
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\w.])")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions or aggregations (followed
    by a parenthesis), keywords, label names (in matchers and label lists), durations or numbers."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\boffset\s+\w+", " ", e)
    e = _LABEL_LISTS.sub(" ", e)
    e = _NUMBER.sub(" ", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][\w:]*", e):
        if m.group(0).lower() in _KEYWORDS or e[m.end() :].lstrip().startswith("("):
            continue
        names.add(m.group(0))
    return names


def matchers(expr: str) -> list[tuple[str, str, str, str]]:
    """``(metric, label, operator, value)`` of every label matcher on a named selector."""
    return [
        (m.group(1), x.group(1), x.group(2), x.group(3))
        for m in _SELECTOR.finditer(expr)
        for x in _MATCHER.finditer(m.group(2))
    ]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ("max without (instance) (a_ratio) < 0.99", {"a_ratio"}),
        ('sum by (job) (rate(b_total{x="and or c_total"}[5m])) > 1e3', {"b_total"}),
        ("a > 0 unless on (job) sum without (instance, version) (b offset 1h) > 0", {"a", "b"}),
        ("x / ignoring(status) group_left(version) y", {"x", "y"}),
        ("histogram_quantile(0.95, sum by (le) (rate(h_bucket[10m])))", {"h_bucket"}),
        ("a > bool 2 and b == Inf or c != NaN", {"a", "b", "c"}),
        ("m_p95:ratio * 100", {"m_p95:ratio"}),
    ],
)
def test_metric_names_reads_only_the_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_matchers_reads_every_label_matcher() -> None:
    expr = 'a{state="paused"} or sum(rate(b_total{outcome=~"x|y", job!="z"}[5m]))'
    assert matchers(expr) == [
        ("a", "state", "=", "paused"),
        ("b_total", "outcome", "=~", "x|y"),
        ("b_total", "job", "!=", "z"),
    ]


def test_each_checkin_answer_is_answered_refused_or_failed_and_alerted_on_as_such() -> None:
    """Every status the server counts check-ins under belongs to exactly one of the check-in alerts: a new answer
    has to be placed before it is exported."""

    def answers(alert: str) -> set[str]:
        (rule,) = [r for r in _rules() if r["alert"] == alert]
        found = [v for m, k, _, v in matchers(rule["expr"]) if m == "edgefleet_checkins_total" and k == "answer"]
        assert found, f"{alert} reads no answer of edgefleet_checkins_total"
        return {a for v in found for a in v.split("|")}

    answered = answers("EdgefleetCheckinsStopped")
    failed = answers("EdgefleetCheckinErrors")
    refused = answers("EdgefleetCheckinsRefused")
    assert (answered, refused, failed) == ({"200", "304"}, {"401", "403"}, {"500", "503"})
    assert answered | refused | failed == set(CHECKIN_ANSWERS)


def _exported(text: str) -> dict[str, dict[str, set[str]]]:
    """Each series name an exposition exports, with the values it shows per label. A family exported without
    samples yet still names its series (a histogram its _bucket, _sum and _count)."""
    out: dict[str, dict[str, set[str]]] = {}
    for fam in text_string_to_metric_families(text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["_sum", "_count"]}
        for suffix in suffixes.get(fam.type, [""]):
            out.setdefault(fam.name + suffix, {})
        for s in fam.samples:
            labels = out.setdefault(s.name, {})
            for k, v in s.labels.items():
                labels.setdefault(k, set()).add(v)
    return out


@pytest.fixture
@starts_processes
def control_plane(tmp_path: Path) -> Iterator[CP]:
    c = CP(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}")
    yield c
    c.close()


@pytest.mark.process
def test_the_rules_read_only_metrics_and_labels_that_are_exported(control_plane: CP) -> None:
    cp = control_plane
    # a device that served, crashed once and committed an update: the ratios exist only with such data
    d = cp.device("t")
    d.desired()
    d.report(model="digits", version="1.0.0", crashes=1, events=[("committed", None)])
    server = _exported(cp.http.get("/metrics", headers=cp.h()).text)
    assert "edgefleet_crash_free_ratio" in server and "edgefleet_update_success_ratio" in server

    agent_metrics = AgentMetrics()
    agent_metrics.observe("digits", "1.0.0", 0.002, 0.0005, 0.001)
    for outcome in OUTCOMES:
        agent_metrics.count("digits", "1.0.0", outcome)
    agent = _exported(agent_metrics.render().decode())

    exported = {**agent, **server}
    # label values the scrape shows only while some series has them: the code's own enumerations
    exported["edgefleet_rollouts"]["state"] = {s.value for s in RolloutState}
    exported["edgefleet_agent_requests_total"]["outcome"] = set(OUTCOMES)
    # Prometheus's target labels, on every series it scrapes
    target = {"job", "instance"}

    unknown: list[str] = []
    for r in _rules():
        for name in sorted(metric_names(r["expr"]) - exported.keys()):
            unknown.append(f"{r['alert']}: metric {name} is exported by neither the control plane nor the agent")
        for metric, label, op, value in matchers(r["expr"]):
            seen = exported.get(metric, {})
            if label in target:
                continue
            if label not in seen:
                unknown.append(f"{r['alert']}: {metric} has no label {label}")
                continue
            values = set(value.split("|")) if op in ("=~", "!~") else {value}
            if values - seen[label]:
                unknown.append(f"{r['alert']}: {metric}{{{label}}} never takes {sorted(values - seen[label])}")
    assert not unknown, "\n".join(unknown)
