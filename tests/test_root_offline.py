"""The TUF root is not online (docs/security/keys.md): `repo init --root-keys-dir` leaves the server only the online
keys, with which a real control plane publishes and re-signs timestamp/snapshot; a server that creates its own
repository writes the root key outside it and says so; and the key ceremony — root rotation done offline,
online-key rotation, revocation of a compromised key — seen by the real TUF client that trusted root v1."""

from __future__ import annotations

import logging
import shutil
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import SSlibKey
from tuf.api.metadata import Metadata, Root, Timestamp
from tuf.api.serialization.json import JSONSerializer

from _cp_support import CP, build_pkg
from _package_helpers import assert_refused, run_cli
from edgefleet.errors import VerificationError
from edgefleet.repository import Repository, TufClient, _keys, default_root_keys_dir, fetch_package, root_key_files

Capsys = pytest.CaptureFixture[str]


def all_root_keys(*folders: Path) -> list[Path]:
    return [p for f in folders if f.exists() for p in f.rglob("root-*.pem")]


def root_of(repo: Path) -> Root:
    return Metadata[Root].from_bytes((repo / "metadata" / "root.json").read_bytes()).signed


def test_server_runs_and_signs_without_root_keys(tmp_path: Path, mlp_path: Path, capsys: Capsys) -> None:
    repo, usb = tmp_path / "repo", tmp_path / "usb"
    code, _, err = run_cli(capsys, "repo", "init", repo, "--root-keys-dir", usb)
    assert code == 0, err
    assert len(root_key_files(usb)) == 1 and stat.S_IMODE(usb.stat().st_mode) == 0o700
    assert all_root_keys(repo, default_root_keys_dir(repo)) == []  # nothing the server can reach holds a root key
    assert sorted(p.name.split("-")[0] for p in (repo / "keys").iterdir()) == ["snapshot", "targets", "timestamp"]
    trusted = (repo / "metadata" / "root.json").read_bytes()

    cp = CP(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}")
    try:
        assert cp.store.repo.warnings == []  # no root key reachable: nothing to warn about
        cp.upload(build_pkg(mlp_path, tmp_path / "pkgs", "1.0.0"))
        # Timestamp, then snapshot, come close to expiring; the server's own refresh re-signs them, root untouched.
        online = Repository(repo)
        online.resign("timestamp", expires=datetime.now(UTC) + timedelta(minutes=5))
        assert cp.store.repo.refresh() == ["timestamp"]
        online.resign("snapshot", expires=datetime.now(UTC) + timedelta(minutes=5))
        assert cp.store.repo.refresh() == ["snapshot", "timestamp"]
        assert root_of(repo).version == 1

        # Routine online-key rotation with the root keys brought in for the ceremony; the running server signs
        # the next publish with the new key, and a client that trusted root v1 follows.
        code, _, err = run_cli(capsys, "repo", "rotate-key", repo, "timestamp", "--root-keys-dir", usb)
        assert code == 0, err
        cp.upload(build_pkg(mlp_path, tmp_path / "pkgs", "2.0.0"))
        client = TufClient(tmp_path / "client", f"{cp.url}/tuf", trusted)
        client.download("digits-2.0.0.efpkg", tmp_path / "out")
        assert root_of(repo).version == 2
        assert all_root_keys(repo, default_root_keys_dir(repo)) == []
    finally:
        cp.close()


