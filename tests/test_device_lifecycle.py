"""The device lifecycle end to end with real agents against a real control plane on loopback
(docs/adr/0103-device-lifecycle-and-pinned-enrollment.md): decommission (the agent wipes itself and exits with its
own code; the credential then stops working), a revoked agent that exits with one clear message instead of
looping, re-enrollment with a new token, credential rotation without a lost report, device-key rotation with the
old private key kept while a package needs it.

Agents run in this process (``edgefleet.agent.Agent`` with an in-process model backend) except where the exit
code of ``edgefleet agent`` itself is the point."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from _cp_support import CP, build_pkg
from _fleet_support import install
from conftest import free_port
from edgefleet.agent import identity
from edgefleet.agent.agent import EXIT_CREDENTIAL_REFUSED, EXIT_DECOMMISSIONED, REFUSED
from edgefleet.agent.backend import InProcessBackend
from edgefleet.config import AgentSettings

A = "/api/v1"


def _in_process(spec: Any, on_crash: Any) -> InProcessBackend:
    return InProcessBackend(spec, on_crash)


def _token(cp: CP) -> str:
    return str(cp.api("POST", f"{A}/enrollment-tokens", json={"tier": "lab"})["token"])


def _settings(data: Path, cp: CP, token: str | None) -> AgentSettings:
    return AgentSettings(server=cp.url, token=token, data_dir=data, checkin_interval_s=0.2, telemetry_interval_s=0.3)


class Running:
    """An agent in this process, polled from the test's event loop."""

    def __init__(self, settings: AgentSettings) -> None:
        from edgefleet.agent import Agent

        self.agent = Agent(settings, serve_http=False, backend_factory=_in_process)

    async def __aenter__(self) -> Any:
        await self.agent.start()
        return self.agent

    async def __aexit__(self, *exc: object) -> None:
        await self.agent.stop()


