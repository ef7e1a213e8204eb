"""Every row of the exit-code table (``edgefleet.errors``, docs/cli.md) with a real case through the real entry
point; errors as JSON under ``--json``; ``--json`` on every command that prints a result; one env-var scheme; one
duration grammar; validation errors in full."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from _cp_support import CP, build_pkg
from _package_helpers import run_cli
from conftest import free_port
from edgefleet.durations import parse_duration, parse_timedelta
from edgefleet.errors import UsageError

Capsys = pytest.CaptureFixture[str]
EXE = Path(sys.executable).with_name("edgefleet")


def _one_line(err: str, code: int, got: int) -> str:
    assert got == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _json_error(out: str, code: int, got: int) -> str:
    assert got == code, out
    doc = json.loads(out)
    assert set(doc) == {"error", "code"} and doc["code"] == code, doc
    return str(doc["error"])


# ------------------------------------------------------------------------------------------------ the table


def test_0_ok(capsys: Capsys) -> None:
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.startswith("edgefleet ")


def test_1_a_failed_gate_is_a_verdict_and_2_a_junit_nobody_can_write_is_usage(tmp_path: Path, capsys: Capsys) -> None:
    from test_cli_text import _gate_inputs

    args = _gate_inputs(tmp_path, ["cat", "dog"])
    code, out, err = run_cli(capsys, *args, "--junit", tmp_path / "g.xml")
    assert code == 1 and "fail" in out and (tmp_path / "g.xml").is_file(), err

    # said before the gate runs: the policy below does not even exist, and the error is about --junit
    missing = tmp_path / "missing-dir" / "g.xml"
    code, out, err = run_cli(
        capsys, "gate", "-p", tmp_path / "nope.yaml", "-b", tmp_path / "b.json", "--junit", missing
    )
    assert "--junit" in _one_line(err, 2, code) and "missing-dir" in err
    code, out, err = run_cli(capsys, *args, "--junit", tmp_path, "--json")
    assert "is a folder" in _json_error(out, 2, code)


def test_2_usage_errors(capsys: Capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "devices", "list", "--no-such-flag")
    assert code == 2 and "No such option" in err and "Traceback" not in err
    code, out, _ = run_cli(capsys, "devices", "list", "--no-such-flag", "--json")
    assert "No such option" in _json_error(out, 2, code)
    code, _, err = run_cli(capsys, "inspect", tmp_path / "missing.efpkg")
    _one_line(err, 2, code)
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "missing.efpkg", "--json")
    assert "does not exist" in _json_error(out, 2, code)


def test_3_not_found_and_conflict(cp: CP, tmp_path: Path, capsys: Capsys, mlp_path: Path) -> None:
    remote = ["--server", cp.url, "--api-token", cp.admin]
    code, _, err = run_cli(capsys, "devices", "show", "nope", *remote)
    assert "no device nope" in _one_line(err, 3, code)
    code, out, _ = run_cli(capsys, "rollout", "pause", "nope", "--json", *remote)
    assert "no rollout nope" in _json_error(out, 3, code)

    # no gate verdict: the release policy refuses the promotion
    cp.upload(build_pkg(mlp_path, tmp_path / "pkgs", "1.0.0"), gate=False)
    code, _, err = run_cli(capsys, "models", "promote", "digits", "1.0.0", *remote)
    assert "no passing gate verdict" in _one_line(err, 3, code)


def test_4_unreachable_server_and_refused_credentials(cp: CP, capsys: Capsys) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    code, _, err = run_cli(capsys, "devices", "list", "--server", nowhere, "--api-token", "x")
    assert "cannot reach the control plane" in _one_line(err, 4, code)
    code, out, _ = run_cli(capsys, "devices", "list", "--server", nowhere, "--api-token", "x", "--json")
    assert "cannot reach" in _json_error(out, 4, code)

    code, _, err = run_cli(capsys, "devices", "list", "--server", cp.url, "--api-token", "not-a-token")
    assert "invalid or revoked API token" in _one_line(err, 4, code)
    viewer = cp.token("viewer")
    code, _, err = run_cli(capsys, "tokens", "create", "--role", "admin", "--server", cp.url, "--api-token", viewer)
    _one_line(err, 4, code)


def test_70_internal_error_is_one_line_never_a_traceback(monkeypatch: pytest.MonkeyPatch, capsys: Capsys) -> None:
    import edgefleet.cli.server as server_cli

    def bug(*_: Any) -> Any:
        raise KeyError("a bug\nwith a second line")

    monkeypatch.setattr(server_cli, "client", bug)
    monkeypatch.delenv("EDGEFLEET_DEBUG", raising=False)
    code, _, err = run_cli(capsys, "devices", "list")
    line = _one_line(err, 70, code)
    assert line.startswith("error: internal error: KeyError:") and "please report" in line
    code, out, _ = run_cli(capsys, "devices", "list", "--json")
    assert "please report" in _json_error(out, 70, code)


def test_sigusr1_still_prints_the_stacks(monkeypatch: pytest.MonkeyPatch, capsys: Capsys) -> None:
    import faulthandler
    import signal

    if not hasattr(signal, "SIGUSR1"):
        pytest.skip("no SIGUSR1 here")
    registered: list[tuple[Any, ...]] = []
    monkeypatch.setattr(faulthandler, "register", lambda *a, **kw: registered.append((*a, kw)))
    code, _, _ = run_cli(capsys, "--version")
    assert code == 0 and registered == [(signal.SIGUSR1, {"all_threads": True})]


# ------------------------------------------------------------------------------------------------ --json everywhere


def test_every_command_that_prints_a_result_takes_json() -> None:
    from typer.main import get_command

    from edgefleet.cli.main import app

    # long-running daemons and the workflow demo's stage log are not results; `demo --json` exists regardless
    daemons = {("server",), ("agent",), ("serve",)}
    missing = []

    def walk(cmd: Any, path: tuple[str, ...]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, (*path, name))
        elif path not in daemons and not any("--json" in getattr(p, "opts", []) for p in cmd.params):
            missing.append(" ".join(path))

    walk(get_command(app), ())
    assert not missing, missing


def test_json_of_the_action_commands_parses(cp: CP, tmp_path: Path, capsys: Capsys, mlp_path: Path) -> None:
    remote = ["--server", cp.url, "--api-token", cp.admin, "--json"]
    cp.upload(build_pkg(mlp_path, tmp_path / "pkgs", "1.0.0"))
    device = cp.device("x86-avx2")
    policy = {"waves": [100], "bake_s": 3600, "min_devices": 1, "min_requests": 1}
    rid = cp.api("POST", "/api/v1/rollouts", json={"model": "digits", "version": "1.0.0", "policy": policy})[
        "rollout_id"
    ]
    commands = [
        ["devices", "show", device.id],
        ["devices", "pin", device.id, "1.0.0", "--model", "digits"],
        ["devices", "unpin", device.id],
        ["models", "show", "digits"],
        ["models", "show", "digits", "1.0.0"],
        ["models", "promote", "digits", "1.0.0"],
        ["rollout", "pause", rid],
        ["rollout", "resume", rid],
        ["rollout", "abort", rid],
        ["devices", "revoke", device.id],
    ]
    for args in commands:
        code, out, err = run_cli(capsys, *args, *remote)
        assert code == 0, (args, err)
        assert isinstance(json.loads(out), dict), (args, out)
    code, out, err = run_cli(capsys, "models", "show", "digits", "--server", cp.url, "--api-token", cp.admin)
    assert code == 0 and "digits" in out and not out.lstrip().startswith("{"), err  # a table for people


# ------------------------------------------------------------------------------------------------ env vars


def test_publish_takes_the_server_and_token_from_the_environment(
    cp: CP, tmp_path: Path, capsys: Capsys, mlp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = build_pkg(mlp_path, tmp_path / "pkgs", "3.0.0")
    monkeypatch.setenv("EDGEFLEET_SERVER", cp.url)
    monkeypatch.setenv("EDGEFLEET_API_TOKEN", cp.admin)
    code, out, err = run_cli(capsys, "publish", pkg, "--json")
    assert code == 0 and json.loads(out)["version"] == "3.0.0", err
    assert any(v["version"] == "3.0.0" for m in cp.api("GET", "/api/v1/models") for v in m["versions"])

    # an explicit --repo wins over the variable: signing into a folder is still possible with it set
    from edgefleet.repository import Repository

    Repository.init(tmp_path / "local-repo")
    code, out, err = run_cli(capsys, "publish", pkg, "--repo", tmp_path / "local-repo", "--json")
    assert code == 0 and json.loads(out)["name"], err
    # both on the command line is still ambiguous
    code, _, err = run_cli(capsys, "publish", pkg, "--repo", tmp_path / "local-repo", "--server", cp.url)
    _one_line(err, 2, code)


# ------------------------------------------------------------------------------------------------ durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("1.5", 1.5), ("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1w", 604800),
     ("1h30m", 5400), ("1d 12h", 129600), ("500ms", 0.5), (" 5 m ", 300)],
)  # fmt: skip
def test_the_duration_grammar(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_timedelta(text).total_seconds() == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5 minutes", "1h30", "h", "1.2.3s", "1e3", "--1s", "1hm"])
def test_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(UsageError, match=r"--bake .* is not a duration: use seconds or NUMBER\+UNIT"):
        parse_duration(text, flag="--bake")


def test_negative_and_zero_durations_only_where_they_mean_something() -> None:
    assert parse_duration("-2h", allow_negative=True) == -7200
    with pytest.raises(UsageError, match="must not be negative"):
        parse_duration("-2h", flag="--grace")
    with pytest.raises(UsageError, match="must be positive"):
        parse_duration("0s", flag="--expires", allow_zero=False)


@pytest.mark.parametrize(
    "args",
    [
        ["rollout", "start", "m", "1", "--bake", "5 minutes"],
        ["tokens", "create", "--role", "viewer", "--expires", "soon"],
        ["tokens", "rotate", "1", "--grace", "10 min"],
        ["devices", "token", "--tier", "x86-avx2", "--expires", "1hour"],
        ["repo", "init", "REPO", "--expiry", "timestamp=1 day"],
        ["simulate", "--duration", "forever"],
    ],
)
def test_every_duration_flag_speaks_the_grammar(args: list[str], tmp_path: Path, capsys: Capsys) -> None:
    args = [str(tmp_path / "r") if a == "REPO" else a for a in args]
    flag = args[-2]
    code, _, err = (
        run_cli(capsys, *args, "--server", "http://127.0.0.1:9") if args[0] != "repo" else run_cli(capsys, *args)
    )
    line = _one_line(err, 2, code)
    assert flag in line and "NUMBER+UNIT" in line, line
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------ validation


def test_validation_errors_are_shown_in_full(capsys: Capsys) -> None:
    args = ["rollout", "start", "m", "1", "--waves", "1,200", "--min-devices", "0", "--server", "http://127.0.0.1:9"]
    code, _, err = run_cli(capsys, *args)
    line = _one_line(err, 2, code)
    assert "waves:" in line and "min_devices:" in line and "validation error for" not in line, line


def test_yaml_errors_keep_line_and_column(tmp_path: Path, capsys: Capsys, mlp_path: Path) -> None:
    io_yaml = tmp_path / "io.yaml"
    io_yaml.write_text("inputs:\n  - name: X\n    dtype: [float32\n")
    code, _, err = run_cli(capsys, "package", mlp_path, "-o", tmp_path / "x.efpkg", "--name", "d", "--version", "1.0.0",
                           "--io", io_yaml)  # fmt: skip
    line = _one_line(err, 2, code)
    assert f"{io_yaml}:4:1:" in line, line


# ------------------------------------------------------------------------------------------------ completion


@pytest.mark.process
def test_shell_completion_is_offered(capsys: Capsys) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "--install-completion" in out and "--show-completion" in out
    # the shell is detected from the parent process (not $SHELL, not an argument): run it from bash, as a user does;
    # under make or CI the parent would be sh, which has no completion (`; exit $?` keeps bash from exec-ing it away)
    proc = subprocess.run(
        ["bash", "-c", f"'{EXE}' --show-completion; exit $?"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "_EDGEFLEET_COMPLETE" in proc.stdout, proc.stdout + proc.stderr
