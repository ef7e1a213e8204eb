"""JUnit XML for CI systems: one ``<testcase>`` per check, so a failed gate shows up as failed tests."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from edgefleet.gate.verdict import Verdict

__all__ = ["to_junit", "write_junit"]


def to_junit(verdict: Verdict, suite: str = "edgefleet.gate") -> ET.ElementTree[ET.Element]:
    """A failed check is a ``<failure>``; an inconclusive one is a ``<failure type="inconclusive">`` unless the
    policy allows inconclusive checks, then ``<skipped>`` (it neither passed nor blocked the release), as is a
    skipped check. The accuracy comparisons (vs the float parent, vs production) are suite properties."""
    failures = sum(1 for c in verdict.checks if c.status == "fail")
    inconclusive = sum(1 for c in verdict.checks if c.status == "inconclusive")
    not_run = sum(1 for c in verdict.checks if c.status == "skipped")
    skipped = not_run + (inconclusive if verdict.allow_inconclusive else 0)
    failures += 0 if verdict.allow_inconclusive else inconclusive
    attrs = {
        "name": suite,
        "tests": str(len(verdict.checks)),
        "failures": str(failures),
        "errors": "0",
        "skipped": str(skipped),
        "time": "0",
    }
    root = ET.Element("testsuites", {k: v for k, v in attrs.items() if k != "skipped"})
    ts = ET.SubElement(root, "testsuite", attrs)
    props = ET.SubElement(ts, "properties")
    ET.SubElement(props, "property", {"name": "verdict", "value": verdict.status})
    ET.SubElement(props, "property", {"name": "reason", "value": verdict.reason})
    for key, cmp in verdict.accuracy.items():
        ET.SubElement(props, "property", {"name": f"accuracy.{key}", "value": cmp.describe()})
    for c in verdict.checks:
        case = ET.SubElement(ts, "testcase", {"classname": suite, "name": c.name, "time": "0"})
        if c.status == "fail":
            el = ET.SubElement(case, "failure", {"message": c.reason, "type": "fail"})
            el.text = c.reason
        elif c.status == "inconclusive":
            if verdict.allow_inconclusive:
                ET.SubElement(case, "skipped", {"message": f"inconclusive: {c.reason}"})
            else:
                el = ET.SubElement(case, "failure", {"message": f"inconclusive: {c.reason}", "type": "inconclusive"})
                el.text = c.reason
        elif c.status == "skipped":
            ET.SubElement(case, "skipped", {"message": c.reason})
        out = ET.SubElement(case, "system-out")
        out.text = c.reason
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(verdict: Verdict, path: Path) -> Path:
    to_junit(verdict).write(path, encoding="utf-8", xml_declaration=True)
    return path
