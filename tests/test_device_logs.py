"""Remote diagnostics: an operator reads a device's recent log lines without SSH — only for a group that consents,
audited on both ends, with the device's secrets scrubbed on the device.

Pure parts (``scrub``, ``LogRing``) on their own; then an agent in this process against the real control plane
(``tests/_fleet_support.py``): asked through the API and through ``edgefleet devices logs``, it answers on its
next check-in; without consent the request is refused, and a device cannot push lines nobody asked for."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from _fleet_support import GROUP, Fleet, running, settings, until
from _package_helpers import run_cli
from edgefleet.agent.logring import LogRing, scrub
from edgefleet.protocol import MAX_LOG_LINES


def test_scrub_removes_the_devices_secrets_and_bearer_tokens() -> None:
    line = "enroll with token abcdefgh123 and credential s3cr3t-cred-xyz; header Authorization: Bearer eyJhbGc.x.y"
    out = scrub(line, ["abcdefgh123", "s3cr3t-cred-xyz", "short"])
    assert "abcdefgh123" not in out and "s3cr3t-cred-xyz" not in out and "eyJhbGc" not in out
    assert out.count("[scrubbed]") == 3 and "Authorization: Bearer [scrubbed]" in out
    assert scrub("a short word", ["short"]) == "a short word"  # a secret under 8 characters would blank words


def test_the_ring_keeps_recent_lines_and_sends_the_newest_within_the_cap() -> None:
    ring = LogRing(lambda: ["credential-0123456789"], keep=MAX_LOG_LINES + 500)
    log = logging.getLogger("edgefleet.test.ring")
    log.addHandler(ring)
    log.setLevel(logging.INFO)
    try:
        log.info("before")
        cut = datetime.now(UTC)
        time.sleep(0.01)
        for i in range(MAX_LOG_LINES + 10):
            log.info("line %d credential-0123456789", i)
    finally:
        log.removeHandler(ring)
    lines, dropped = ring.since(cut)
    assert len(lines) == MAX_LOG_LINES and dropped == 10
    assert lines[0].endswith("line 10 [scrubbed]") and lines[-1].endswith(f"line {MAX_LOG_LINES + 9} [scrubbed]")
    assert " INFO edgefleet.test.ring: " in lines[0]
    assert ring.since(datetime.now(UTC) + timedelta(seconds=1)) == ([], 0)


class _LosesFirstUpload(httpx.AsyncBaseTransport):
    """The link loses the device's first upload of log lines (the rest reaches the control plane)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner, self.lost = inner, 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.endswith("/logs") and not self.lost:
            self.lost += 1
            raise httpx.ConnectError("the link dropped the upload (test)", request=request)
        return await self.inner.handle_async_request(request)


