"""Trust pinned at enrollment, and identity files that survive a power cut
(docs/adr/0103-device-lifecycle-and-pinned-enrollment.md).

The real agent (``edgefleet.agent.Agent``, in this process) enrolls against a real control plane on loopback.
A faulty edge — an httpx transport that rewrites the enroll answer, as a machine in the middle would — must not
get its root trusted: the token's pin (or ``--root``) refuses it and nothing is written. A token minted before a
root rotation still enrolls: the answer carries the root it pinned and the TUF client walks forward."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from _cp_support import CP
from edgefleet.agent import identity
from edgefleet.agent.durable import CRASHPOINT_ENV
from edgefleet.config import AgentSettings
from edgefleet.errors import AgentError, VerificationError


class RewriteRoot(httpx.AsyncBaseTransport):
    """A faulty edge: forwards everything to the real network, swapping the enroll answer's root for another."""

    def __init__(self, root: bytes) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.root = root
        self.rewritten = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        r = await self.inner.handle_async_request(request)
        if not request.url.path.endswith("/enroll") or r.status_code != 200:
            return r
        body = json.loads(await r.aread())
        body["root_json"] = self.root.decode()
        self.rewritten += 1
        return httpx.Response(200, json=body)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _token(cp: CP, tier: str = "lab") -> str:
    return str(cp.api("POST", "/api/v1/enrollment-tokens", json={"tier": tier})["token"])


def _settings(data: Path, cp: CP, token: str, **kw: Any) -> AgentSettings:
    return AgentSettings(
        server=cp.url, token=token, data_dir=data, checkin_interval_s=0.2, telemetry_interval_s=0.5, **kw
    )


async def _run_until(agent_settings: AgentSettings, pred: Any, what: str, **kw: Any) -> Any:
    from edgefleet.agent import Agent

    a = Agent(agent_settings, serve_http=False, **kw)
    await a.start()
    try:
        deadline = time.monotonic() + 60
        while not pred(a):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)
    finally:
        await a.stop()
    return a


def _other_root(tmp: Path) -> bytes:
    from edgefleet.repository import Repository

    Repository.init(tmp / "evil-repo")
    return (tmp / "evil-repo" / "metadata" / "root.json").read_bytes()


def test_token_carries_the_pin_of_the_current_root(cp: CP) -> None:
    out = cp.api("POST", "/api/v1/enrollment-tokens", json={"tier": "lab"})
    root = (cp.settings.repo / "metadata" / "root.json").read_bytes()
    pin = identity.token_pin(out["token"])
    assert pin is not None and len(pin) == 32 and hashlib.sha256(root).hexdigest().startswith(pin)
    assert out["root_version"] == 1


