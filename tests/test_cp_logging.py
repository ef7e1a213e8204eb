"""``edgefleet server``'s logging: what it tells its operator (the URL, the admin token file, where root keys sit)
is on stderr at the default level, as text or as JSON lines a collector can parse, uvicorn's own lines included;
a higher level keeps the info lines out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port
from edgefleet.controlplane.logs import JsonFormatter, TextFormatter, logging_config

EDGEFLEET = str(Path(sys.executable).with_name("edgefleet"))


def _serve(tmp: Path, *extra: str) -> tuple[str, str]:
    """Start ``edgefleet server``, wait until it answers, stop it; (stdout, stderr)."""
    port = free_port()
    out, err = tmp / "stdout.log", tmp / "stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(
            [
                EDGEFLEET,
                "server",
                "--db",
                f"sqlite:///{tmp / 'cp.db'}",
                "--repo",
                str(tmp / "repo"),
                "--port",
                str(port),
                *extra,
            ],
            stdout=o,
            stderr=e,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, err.read_text()
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "edgefleet server did not start"
                time.sleep(0.1)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return out.read_text(), err.read_text()


@pytest.mark.process
def test_json_log_format_every_stderr_line_is_an_object(tmp_path: Path) -> None:
    _, err = _serve(tmp_path, "--log-format", "json")
    lines = err.splitlines()
    assert lines, "the server logged nothing"
    docs = [json.loads(line) for line in lines]  # every line, uvicorn's included
    for d in docs:
        assert {"time", "level", "logger", "message"} <= d.keys(), d
        assert d["level"] in {"debug", "info", "warning", "error", "critical"}, d
    messages = [d["message"] for d in docs]
    assert any(m.startswith("edgefleet control plane on http://127.0.0.1:") for m in messages), messages
    assert any(m.startswith("admin API token written to ") for m in messages), messages
    assert any(d["logger"].startswith("uvicorn") for d in docs), "uvicorn's lines do not go through the same handler"
    keys = [d for d in docs if "root key written to" in d["message"]]
    assert keys and keys[0]["level"] == "warning" and keys[0]["logger"] == "edgefleet.controlplane.app", keys


@pytest.mark.process
def test_text_is_the_default_and_error_level_keeps_info_out(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    out, err = _serve(tmp_path / "a")
    lines = err.splitlines()
    assert any(line.startswith("edgefleet control plane on http://127.0.0.1:") for line in lines), err
    assert any(line.startswith("admin API token written to ") for line in lines), err
    assert any(line.startswith("warning: root key written to ") for line in lines), err
    assert "edgefleet control plane on" not in out  # stdout stays free for nothing but what a command outputs
    (tmp_path / "b").mkdir()
    _, err = _serve(tmp_path / "b", "--log-level", "error")
    assert "edgefleet control plane on" not in err and "root key written" not in err, err


@pytest.mark.process
def test_log_options_refuse_unknown_values_in_one_line() -> None:
    for flag, value in (("--log-level", "loud"), ("--log-format", "xml")):
        r = subprocess.run([EDGEFLEET, "server", flag, value], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert value in r.stderr, r.stderr
    with pytest.raises(ValueError, match="log format"):
        logging_config("info", "xml")


def test_formatters_carry_the_exception() -> None:
    import logging

    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("edgefleet.controlplane.x", logging.ERROR, __file__, 1, "failed %s", ("now",), None)
        record.exc_info = sys.exc_info()
    doc = json.loads(JsonFormatter().format(record))
    assert doc["message"] == "failed now" and doc["level"] == "error" and doc["logger"] == "edgefleet.controlplane.x"
    assert "RuntimeError: boom" in doc["exc_info"]
    text = TextFormatter().format(record)
    assert text.startswith("error: failed now\n") and "RuntimeError: boom" in text
