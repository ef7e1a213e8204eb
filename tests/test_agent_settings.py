"""``edgefleet agent``'s settings have one source, AgentSettings: for every field its variable is honoured, a flag
beats the variable, and the default holds otherwise. The command line is parsed in-process (click's
``make_context``), without starting an agent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer

from edgefleet.cli.agent import agent_settings, env_names, register
from edgefleet.config import AgentSettings
from edgefleet.errors import UsageError

# field: (flag or None, variable value, its setting, flag value, its setting)
CASES: dict[str, tuple[str | None, str, Any, str, Any]] = {
    "server": ("--server", "http://env.example:8700", "http://env.example:8700", "http://flag:1", "http://flag:1"),
    "token": ("--token", "env-token", "env-token", "flag-token", "flag-token"),
    "root": ("--root", "/env/root.json", Path("/env/root.json"), "/flag/root.json", Path("/flag/root.json")),
    "ca_file": ("--ca-file", "/env/ca.pem", Path("/env/ca.pem"), "/flag/ca.pem", Path("/flag/ca.pem")),
    "insecure_http": ("--insecure-http", "true", True, "", True),
    "data_dir": ("--data-dir", "/env/data", Path("/env/data"), "/flag/data", Path("/flag/data")),
    "host": ("--host", "0.0.0.0", "0.0.0.0", "10.0.0.1", "10.0.0.1"),
    "port": ("--port", "9001", 9001, "9002", 9002),
    "uds": ("--uds", "/env/api.sock", Path("/env/api.sock"), "/flag/api.sock", Path("/flag/api.sock")),
    "checkin_interval_s": ("--checkin-interval", "7.5", 7.5, "2", 2.0),
    "telemetry_interval_s": ("--telemetry-interval", "11", 11.0, "12", 12.0),
    "buffer_max_records": ("--buffer-max-records", "123", 123, "456", 456),
    "tier": ("--emulate-tier", "arm-a53-small", "arm-a53-small", "x86-avx2", "x86-avx2"),
    "chipset": ("--chipset", "rk3308", "rk3308", "bcm2711", "bcm2711"),
    "memory_mb": ("--memory-mb", "256", 256, "512", 512),
    "intra_op_threads": ("--intra-op-threads", "3", 3, "2", 2),
    "mqtt": ("--mqtt", "mqtt://env:1883", "mqtt://env:1883", "mqtt://flag", "mqtt://flag"),
    "queue_size": (None, "7", 7, "", None),
    "http_max_url_bytes": (None, "4096", 4096, "", None),
    "http_max_header_bytes": (None, "2048", 2048, "", None),
    "http_header_timeout_s": (None, "1.5", 1.5, "", None),
    "http_body_timeout_s": (None, "2.5", 2.5, "", None),
    "http_keepalive_timeout_s": (None, "3.5", 3.5, "", None),
    "http_max_connections": (None, "9", 9, "", None),
    "http_max_body_bytes": (None, "2048", 2048, "", None),
    "http_max_json_bytes": (None, "4096", 4096, "", None),
    "http_max_tensor_bytes": (None, "8192", 8192, "", None),
    "routing": (
        None,
        '{"policy":"fallback","remote_url":"http://c:1"}',
        {"policy": "fallback", "remote_url": "http://c:1"},
        "",
        None,
    ),
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's own environment: no EDGEFLEET_* variable of the machine running it leaks in."""
    import os

    for k in list(os.environ):
        if k.startswith("EDGEFLEET_"):
            monkeypatch.delenv(k)


def _parse(*args: str) -> AgentSettings:
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, as in the real CLI, even with this module's single command
    register(app)
    command = typer.main.get_command(app).commands["agent"]  # type: ignore[attr-defined]
    with command.make_context("agent", list(args)) as ctx:
        return agent_settings(ctx)


def _flag_args(flag: str, value: str) -> list[str]:
    return [flag] if value == "" else [flag, value]


def test_every_field_is_covered() -> None:
    # a new field must say here how it is set, or this test fails
    assert set(CASES) == set(AgentSettings.model_fields)


@pytest.mark.parametrize("field", sorted(CASES))
def test_default_when_neither_flag_nor_variable(field: str) -> None:
    assert getattr(_parse(), field) == AgentSettings.model_fields[field].default


@pytest.mark.parametrize("field", sorted(CASES))
def test_variable_is_honoured(field: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, env_value, expected, _, _ = CASES[field]
    for name in env_names(field):
        monkeypatch.setenv(name, env_value)
        assert getattr(_parse(), field) == expected, name
        monkeypatch.delenv(name)


@pytest.mark.parametrize("field", sorted(f for f, c in CASES.items() if c[0] is not None))
def test_flag_beats_variable(field: str, monkeypatch: pytest.MonkeyPatch) -> None:
    flag, env_value, _, flag_value, expected = CASES[field]
    assert flag is not None
    if field == "insecure_http":  # a flag can only say yes: the variable says no
        env_value = "false"
    for name in env_names(field):
        monkeypatch.setenv(name, env_value)
    assert getattr(_parse(*_flag_args(flag, flag_value)), field) == expected


def test_server_reads_the_cli_wide_variable_and_the_agent_one_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_SERVER", "http://cli-wide:8700")
    assert _parse().server == "http://cli-wide:8700"
    monkeypatch.setenv("EDGEFLEET_AGENT_SERVER", "http://agent:8700")
    assert _parse().server == "http://agent:8700"
    assert _parse("--server", "http://flag:8700").server == "http://flag:8700"


def test_a_bad_variable_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_AGENT_QUEUE_SIZE", "lots")
    with pytest.raises(UsageError) as err:
        _parse()
    msg = str(err.value)
    assert "EDGEFLEET_AGENT_QUEUE_SIZE" in msg and "\n" not in msg


def test_help_shows_the_settings_defaults_and_variables() -> None:
    from typer.testing import CliRunner

    app = typer.Typer()
    register(app)
    out = CliRunner().invoke(app, ["agent", "--help"], env={"COLUMNS": "200"}).output
    assert "EDGEFLEET_AGENT_PORT" in out and "EDGEFLEET_SERVER" in out
    assert "8081" in out and "30.0" in out and "10000" in out


def test_no_server_is_a_clear_usage_error() -> None:
    from typer.testing import CliRunner

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    res = CliRunner().invoke(app, ["agent"], env={"COLUMNS": "200"})
    assert res.exit_code != 0 and isinstance(res.exception, UsageError)
    assert "--server" in str(res.exception)