def test_substituted_root_is_refused_and_nothing_is_written(
    cp: CP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "dev"
    edge = RewriteRoot(_other_root(tmp_path))
    caplog.set_level(logging.WARNING, logger="edgefleet.agent")

    def refused(_: Any) -> bool:
        return any("does not match the pin in the enrollment token" in r.getMessage() for r in caplog.records)

    asyncio.run(_run_until(_settings(data, cp, _token(cp)), refused, "the refusal", transport=edge))
    assert edge.rewritten >= 1
    assert not (data / "identity.json").exists() and not (data / "tuf" / "trusted_root.json").exists()
    msg = next(r.getMessage() for r in caplog.records if "does not match the pin" in r.getMessage())
    assert "\n" not in msg and "nothing stored" in msg


def test_root_file_given_out_of_band_pins_an_unpinned_token(
    cp: CP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from edgefleet.controlplane import devices

    # old-format tokens (no pin) still enroll; --root then decides which root the answer must carry
    with cp.store.db.session() as s:
        old_a, _ = devices.create_enrollment_token(s, tier="lab")
        old_b, _ = devices.create_enrollment_token(s, tier="lab")
    assert identity.token_pin(old_a) is None
    wrong = tmp_path / "wrong-root.json"
    wrong.write_bytes(_other_root(tmp_path))
    caplog.set_level(logging.WARNING, logger="edgefleet.agent")
    data_a = tmp_path / "a"

    def refused(_: Any) -> bool:
        return any("is not the --root file given" in r.getMessage() for r in caplog.records)

    asyncio.run(_run_until(_settings(data_a, cp, old_a, root=wrong), refused, "the --root refusal"))
    assert not (data_a / "identity.json").exists() and not (data_a / "tuf" / "trusted_root.json").exists()

    right = tmp_path / "root.json"
    right.write_bytes(cp.store.repo.root_json())
    data_b = tmp_path / "b"
    asyncio.run(
        _run_until(
            _settings(data_b, cp, old_b, root=right),
            lambda _: (data_b / "identity.json").exists(),
            "enrollment with --root",
        )
    )
    assert (data_b / "tuf" / "trusted_root.json").read_bytes() == right.read_bytes()


def test_token_made_before_a_root_rotation_enrolls_and_walks_to_the_new_root(cp: CP, tmp_path: Path) -> None:
    from edgefleet.repository import TufClient

    token = _token(cp)
    v1 = (cp.settings.repo / "metadata" / "1.root.json").read_bytes()
    from edgefleet.repository import Repository
    from edgefleet.repository.repo import default_root_keys_dir

    # a new root version (2), signed by the old root's keys, as `edgefleet repo rotate-key` does with them at hand
    offline = Repository(cp.settings.repo, root_keys_dir=default_root_keys_dir(cp.settings.repo))
    offline.rotate_key("targets")
    assert json.loads((cp.settings.repo / "metadata" / "root.json").read_bytes())["signed"]["version"] == 2
    data = tmp_path / "dev"
    asyncio.run(_run_until(_settings(data, cp, token), lambda _: (data / "identity.json").exists(), "enrollment"))
    # the answer carried exactly the root the token pinned ...
    assert (data / "tuf" / "trusted_root.json").read_bytes() == v1
    # ... and the device's TUF client, starting from it, verifies its way to the current one
    ident = identity.load_identity(data)
    assert ident is not None and ident.token_sha256 == identity.token_sha256(token)
    client = TufClient(data / "tuf" / "metadata", ident.repository_url, identity.trusted_root(data))
    client.refresh()
    assert json.loads((data / "tuf" / "metadata" / "root.json").read_bytes())["signed"]["version"] == 2


# ---------------------------------------------------------------- identity files


def test_identity_round_trip_mode_and_unreadable_identity(tmp_path: Path) -> None:
    ident = identity.Identity(device_id="dev-1", credential="efd_x", tier="lab", repository_url="http://r/tuf")
    identity.save_identity(tmp_path, ident)
    assert identity.load_identity(tmp_path) == ident
    assert (tmp_path / "identity.json").stat().st_mode & 0o777 == 0o600
    assert identity.load_identity(tmp_path / "nowhere") is None
    (tmp_path / "identity.json").write_text('{"device_id": "dev-1"')
    with pytest.raises(AgentError, match=r"identity\.json is unreadable") as err:
        identity.load_identity(tmp_path)
    assert "\n" not in str(err.value) and "--token" in str(err.value)


def test_pin_parsing_and_check() -> None:
    root = b'{"signed": {"version": 1}}'
    digest = hashlib.sha256(root).hexdigest()
    assert identity.token_pin("eft_abc-_x." + digest[:32]) == digest[:32]
    assert identity.token_pin("eft_abc-_x." + digest) == digest
    assert identity.token_pin("eft_abc-_x") is None
    assert identity.token_pin("eft_abc." + digest[:31]) is None  # too short to pin anything
    identity.check_root(root, pin=digest[:32], pinned_root=None)
    identity.check_root(root, pin=None, pinned_root=root)
    with pytest.raises(VerificationError, match="does not match the pin"):
        identity.check_root(root + b" ", pin=digest[:32], pinned_root=None)


_WRITE = """
import sys
from pathlib import Path
from edgefleet.agent import identity
identity.save_identity(Path(sys.argv[1]), identity.Identity(
    device_id="dev-new", credential="efd_new", tier="lab", repository_url="http://r/tuf"))
"""


@pytest.mark.process
@pytest.mark.parametrize("point", ["identity.before_fsync", "identity.after_fsync", "identity.after_rename"])
def test_power_cut_while_writing_identity_leaves_old_or_new(tmp_path: Path, point: str) -> None:
    old = identity.Identity(device_id="dev-old", credential="efd_old", tier="lab", repository_url="http://r/tuf")
    identity.save_identity(tmp_path, old)
    env = {**os.environ, CRASHPOINT_ENV: point}
    r = subprocess.run([sys.executable, "-c", _WRITE, str(tmp_path)], env=env, capture_output=True, timeout=120)
    assert r.returncode == 87, r.stderr.decode()
    got = identity.load_identity(tmp_path)  # never torn: one or the other, readable
    assert got is not None
    assert got.device_id == ("dev-new" if point == "identity.after_rename" else "dev-old")
