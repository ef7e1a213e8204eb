"""The signing side of the TUF repository and the client against a local folder (air-gapped use)."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

import edgefleet
from edgefleet.data import CallData
from edgefleet.errors import ConflictError, ManifestError, PackageError, RepositoryError, UsageError, VerificationError
from edgefleet.package import Requirements, build_package, open_package
from edgefleet.repository import Repository, TufClient, fetch_package


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory: pytest.TempPathFactory, mlp_path: Path, digits_calls: dict[str, np.ndarray]) -> list[Path]:
    d = tmp_path_factory.mktemp("pkgs")
    samples = CallData({"X": digits_calls["X"][:10]})
    return [
        build_package(
            mlp_path,
            d / f"v{v}.efpkg",
            name="digits",
            version=v,
            sample_inputs=samples,
            requirements=Requirements(tiers=["rpi4"]),
            metrics={"accuracy": 0.97},
        )
        for v in ("1.0.0", "1.1.0")
    ]


def test_init_writes_consistent_metadata_and_private_keys(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r", root_keys=3, root_threshold=2)
    names = sorted(p.name for p in repo.metadata_dir.iterdir())
    assert names == ["1.root.json", "1.snapshot.json", "1.targets.json", "root.json", "timestamp.json"]
    root = json.loads(repo.root_json())["signed"]
    assert root["consistent_snapshot"] is True
    assert root["roles"]["root"]["threshold"] == 2 and len(root["roles"]["root"]["keyids"]) == 3
    keyids = {r: set(root["roles"][r]["keyids"]) for r in ("root", "targets", "snapshot", "timestamp")}
    assert all(not (keyids[a] & keyids[b]) for a in keyids for b in keyids if a != b)  # separate keys per role
    keys = list(repo.keys_dir.iterdir())
    assert len(keys) == 6 and all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys)
    assert stat.S_IMODE(repo.keys_dir.stat().st_mode) == 0o700
    assert all(b"ENCRYPTED" not in k.read_bytes() for k in keys)
    with pytest.raises(UsageError, match="already holds a repository"):
        Repository.init(tmp_path / "r")
    with pytest.raises(UsageError, match="threshold 3 must be between 1 and the key count 2"):
        Repository.init(tmp_path / "r2", root_keys=2, root_threshold=3)


def test_passphrase_encrypts_the_keys(tmp_path: Path, pkgs: list[Path]) -> None:
    Repository.init(tmp_path / "r", passphrase="correct horse")
    assert all(b"ENCRYPTED PRIVATE KEY" in k.read_bytes() for k in (tmp_path / "r" / "keys").iterdir())
    with pytest.raises(RepositoryError, match="give its passphrase"):
        Repository(tmp_path / "r").publish(pkgs[0])
    with pytest.raises(RepositoryError, match="wrong passphrase"):
        Repository(tmp_path / "r", "battery staple").publish(pkgs[0])
    assert Repository(tmp_path / "r", "correct horse").publish(pkgs[0]).name == "digits-1.0.0.efpkg"


def test_publish_signs_the_package_with_its_manifest_summary(tmp_path: Path, pkgs: list[Path]) -> None:
    repo = Repository.init(tmp_path / "r")
    info = repo.publish(pkgs[0])
    opened = open_package(pkgs[0])
    assert info.name == "digits-1.0.0.efpkg" and info.sha256 == opened.package_sha256
    assert info.path == f"{info.sha256}.digits-1.0.0.efpkg"
    assert (repo.targets_dir / info.path).read_bytes() == pkgs[0].read_bytes()
    assert info.custom["model_sha256"] == opened.model_sha256
    assert info.custom["requirements"]["tiers"] == ["rpi4"] and info.custom["package_sha256"] == info.sha256
    assert [r.version for r in repo.status().roles] == [1, 2, 2, 2]
    assert repo.publish(pkgs[0]) == info  # idempotent
    assert [r.version for r in repo.status().roles] == [1, 2, 2, 2]
    repo.publish(pkgs[1])
    assert [t.name for t in repo.targets()] == ["digits-1.0.0.efpkg", "digits-1.1.0.efpkg"]
    assert (repo.metadata_dir / "3.targets.json").is_file() and (repo.metadata_dir / "3.snapshot.json").is_file()


def test_publish_refuses_a_different_package_under_a_published_name(
    tmp_path: Path, mlp_path: Path, pkgs: list[Path]
) -> None:
    repo = Repository.init(tmp_path / "r")
    repo.publish(pkgs[0])
    other = build_package(mlp_path, tmp_path / "o.efpkg", name="digits", version="1.0.0")
    with pytest.raises(ConflictError, match="already published with different content"):
        repo.publish(other)
    broken = tmp_path / "broken.efpkg"
    broken.write_bytes(b"\0" * 1024)
    with pytest.raises(PackageError, match=r"not a valid \.efpkg"):
        repo.publish(broken)


def test_status_warns_within_a_quarter_of_the_period_and_refresh_resigns(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r", expiry={"timestamp": timedelta(hours=4)})
    assert repo.status().warnings == [] and repo.refresh() == []
    soon = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=30)
    repo.resign("timestamp", expires=soon)
    st = repo.status()
    assert len(st.warnings) == 1
    assert st.warnings[0].startswith(f"timestamp expires on {soon:%Y-%m-%d %H:%M} UTC (in ")
    assert "under 25 % of its 4 h period" in st.warnings[0]
    assert repo.refresh() == ["timestamp"]
    assert repo.status().warnings == []
    repo.resign("snapshot", expires=datetime.now(UTC) - timedelta(seconds=5))
    assert "snapshot EXPIRED" in repo.status().warnings[0]
    assert repo.refresh() == ["snapshot", "timestamp"]
    assert repo.refresh(force=True) == ["root", "targets", "snapshot", "timestamp"]


def test_rotating_online_keys_replaces_key_files(tmp_path: Path, pkgs: list[Path]) -> None:
    repo = Repository.init(tmp_path / "r")
    repo.publish(pkgs[0])
    before = {p.name for p in repo.keys_dir.iterdir()}
    new = repo.rotate_key("targets")
    after = {p.name for p in repo.keys_dir.iterdir()}
    assert after - before == {f"targets-{new[0]}.pem"} and len(before - after) == 1
    assert [r.version for r in repo.status().roles] == [2, 3, 3, 3]
    with pytest.raises(UsageError, match="unknown role"):
        repo.rotate_key("mirror")
    # The client that trusted root v1 follows to v2 and accepts targets signed by the new key.
    client = TufClient(tmp_path / "cache", str(tmp_path / "r"), (repo.metadata_dir / "1.root.json").read_bytes())
    assert client.target_info("digits-1.0.0.efpkg").sha256 == open_package(pkgs[0]).package_sha256


def test_root_keys_can_live_offline(tmp_path: Path, pkgs: list[Path]) -> None:
    repo = Repository.init(tmp_path / "r")
    offline = tmp_path / "usb"
    offline.mkdir()
    for k in repo.keys_dir.glob("root-*.pem"):
        k.rename(offline / k.name)
    repo.publish(pkgs[0])  # online keys suffice to publish
    assert repo.refresh(force=True) == ["targets", "snapshot", "timestamp"]  # root skipped: its key is away
    with pytest.raises(RepositoryError, match=r"only 0 of the 1 root key\(s\).*pass --root-keys-dir DIR"):
        repo.rotate_key("timestamp")


def test_fetch_from_a_folder_round_trip(tmp_path: Path, pkgs: list[Path]) -> None:
    repo = Repository.init(tmp_path / "r")
    repo.publish(pkgs[0])
    root = tmp_path / "root.json"
    root.write_bytes(repo.root_json())
    got = fetch_package("digits", "1.0.0", str(tmp_path / "r"), root, tmp_path / "out", metadata_dir=tmp_path / "c")
    assert got == tmp_path / "out" / "digits-1.0.0.efpkg" and got.read_bytes() == pkgs[0].read_bytes()
    model = edgefleet.load(got)
    open_package(got).verify_golden(model)
    client = TufClient(tmp_path / "c", f"file://{tmp_path / 'r'}")  # cached root, file:// URL
    client.refresh()
    assert client.target_url("digits-1.0.0.efpkg") == str(
        repo.targets_dir / client.target_info("digits-1.0.0.efpkg").path
    )
    client.verify_file("digits-1.0.0.efpkg", got)
    wrong = tmp_path / "wrong.efpkg"
    wrong.write_bytes(pkgs[1].read_bytes())
    with pytest.raises(VerificationError, match="does not match its signed length/hash"):
        client.verify_file("digits-1.0.0.efpkg", wrong)
    with pytest.raises(RepositoryError, match=r"digits-9\.0\.0\.efpkg is not in the repository"):
        client.target_info("digits-9.0.0.efpkg")
    assert [t.name for t in client.targets()] == ["digits-1.0.0.efpkg"]


def test_signed_but_broken_package_is_refused_by_fetch(tmp_path: Path, pkgs: list[Path]) -> None:
    repo = Repository.init(tmp_path / "r")
    repo.add_target("bad-1.0.0.efpkg", b"this is not a tar", {"name": "bad"})
    root = tmp_path / "root.json"
    root.write_bytes(repo.root_json())
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PackageError, match=r"not a valid \.efpkg"):
        fetch_package("bad", "1.0.0", str(tmp_path / "r"), root, out, metadata_dir=tmp_path / "c")
    assert list(out.iterdir()) == []
    with pytest.raises(ManifestError):
        from edgefleet.package import parse_manifest

        parse_manifest(b"{}")


def test_expiry_rules_are_pure() -> None:
    from edgefleet.repository.status import due, expiry_warning

    now = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    day = timedelta(days=1)
    assert not due(now + day * 0.26, day, now) and due(now + day * 0.24, day, now)
    assert expiry_warning("timestamp", now + timedelta(hours=7), day, now) is None
    assert expiry_warning("timestamp", now + timedelta(hours=5), day, now) == (
        "timestamp expires on 2030-01-01 17:00 UTC (in 5 h, under 25 % of its 24 h period); "
        "run `edgefleet repo refresh`"
    )
    assert "with the root keys" in str(expiry_warning("root", now + timedelta(days=30), timedelta(days=365), now))
    assert str(expiry_warning("snapshot", now, timedelta(days=7), now)).startswith("snapshot EXPIRED on 2030-01-01")