def test_an_operator_reads_a_consenting_devices_logs(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from edgefleet.agent import InProcessBackend

    # as `edgefleet agent` logs: its info lines are kept too (set on the agent's logger itself, whatever level
    # another test left there)
    caplog.set_level(logging.INFO, logger="edgefleet")
    caplog.set_level(logging.INFO, logger="edgefleet.agent")
    token = fleet.enrollment_token()
    conf = settings(tmp_path / "dev", "http://control-plane.test", token)
    link = _LosesFirstUpload(fleet.transport())  # a lost upload is sent again on the next check-in

    async def go() -> tuple[dict[str, Any], str, tuple[int, str, str]]:
        async with running(conf, transport=link, backend_factory=InProcessBackend, keep_logs=True) as a:
            await until(lambda: fleet.device_ids() and a.identity.get("credential"), 30, "enrollment")
            dev = fleet.device_ids()[0]
            credential = str(a.identity["credential"])
            # a careless log line with the device's secrets in it: they must not leave the device
            logging.getLogger("edgefleet.agent").warning("debug: token %s credential %s", token, credential)

            # no consent: refused, and nothing is asked of the device
            r = await asyncio.to_thread(
                fleet.http.post, f"/api/v1/devices/{dev}/logs/request", json={"since_s": 600}, headers=fleet.h()
            )
            assert r.status_code == 409 and "has not consented to remote logs" in r.json()["detail"], r.text
            # a device cannot push lines nobody asked for
            unasked = {"since": datetime.now(UTC).isoformat(), "lines": ["hello"]}
            r = await asyncio.to_thread(
                fleet.http.post,
                f"/api/v1/devices/{dev}/logs",
                json=unasked,
                headers={"Authorization": f"Bearer {credential}"},
            )
            assert r.status_code == 409 and "no open request" in r.json()["detail"], r.text

            await asyncio.to_thread(fleet.configure_group, remote_logs=True)
            asked = await asyncio.to_thread(
                fleet.api, "POST", f"/api/v1/devices/{dev}/logs/request", json={"since_s": 600}
            )
            assert asked["pending"] and asked["upload"] is None

            def answered() -> dict[str, Any] | None:
                got = dict(fleet.api("GET", f"/api/v1/devices/{dev}/logs"))
                return got if got["upload"] else None

            await until(lambda: answered(), 30, "the device's answer")
            got = await asyncio.to_thread(answered)
            assert got is not None
            # and once more through the CLI, which asks, waits for the answer and prints the lines
            cli = await asyncio.to_thread(
                run_cli, capsys, "devices", "logs", dev, "--since", "10m", "--wait", "30s",
                "--server", fleet.url, "--api-token", fleet.admin,
            )  # fmt: skip
            return got, credential, cli

    got, credential, (code, out, err) = asyncio.run(go())
    assert link.lost == 1
    lines = got["upload"]["lines"]
    assert not got["pending"] and any("enrolled as" in line for line in lines), lines
    careless = next(line for line in lines if "debug: token" in line)
    assert careless.endswith("debug: token [scrubbed] credential [scrubbed]"), careless
    assert all(token not in line and credential not in line for line in lines)
    assert code == 0, err
    assert "enrolled as" in out and token not in out and credential not in out
    assert "waiting up to 30s for its next check-in" in err
    # audited on both ends: who asked, who read, what the device sent
    actions = [e["action"] for e in fleet.api("GET", "/api/v1/audit")]
    for action in ("device.logs_request", "device.logs_uploaded", "device.logs_read"):
        assert action in actions, actions
    code, out, _ = run_cli(
        capsys, "devices", "logs", fleet.device_ids()[0], "--last", "--json",
        "--server", fleet.url, "--api-token", fleet.admin,
    )  # fmt: skip
    assert code == 0 and json.loads(out)["upload"]["lines"]


def test_logs_of_a_device_without_an_answer_say_so(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    fleet.api("PUT", f"/api/v1/groups/{GROUP}", json={"config": {"remote_logs": True}})
    dev = fleet.device(fleet.tier, group=GROUP)  # a device that enrolled and then never checks in again
    code, _, err = run_cli(
        capsys, "devices", "logs", dev.id, "--wait", "1s", "--server", fleet.url, "--api-token", fleet.admin
    )
    assert code == 1 and f"device {dev.id} did not answer within 1s" in err and "--last" in err
    assert len(err.strip().splitlines()) == 2  # the progress line, then one error line
    assert httpx.get(f"{fleet.url}/api/v1/devices/{dev.id}/logs").status_code == 401  # not without a token


def test_only_a_devices_own_agent_keeps_log_lines_by_default(tmp_path: Path) -> None:
    """Agents embedded many to a process (the simulator) share one logger: each would keep every agent's lines."""
    from edgefleet.agent import Agent

    own = Agent(settings(tmp_path / "a"))
    embedded = Agent(settings(tmp_path / "b"), serve_http=False)
    opted_in = Agent(settings(tmp_path / "c"), serve_http=False, keep_logs=True)
    try:
        assert own.logs is not None and embedded.logs is None and opted_in.logs is not None
    finally:
        for a in (own, embedded, opted_in):
            a.buffer.close()