async def until(pred: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _enrolled(data: Path) -> bool:
    try:
        return identity.load_identity(data) is not None
    except Exception:
        return False


def _device(cp: CP, device_id: str) -> dict[str, Any]:
    return dict(cp.api("GET", f"{A}/devices/{device_id}"))


def _desired_status(cp: CP, device_id: str, credential: str) -> int:
    r = cp.http.get(f"{A}/devices/{device_id}/desired", headers={"Authorization": f"Bearer {credential}"})
    return r.status_code


@pytest.fixture(scope="module")
def pkg(mlp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pkg(mlp_path, tmp_path_factory.mktemp("pkgs"), "1.0.0")


# ---------------------------------------------------------------- decommission


def test_decommission_wipes_the_device_and_its_credential_stops(cp: CP, tmp_path: Path, pkg: Path) -> None:
    data = tmp_path / "dev"
    install(data, pkg)  # a device serving a model

    async def go() -> tuple[int | None, str]:
        async with Running(_settings(data, cp, _token(cp))) as a:
            await until(lambda: _enrolled(data) and a.service.info is not None, "enrolled and serving")
            ident = identity.load_identity(data)
            assert ident is not None
            assert cp.api("GET", f"{A}/fleet")["devices"]["active"] == 1
            cp.api("POST", f"{A}/devices/{ident.device_id}/decommission")
            await until(lambda: a.exit_code is not None, "the agent to stop itself")
            assert a.service.info is None  # no longer serving
            return a.exit_code, ident.device_id + " " + ident.credential

    code, both = asyncio.run(go())
    device_id, credential = both.split()
    assert code == EXIT_DECOMMISSIONED
    assert sorted(p.name for p in data.iterdir()) == []  # identity, keys, trust, packages, state: all gone
    d = _device(cp, device_id)  # the record stays, for the audit
    assert d["decommissioned"] and d["revoked"] and d["wipe_sent_at"] is not None
    assert cp.api("GET", f"{A}/fleet")["devices"]["active"] == 0
    r = cp.http.get(f"{A}/devices/{device_id}/desired", headers={"Authorization": f"Bearer {credential}"})
    assert r.status_code == 401 and "decommissioned" in r.text
    actions = [e["action"] for e in cp.api("GET", f"{A}/audit", params={"target": device_id})]
    assert "device.decommission" in actions and "device.wipe_sent" in actions


def test_a_wipe_cut_short_is_finished_at_the_next_start(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    (data / "slots").mkdir(parents=True)
    (data / "slots" / "A.efpkg").write_bytes(b"model")
    identity.save_identity(
        data, identity.Identity(device_id="d", credential="c", tier="lab", repository_url="http://r/tuf")
    )
    identity.begin_wipe(data)  # the power went here
    from edgefleet.agent import Agent

    a = Agent(AgentSettings(data_dir=data), serve_http=False)
    a.buffer.close()
    assert not (data / "identity.json").exists() and not (data / "slots" / "A.efpkg").exists()
    assert not identity.wipe_pending(data)


# ---------------------------------------------------------------- refused credential, re-enrollment


def test_revoked_agent_exits_with_its_message_instead_of_looping(
    cp: CP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "dev"
    caplog.set_level(logging.INFO, logger="edgefleet.agent")
    token = _token(cp)

    async def go() -> int | None:
        async with Running(_settings(data, cp, token)) as a:
            await until(lambda: _enrolled(data), "enrollment")
            ident = identity.load_identity(data)
            assert ident is not None
            cp.api("POST", f"{A}/devices/{ident.device_id}/revoke")
            await until(lambda: a.exit_code is not None, "the agent to give up")
            return a.exit_code

    # the same (spent) token is still given, as a service unit would: that is no new token
    assert asyncio.run(go()) == EXIT_CREDENTIAL_REFUSED
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(REFUSED)


@pytest.mark.process
def test_revoked_agent_process_exits_non_zero(cp: CP, tmp_path: Path) -> None:
    data = tmp_path / "dev"
    exe = str(Path(sys.executable).with_name("edgefleet"))
    args = [exe, "agent", "--server", cp.url, "--token", _token(cp), "--data-dir", str(data)]
    args += ["--port", str(free_port()), "--checkin-interval", "0.2", "--telemetry-interval", "0.5"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _enrolled(data):
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "the agent did not enroll"
            time.sleep(0.05)
        ident = identity.load_identity(data)
        assert ident is not None
        cp.api("POST", f"{A}/devices/{ident.device_id}/revoke")
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_CREDENTIAL_REFUSED
    text = out.decode()
    assert REFUSED in text and "Traceback" not in text


def test_revoked_device_enrolls_again_with_a_new_token(cp: CP, tmp_path: Path, pkg: Path) -> None:
    data = tmp_path / "dev"
    install(data, pkg)

    async def first() -> str:
        async with Running(_settings(data, cp, _token(cp))) as a:
            await until(lambda: _enrolled(data) and a.service.info is not None, "enrollment")
            ident = identity.load_identity(data)
            assert ident is not None
            return ident.device_id

    old = asyncio.run(first())
    cp.api("POST", f"{A}/devices/{old}/revoke")

    async def second() -> str:
        async with Running(_settings(data, cp, _token(cp))) as a:

            def moved() -> bool:
                i = identity.load_identity(data)
                return i is not None and i.device_id != old

            await until(moved, "re-enrollment")
            ident = identity.load_identity(data)
            assert ident is not None
            await until(lambda: _device(cp, ident.device_id)["last_seen"] is not None, "a check-in as the new id")
            assert a.exit_code is None and a.service.info is not None  # kept its state dir: still serving
            return ident.device_id

    new = asyncio.run(second())
    assert new != old and _device(cp, old)["revoked"] and not _device(cp, new)["revoked"]
    enroll = cp.api("GET", f"{A}/audit", params={"target": new, "action": "device.enroll"})
    assert enroll and enroll[0]["detail"]["previous_device_id"] == old


# ---------------------------------------------------------------- credential rotation


def test_old_credential_works_until_the_new_one_is_first_used(cp: CP) -> None:
    dev = cp.device("lab")
    old = dev.credential
    r = cp.http.post(f"{A}/devices/{dev.id}/credential", headers={"Authorization": f"Bearer {old}"})
    assert r.status_code == 200, r.text
    new = r.json()["credential"]
    assert _desired_status(cp, dev.id, old) == 200  # both work while the new one is unused
    assert _desired_status(cp, dev.id, old) == 200
    assert _desired_status(cp, dev.id, new) == 200  # first use: the new one is the only one now
    assert _desired_status(cp, dev.id, old) == 401
    assert _desired_status(cp, dev.id, new) == 200


def test_credential_rotation_end_to_end_loses_no_report(cp: CP, tmp_path: Path, pkg: Path) -> None:
    from edgefleet.controlplane.db import TelemetryRow

    data = tmp_path / "dev"
    install(data, pkg)
    sent: list[str] = []

    async def go() -> tuple[str, str, str]:
        async with Running(_settings(data, cp, _token(cp))) as a:
            add = a.buffer.add

            def recording(kind: str, body: str) -> Any:
                if kind == "window":
                    sent.append(json.loads(body)["window_id"])
                return add(kind, body)

            a.buffer.add = recording
            await until(lambda: _enrolled(data) and len(sent) >= 3, "enrollment and a few windows")
            before = identity.load_identity(data)
            assert before is not None
            cp.api("POST", f"{A}/devices/{before.device_id}/rotate-credential")

            def rotated() -> bool:
                i = identity.load_identity(data)
                return i is not None and i.credential != before.credential

            await until(rotated, "the new credential on disk")
            await until(lambda: not _device(cp, before.device_id)["credential_rotation_pending"], "the new one in use")
            n = len(sent)
            await until(lambda: len(sent) >= n + 3, "more windows after the rotation")
            snapshot = set(sent)  # every window made before, during and after the rotation ...

            def stored() -> set[str]:
                with cp.store.db.session() as s:
                    q = select(TelemetryRow.window_id).where(TelemetryRow.device_id == before.device_id)
                    return set(s.scalars(q))

            await until(lambda: snapshot <= stored(), "every window to reach the server")  # ... arrives
            assert a.buffer.dropped == 0
            after = identity.load_identity(data)
            assert after is not None
            return before.device_id, before.credential, after.credential

    device_id, old, new = asyncio.run(go())
    assert _desired_status(cp, device_id, old) == 401 and _desired_status(cp, device_id, new) == 200


# ---------------------------------------------------------------- device-key rotation


def test_key_rotation_keeps_the_old_key_while_a_package_needs_it(cp: CP, tmp_path: Path, mlp_path: Path) -> None:
    import numpy as np

    from edgefleet.data import CallData
    from edgefleet.package import build_package
    from edgefleet.package.keys import key_id

    data = tmp_path / "dev"
    token = _token(cp)

    async def enroll() -> None:
        async with Running(_settings(data, cp, token)):
            await until(lambda: _enrolled(data), "enrollment")

    asyncio.run(enroll())
    old_pub = identity.public_key(data)
    x = np.random.default_rng(0).random((4, 1, 64), dtype=np.float32)

    def encrypted(version: str, pub: str) -> Path:
        return build_package(
            mlp_path,
            tmp_path / f"digits-{version}.efpkg",
            name="digits",
            version=version,
            sample_inputs=CallData({"X": x}),
            recipients=[pub],
        )

    install(data, encrypted("1.0.0", old_pub))
    ident = identity.load_identity(data)
    assert ident is not None

    async def rotate() -> None:
        async with Running(_settings(data, cp, token)) as a:
            await until(lambda: a.service.info is not None, "serving the encrypted package")
            cp.api("POST", f"{A}/devices/{ident.device_id}/rotate-key")
            await until(lambda: _device(cp, ident.device_id)["public_key"] != old_pub, "the new key on the server")
            await until(lambda: identity.public_key(data) != old_pub, "the new key current on the device")
            assert a.service.info is not None  # still serving the package built for the old key

    asyncio.run(rotate())
    new_pub = identity.public_key(data)
    d = _device(cp, ident.device_id)
    assert d["public_key"] == new_pub and d["previous_public_key"] == old_pub and not d["key_rotation_pending"]
    held = identity.held_keys(data)
    assert set(held) == {key_id(old_pub), key_id(new_pub)}  # the old one kept: the committed package needs it
    slot_a = data / "slots" / "A.efpkg"
    assert identity.key_for_package(data, slot_a) == held[key_id(old_pub)]
    # once no package needs it, it goes; a package built for the new key opens with the current one
    v2 = encrypted("2.0.0", new_pub)
    assert identity.key_for_package(data, v2) == data / "device.key"
    assert identity.prune_retired_keys(data, set(identity.package_key_ids(slot_a))) == []
    assert identity.prune_retired_keys(data, set(identity.package_key_ids(v2))) == [key_id(old_pub)]
    assert set(identity.held_keys(data)) == {key_id(new_pub)}
