"""Release evidence as the CLI reads and sends it: a gate verdict (``edgefleet gate --json``) bound to the SHA-256
of the package it judged, and a bench report (``BENCH.json``). Every file is read and checked before anything is
sent, so a wrong one is one line here, not a 4xx from the server."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.cli._output import console, escape, wire
from edgefleet.errors import UsageError

if TYPE_CHECKING:
    from edgefleet.sdk import Client

__all__ = [
    "attach_evidence",
    "judged_package",
    "print_release",
    "read_bench_report",
    "read_gate_verdict",
    "sha256_file",
]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_object(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"{what} {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"{what} {path} is not JSON: {err}")
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path} is not a JSON object")
    return data


def read_gate_verdict(path: Path) -> dict[str, Any]:
    """The JSON ``edgefleet gate --json`` printed, checked to be a verdict (a wrong file is one line, not a 4xx)."""
    from pydantic import ValidationError

    from edgefleet.gate.verdict import Verdict

    data = _json_object(Path(path), "gate verdict")
    hint = f"write one with `edgefleet gate … --package PKG --json > {Path(path).name}`"
    if "results" in data and "environment" in data:
        raise UsageError(f"{path} is a bench report, not a gate verdict: pass it as --bench; {hint}")
    try:
        Verdict.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        field = ".".join(str(x) for x in e["loc"]) or "(root)"
        raise UsageError(f"{path} is not a gate verdict (field {field!r}: {e['msg']}); {hint}")
    return data


def read_bench_report(path: Path) -> dict[str, Any]:
    """A ``BENCH.json`` of ``edgefleet bench``, validated against its schema and sent as written."""
    from edgefleet.bench.report import load_report

    data = _json_object(Path(path), "bench report")
    if "checks" in data and "passed" in data:
        raise UsageError(f"{path} is a gate verdict, not a bench report: pass it as --gate")
    load_report(path)
    return data


def judged_package(verdict: dict[str, Any], package: Path | None = None) -> str | None:
    """The SHA-256 of the package a verdict judged: its own ``package_sha256``, else the file it names under
    ``inputs.package`` when that file is here. ``package`` is the file the caller means; a verdict that judged
    another one is refused here, before anything is sent."""
    own = verdict.get("package_sha256")
    inputs = verdict.get("inputs")
    judged_path = inputs.get("package") if isinstance(inputs, dict) else None
    judged = own if isinstance(own, str) else None
    if judged is None and isinstance(judged_path, str) and Path(judged_path).is_file():
        judged = sha256_file(Path(judged_path))
    if package is not None:
        mine = sha256_file(package)
        if judged is not None and judged != mine:
            raise UsageError(
                f"the gate verdict judged {judged_path or 'another package'} (sha256 {judged[:12]}…), not {package} "
                f"(sha256 {mine[:12]}…): gate this package"
            )
        return mine
    return judged


def attach_evidence(
    c: Client,
    name: str,
    version: str,
    *,
    gate: dict[str, Any] | None = None,
    bench: dict[str, Any] | None = None,
    package_sha256: str | None = None,
) -> dict[str, Any]:
    """Send a gate verdict (bound to ``package_sha256``) and/or a bench report; returns the version's release
    status after the last one, as the server sent it."""
    detail = None
    if bench is not None:
        detail = c.models.attach_bench(name, version, bench)
    if gate is not None:
        detail = c.models.attach_gate(name, version, gate, package_sha256=package_sha256)
    if detail is None or detail.release is None:
        return {}
    release: dict[str, Any] = wire(detail.release)
    return release


def print_release(what: str, r: dict[str, Any]) -> None:
    """One line: the release policy admits the version now, or why it still refuses it."""
    if r.get("allowed"):
        console.print(f"{what}: evidence attached; the release policy admits it", markup=False)
    else:
        console.print(f"{escape(what)}: evidence attached; [yellow]still refused:[/] {escape(r.get('refusal'))}")