def test_a_fresh_server_writes_its_root_key_outside_the_repository(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "repo"
    outside = tmp_path / "repo.root-keys"
    cp = CP(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}")
    cp.close()
    assert len(root_key_files(outside)) == 1 and stat.S_IMODE(outside.stat().st_mode) == 0o700
    assert all_root_keys(repo) == []
    msg = f"root key written to {outside}: move it offline (docs/security/keys.md)"
    assert cp.store.repo.warnings == [msg]
    # logged once, as a warning, at the start that wrote it (`edgefleet server` prints its log to stderr)
    warned = [r for r in caplog.records if r.name.startswith("edgefleet.") and r.getMessage() == msg]
    assert [r.levelno for r in warned] == [logging.WARNING]

    again = CP(tmp_path, f"sqlite:///{tmp_path / 'cp2.db'}")
    again.close()
    assert again.store.repo.warnings == [
        f"root private key(s) still in {outside}: move them offline (docs/security/keys.md)"
    ]

    # Moved offline: silence. Put back next to the online keys: a warning that says what it means.
    usb = tmp_path / "usb"
    shutil.move(outside, usb)
    third = CP(tmp_path, f"sqlite:///{tmp_path / 'cp3.db'}")
    third.close()
    assert third.store.repo.warnings == []
    key = root_key_files(usb)[0]
    shutil.copy(key, repo / "keys" / key.name)
    fourth = CP(tmp_path, f"sqlite:///{tmp_path / 'cp4.db'}")
    fourth.close()
    (warning,) = fourth.store.repo.warnings
    assert f"root private key(s) in {repo / 'keys'}, next to the online keys" in warning


def test_repo_init_refuses_root_keys_inside_the_repository(tmp_path: Path, capsys: Capsys) -> None:
    repo = tmp_path / "repo"
    code, _, err = run_cli(capsys, "repo", "init", repo, "--root-keys-dir", repo / "keys")
    assert_refused(code, err, match="is inside the repository or its online keys folder")
    code, out, err = run_cli(capsys, "repo", "init", repo)  # default: next to the repository, not in it
    assert code == 0, err
    assert "move them offline (docs/security/keys.md)" in out
    assert len(root_key_files(default_root_keys_dir(repo))) == 1 and all_root_keys(repo) == []


def test_root_keys_can_be_passphrase_protected_on_their_own(
    tmp_path: Path, capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, usb = tmp_path / "repo", tmp_path / "usb"
    monkeypatch.setenv("EDGEFLEET_ROOT_PASSPHRASE", "offline only")
    assert run_cli(capsys, "repo", "init", repo, "--root-keys-dir", usb)[0] == 0
    assert all(b"ENCRYPTED PRIVATE KEY" in k.read_bytes() for k in root_key_files(usb))
    # the online keys stay usable by a server that is given no passphrase
    assert all(b"ENCRYPTED" not in k.read_bytes() for k in (repo / "keys").iterdir())
    monkeypatch.delenv("EDGEFLEET_ROOT_PASSPHRASE")
    code, _, err = run_cli(capsys, "repo", "rotate-key", repo, "snapshot", "--root-keys-dir", usb)
    assert_refused(code, err, match="is encrypted: give its passphrase (--ask-root-passphrase or EDGEFLEET_ROOT_")
    monkeypatch.setenv("EDGEFLEET_ROOT_PASSPHRASE", "offline only")
    assert run_cli(capsys, "repo", "rotate-key", repo, "snapshot", "--root-keys-dir", usb)[0] == 0


def test_key_ceremony_root_rotation_online_rotation_and_revocation(
    tmp_path: Path, mlp_path: Path, capsys: Capsys
) -> None:
    """Every step as docs/security/keys.md gives it, checked by the real client."""
    repo, usb, offline = tmp_path / "repo", tmp_path / "usb", tmp_path / "offline-copy"
    pkgs = tmp_path / "pkgs"
    assert run_cli(capsys, "repo", "init", repo, "--root-keys-dir", usb)[0] == 0
    v1_root = tmp_path / "root-v1.json"
    shutil.copy(repo / "metadata" / "root.json", v1_root)
    assert run_cli(capsys, "publish", build_pkg(mlp_path, pkgs, "1.0.0"), "--repo", repo)[0] == 0

    def fetch(version: str, cache: str) -> Path:
        return fetch_package("digits", version, str(repo), v1_root, tmp_path / "out", metadata_dir=tmp_path / cache)

    fetch("1.0.0", "client-a")  # client A now caches root v1

    # 1. Root rotation on the offline machine: a copy of the repository without its online keys, the root keys
    #    on the USB stick; the new root files go back to the server.
    shutil.copytree(repo, offline, ignore=shutil.ignore_patterns("keys", ".lock"))
    old_root_keys = {p.name for p in root_key_files(usb)}
    code, _, err = run_cli(capsys, "repo", "rotate-key", offline, "root", "--root-keys-dir", usb)
    assert code == 0, err
    assert not old_root_keys & {p.name for p in root_key_files(usb)}  # the retired key is gone
    v1 = Metadata[Root].from_bytes(v1_root.read_bytes())
    v2 = Metadata[Root].from_bytes((offline / "metadata" / "2.root.json").read_bytes())
    v1.verify_delegate("root", v2)  # signed by the old root keys …
    v2.verify_delegate("root", v2)  # … and by the new ones
    # Renewing root before it expires is the same trip: only root is re-signed, no online key is needed.
    code, out, err = run_cli(capsys, "repo", "refresh", offline, "--role", "root", "--root-keys-dir", usb)
    assert code == 0 and "re-signed: root" in out, err
    for name in ("2.root.json", "3.root.json", "root.json"):
        shutil.copy(offline / "metadata" / name, repo / "metadata" / name)

    # 2. Routine online-key rotation (on the server, root keys mounted for the ceremony).
    code, _, err = run_cli(capsys, "repo", "rotate-key", repo, "snapshot", "--root-keys-dir", usb)
    assert code == 0, err
    assert run_cli(capsys, "publish", build_pkg(mlp_path, pkgs, "2.0.0"), "--repo", repo)[0] == 0
    fetch("2.0.0", "client-a")  # A walks root 1 → 2 → 3 → 4
    fetch("2.0.0", "client-b")  # a fresh client holding only root v1 does too
    assert Metadata[Root].from_bytes((tmp_path / "client-a" / "root.json").read_bytes()).signed.version == 4

    # 3. The timestamp key leaks: an attacker keeps a copy. Revoke it by rotating it out.
    stolen_dir = tmp_path / "stolen"
    root3 = root_of(repo)
    (leaked_id,) = root3.roles["timestamp"].keyids
    shutil.copytree(repo / "keys", stolen_dir)
    code, _, err = run_cli(
        capsys, "repo", "rotate-key", repo, "timestamp", "--key", leaked_id[:12], "--root-keys-dir", usb
    )
    assert code == 0, err
    assert leaked_id not in root_of(repo).roles["timestamp"].keyids
    fetch("2.0.0", "client-a")  # the legitimate repository still verifies

    # The attacker, holding the server, signs a newer timestamp with the revoked key and serves it.
    leaked_key = root3.keys[leaked_id]
    assert isinstance(leaked_key, SSlibKey)
    signer = _keys.load_signer(stolen_dir, "timestamp", leaked_key, None)
    assert signer is not None
    forged = Metadata[Timestamp].from_bytes((repo / "metadata" / "timestamp.json").read_bytes())
    forged.signed.version += 1
    forged.signed.expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    forged.signatures.clear()
    forged.sign(signer)
    (repo / "metadata" / "timestamp.json").write_bytes(forged.to_bytes(JSONSerializer(compact=False)))
    for cache in ("client-a", "client-b", "client-c"):  # c: a fresh client that trusts only root v1
        with pytest.raises(VerificationError, match="without enough valid signatures"):
            fetch("2.0.0", cache)


def test_every_command_in_keys_md_exists(capsys: Capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/security/keys.md names only commands and options the CLI has."""
    monkeypatch.setenv("COLUMNS", "250")  # help text unwrapped, so every option name is whole
    docs = (Path(__file__).parents[1] / "docs" / "security" / "keys.md").read_text()
    lines = docs.replace("\\\n", " ").splitlines()
    commands = [line.split("#")[0].split() for line in lines if line.startswith("edgefleet ")]
    assert len(commands) >= 8
    for words in commands:
        sub = words[1:3] if words[1] in ("repo", "keys") else words[1:2]
        code, help_text, err = run_cli(capsys, *sub, "--help")
        assert code == 0, (words, err)
        for option in (w for w in words if w.startswith("--")):
            assert option in help_text, f"{' '.join(sub)} has no {option}"
