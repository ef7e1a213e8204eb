"""User and server text reaches the terminal verbatim: names that look like rich markup (``[/x]``, ``[bold]``,
``[red]oops[/red]``) neither crash a command nor vanish from its output, and ``--help`` shows every default as
written. Through the real entry point, against a real control plane where a server is involved."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from _cp_support import CP, build_pkg
from _package_helpers import run_cli

Capsys = pytest.CaptureFixture[str]
EXE = Path(sys.executable).with_name("edgefleet")
MARKUP = ["[/x]", "[bold]", "[red]oops[/red]", "ci [/prod] bot", ":warning: [x86-avx2]"]


def _clean(err: str) -> None:
    assert "Traceback" not in err and "MarkupError" not in err, err


# ------------------------------------------------------------------------------------------------ local commands


@pytest.mark.parametrize("name", ["models[/old].efpkg", "models[old].efpkg", "[bold]x.efpkg", "[red]oops[/red].efpkg"])
def test_inspect_names_a_missing_file_as_typed(tmp_path: Path, capsys: Capsys, name: str) -> None:
    code, _, err = run_cli(capsys, "inspect", tmp_path / name)
    _clean(err)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(tmp_path / name) in err


def test_inspect_of_a_package_at_a_markup_path_prints_the_path(tmp_path: Path, capsys: Capsys, mlp_path: Path) -> None:
    pkg = build_pkg(mlp_path, tmp_path / "build", "1.0.0")
    weird = tmp_path / "models[" / "old].efpkg"  # the path reads "models[/old].efpkg"
    weird.parent.mkdir()
    shutil.copy(pkg, weird)
    code, out, err = run_cli(capsys, "inspect", weird)
    _clean(err)
    assert code == 0 and str(weird) in out, err


def _gate_inputs(tmp_path: Path, slices: list[str]) -> list[str | Path]:
    """A real gate run (policy, empty bench, optimize and production reports) whose slice names are ``slices``;
    the candidate is worse than production on every slice, so the gate fails naming them."""
    from edgefleet.bench.env import fingerprint
    from edgefleet.bench.report import BenchReport, BenchSettings

    def report(score: float, sha: str) -> dict[str, Any]:
        scores = {"metric": "top1", "overall": score, "per_slice": dict.fromkeys(slices, score)}
        return {
            "model_sha256": "b" * 64,
            "output_sha256": sha,
            "metric": "top1",
            "baseline_metrics": {"metric": "top1", "overall": 0.99, "per_slice": dict.fromkeys(slices, 0.99)},
            "chosen": {"name": "int8", "status": "chosen", "metrics": scores},
        }

    (tmp_path / "policy.yaml").write_text("production: {max_drop: 0.01, max_slice_drop: 0.01}\n")
    (tmp_path / "bench.json").write_text(
        BenchReport(environment=fingerprint(), settings=BenchSettings(), results=[]).model_dump_json()
    )
    (tmp_path / "cand.json").write_text(json.dumps(report(0.80, "c" * 64)))
    (tmp_path / "prod.json").write_text(json.dumps(report(0.95, "d" * 64)))
    return [
        "gate",
        "--policy",
        tmp_path / "policy.yaml",
        "--bench",
        tmp_path / "bench.json",
        "--optimize-report",
        tmp_path / "cand.json",
        "--production-report",
        tmp_path / "prod.json",
    ]


def test_gate_table_keeps_slice_names_that_look_like_markup(tmp_path: Path, capsys: Capsys) -> None:
    args = _gate_inputs(tmp_path, ["[x86-avx2]", "[red]oops[/red]"])
    code, out, err = run_cli(capsys, *args)
    _clean(err)
    assert code == 1, err  # a verdict of "fail"
    assert "accuracy.vs_production.worst_slice" in out
    assert "'[x86-avx2]'" in out or "'[red]oops[/red]'" in out, out

    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 1 and json.loads(out)["status"] == "fail", err


def test_a_markup_policy_path_is_named_as_typed(tmp_path: Path, capsys: Capsys) -> None:
    missing = tmp_path / "[bold]policy[/x].yaml"
    code, _, err = run_cli(capsys, "gate", "--policy", missing, "--bench", tmp_path / "b.json")
    _clean(err)
    assert code == 2 and str(missing) in err, err


def test_help_of_every_command_shows_its_defaults_verbatim(capsys: Capsys) -> None:
    from typer.main import get_command

    from edgefleet.cli.main import app

    def walk(cmd: Any, path: tuple[str, ...]) -> Any:
        yield path, cmd
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            yield from walk(sub, (*path, name))

    def flat(text: str) -> str:
        return " ".join(text.split())

    seen = 0
    for path, cmd in walk(get_command(app), ()):
        code, out, err = run_cli(capsys, *path, "--help")
        assert code == 0, (path, err)
        for p in cmd.params:
            for bracket in re.findall(r"\[[^\]]*\]", getattr(p, "help", None) or ""):
                seen += 1
                assert flat(bracket) in flat(out), (path, p.name, bracket)
    assert seen > 10  # the check ran over real defaults
    code, out, _ = run_cli(capsys, "server", "--help")
    assert "[sqlite:///edgefleet.db]" in flat(out)
    code, out, _ = run_cli(capsys, "devices", "list", "--help")
    assert "[http://127.0.0.1:8700]" in flat(out)


# ------------------------------------------------------------------------------------------------ against a server


def test_server_text_is_printed_verbatim(cp: CP, tmp_path: Path, capsys: Capsys, mlp_path: Path) -> None:
    remote = ["--server", cp.url, "--api-token", cp.admin]
    for name in MARKUP:
        cp.api("POST", "/api/v1/tokens", json={"role": "viewer", "name": name})
    code, out, err = run_cli(capsys, "tokens", "list", *remote)
    _clean(err)
    assert code == 0, err
    for name in MARKUP:
        assert name in out, (name, out)

    device = cp.device("x86-avx2")
    code, out, err = run_cli(capsys, "devices", "list", *remote)
    assert code == 0 and device.id in out, err
    code, out, err = run_cli(capsys, "devices", "show", device.id, *remote)
    assert code == 0 and device.id in out and "x86-avx2" in out, err

    cp.upload(build_pkg(mlp_path, tmp_path / "pkgs", "1.0.0"))
    policy = {"waves": [100], "bake_s": 3600, "min_devices": 1, "min_requests": 1}
    rollout = cp.api("POST", "/api/v1/rollouts", json={"model": "digits", "version": "1.0.0", "policy": policy})
    rid = rollout["rollout_id"]
    reason = "[red]oops[/red] and [/x] :warning:"
    code, out, err = run_cli(capsys, "rollout", "pause", rid, "--reason", reason, *remote)
    assert code == 0, err
    for args in (["audit"], ["rollout", "list"], ["rollout", "status", rid]):
        code, out, err = run_cli(capsys, *args, *remote)
        _clean(err)
        assert code == 0, (args, err)
        assert reason in out, (args, out)

    # the error of a server, with markup in the name the user gave, is one line with the name as typed
    code, out, err = run_cli(capsys, "devices", "show", "[bold]nope", *remote)
    _clean(err)
    assert code == 3 and "[bold]nope" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.process
def test_outside_a_terminal_tables_do_not_wrap(cp: CP) -> None:
    long = "a-token-name-much-longer-than-eighty-columns-would-allow-in-one-table-cell-[/x]-and-more"
    cp.api("POST", "/api/v1/tokens", json={"role": "viewer", "name": long})
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env |= {"EDGEFLEET_SERVER": cp.url, "EDGEFLEET_API_TOKEN": cp.admin}
    proc = subprocess.run([EXE, "tokens", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    row = [line for line in proc.stdout.splitlines() if long in line]
    assert len(row) == 1 and len(row[0]) > 80, proc.stdout


def test_outside_a_terminal_progress_is_lines_not_a_silent_bar() -> None:
    from edgefleet.cli._output import progress

    buf = io.StringIO()
    to = Console(file=buf, force_terminal=False, width=100_000)
    with progress("benchmarking", total=3, to=to, quiet_for=0) as update:
        for what in ("model [/a].onnx on x86", "model [/a].onnx on x86", "baseline [bold]"):
            update(what)
    assert buf.getvalue().splitlines() == ["benchmarking", "model [/a].onnx on x86", "baseline [bold]"]

    # a step still running after quiet_for is said without waiting for the next one; a quick run says nothing
    buf = io.StringIO()
    to = Console(file=buf, force_terminal=False, width=100_000)
    with progress("optimizing", total=1.0, to=to, quiet_for=0.3) as update:
        update("measuring int8", 0.5)
        time.sleep(1.0)
        assert buf.getvalue().splitlines() == ["measuring int8 (50%)"]
    buf = io.StringIO()
    to = Console(file=buf, force_terminal=False, width=100_000)
    with progress("quick", total=None, to=to, quiet_for=5) as update:
        update("done")
    assert buf.getvalue() == ""


def test_error_and_escape_print_text_verbatim(capsys: Capsys) -> None:
    from edgefleet.cli._output import error

    for text in MARKUP:
        error(f"cannot open {text}")
        assert capsys.readouterr().err.strip() == f"error: cannot open {text}"
