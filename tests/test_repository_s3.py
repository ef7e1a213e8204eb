"""The TUF repository in S3-compatible object storage: a real SeaweedFS (``tests/_s3_support.py``) holds the signed
files; the CLI and the control plane sign into the bucket, while clients and a real agent read the bucket's
anonymous endpoint over plain HTTP, with Range requests for a download that was cut."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from _fleet_support import AgentProc, Fleet, committed_version, make_packages, state_of
from _package_helpers import run_cli
from _s3_support import CuttingLink, S3Repo, SeaweedS3, s3_env_fixture, seaweed_fixture  # noqa: F401  (fixtures)
from conftest import free_port
from edgefleet.agent.updater import CHUNK
from edgefleet.errors import RepositoryError, UsageError, VerificationError
from edgefleet.repository import Repository, TufClient
from edgefleet.repository.storage import S3Storage


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory: pytest.TempPathFactory, mlp_path: Path, digits: Any) -> dict[str, Path]:
    return make_packages(mlp_path, digits.x_test, tmp_path_factory.mktemp("pkgs"), ["1.0.0", "2.0.0"])


def _objects(s3: S3Repo) -> list[str]:
    pages = s3.server.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_cli_init_publish_status_in_a_bucket(
    s3_env: S3Repo, tmp_path: Path, pkgs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    code, out, err = run_cli(capsys, "repo", "init", s3_env.url, "--keys", keys, "--json")
    assert code == 0, err
    assert json.loads(out)["path"] == s3_env.url
    # root keys went next to the online keys, both local; the bucket holds signed files only
    assert list((tmp_path / "keys.root-keys").glob("root-*.pem")) and list(keys.glob("targets-*.pem"))
    code, out, err = run_cli(capsys, "publish", pkgs["1.0.0"], "--repo", s3_env.url, "--keys", keys, "--json")
    assert code == 0, err
    sha = json.loads(out)["sha256"]
    code, out, err = run_cli(capsys, "repo", "status", s3_env.url, "--keys", keys, "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["targets"] == 1 and status["warnings"] == []
    assert {r["role"]: r["version"] for r in status["roles"]} == {
        "root": 1,
        "targets": 2,
        "snapshot": 2,
        "timestamp": 2,
    }
    objects = _objects(s3_env)
    assert f"fleet/tuf/targets/{sha}.digits-1.0.0.efpkg" in objects
    assert {"fleet/tuf/metadata/root.json", "fleet/tuf/metadata/2.snapshot.json", "fleet/tuf/repository.json"} <= set(
        objects
    )
    assert not [o for o in objects if o.endswith(".pem") or "/keys/" in o], objects
    assert "fleet/tuf/.lock" not in objects  # released after each write
    code, _, err = run_cli(capsys, "repo", "refresh", s3_env.url, "--keys", keys, "--force")
    assert code == 0, err
    # a rotation needs the root keys: found in KEYS.root-keys, where init put them
    code, out, err = run_cli(capsys, "repo", "rotate-key", s3_env.url, "timestamp", "--keys", keys, "--json")
    assert code == 0 and json.loads(out)["root_version"] == 3, err  # refresh --force re-signed root: 2
    assert {"fleet/tuf/metadata/2.root.json", "fleet/tuf/metadata/3.root.json"} <= set(_objects(s3_env))
    # a second init is refused, and an s3:// repository without a local keys folder is a usage error
    code, _, err = run_cli(capsys, "repo", "init", s3_env.url, "--keys", tmp_path / "other")
    assert code == 2 and "already holds a repository" in err
    code, _, err = run_cli(capsys, "repo", "status", s3_env.url)
    assert code == 2 and "--keys DIR" in err and "Traceback" not in err


def test_a_missing_bucket_is_one_clear_line(s3_env: S3Repo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "repo", "init", "s3://no-such-bucket-here/x", "--keys", tmp_path / "k")
    assert code == 2 and "bucket 'no-such-bucket-here' does not exist" in err, err


def test_tuf_client_reads_the_bucket_anonymously_and_refuses_tampering(
    s3_env: S3Repo, tmp_path: Path, pkgs: dict[str, Path]
) -> None:
    repo = Repository.init(s3_env.url, keys_dir=tmp_path / "keys", root_keys_dir=tmp_path / "root-keys")
    info = repo.publish(pkgs["1.0.0"])
    url = s3_env.public_url
    # plain HTTP without credentials: what a device or a CDN sees; byte ranges work (the agent resumes with them)
    whole = httpx.get(f"{url}/targets/{info.path}")
    assert whole.status_code == 200 and whole.content == pkgs["1.0.0"].read_bytes()
    part = httpx.get(f"{url}/targets/{info.path}", headers={"Range": "bytes=100-"})
    assert part.status_code == 206 and part.content == whole.content[100:]
    assert httpx.get(f"{url}/metadata/timestamp.json").headers["cache-control"] == "no-cache"
    assert "immutable" in httpx.get(f"{url}/metadata/1.root.json").headers["cache-control"]
    assert httpx.put(f"{url}/targets/evil", content=b"x").status_code == 403  # anonymous writes are refused

    client = TufClient(tmp_path / "cache", url, repo.root_json())
    got = client.download("digits-1.0.0.efpkg", tmp_path / "out")
    assert got.read_bytes() == pkgs["1.0.0"].read_bytes()

    # the object altered after signing, as a compromised bucket or CDN would serve it
    flipped = bytearray(whole.content)
    flipped[len(flipped) // 2] ^= 0xFF
    s3_env.server.client().put_object(Bucket=s3_env.bucket, Key=f"fleet/tuf/targets/{info.path}", Body=bytes(flipped))
    fresh = TufClient(tmp_path / "cache2", url, repo.root_json())
    with pytest.raises(VerificationError):
        fresh.download("digits-1.0.0.efpkg", tmp_path / "out2")
    assert not (tmp_path / "out2" / "digits-1.0.0.efpkg").exists()


def test_the_bucket_lock_lets_one_writer_in(s3_env: S3Repo) -> None:
    first = S3Storage(s3_env.bucket, "locked", lock_wait_s=0.5)
    second = S3Storage(s3_env.bucket, "locked", lock_wait_s=0.5)
    taker = S3Storage(s3_env.bucket, "locked", stale_after_s=0.0, lock_wait_s=5)
    with first.lock():
        with pytest.raises(RepositoryError, match=r"locked by another writer \(.+:\d+\) for over 0.5 s"), second.lock():
            pass
        # a lock left by a writer that died is taken over once it is old enough (here: at once)
        with taker.lock(), pytest.raises(RepositoryError), second.lock():
            pass
    # each release deletes only the lock object it wrote (a conditional DELETE): none is left
    assert "locked/.lock" not in _objects(s3_env)
    with second.lock():
        pass


def test_the_server_needs_a_keys_folder_and_a_public_url(s3_env: S3Repo, tmp_path: Path) -> None:
    from edgefleet.config import ServerSettings
    from edgefleet.controlplane.app import create_app

    db = f"sqlite:///{tmp_path / 'cp.db'}"
    with pytest.raises(UsageError, match="--repository-url"):
        create_app(ServerSettings(db=db, repo=s3_env.url, repo_keys=tmp_path / "keys"))
    with pytest.raises(UsageError, match="--repo-keys"):
        create_app(ServerSettings(db=db, repo=s3_env.url, repository_url=s3_env.public_url))


@pytest.fixture
def link(seaweed: SeaweedS3) -> Any:
    port = int(seaweed.endpoint.rsplit(":", 1)[1])
    cut = CuttingLink(("127.0.0.1", port))
    yield cut
    cut.close()


def test_a_real_agent_installs_from_the_bucket_through_a_cut_link(
    s3_env: S3Repo, link: CuttingLink, tmp_path: Path, pkgs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control plane signs uploads into the bucket and tells devices the bucket's URL (behind a link that cuts
    the first target download in the middle); the agent's TUF client and resumable download go there, never
    through the control plane."""
    public = f"{link.url}/{s3_env.bucket}/{s3_env.prefix}"
    monkeypatch.setenv("EDGEFLEET_REPO_S3", s3_env.url)
    monkeypatch.setenv("EDGEFLEET_REPO_KEYS", str(tmp_path / "cp" / "keys"))
    monkeypatch.setenv("EDGEFLEET_REPOSITORY_URL", public)
    cp = Fleet(tmp_path / "cp")
    agent = AgentProc(cp.url, cp.enrollment_token(), tmp_path / "dev", free_port())
    try:
        assert cp.store.repo.in_object_storage and not (tmp_path / "cp" / "repo" / "metadata").exists()
        r = cp.http.get("/tuf/metadata/timestamp.json")
        assert r.status_code == 404 and "object storage" in r.json()["error"]
        cp.publish(pkgs["1.0.0"])
        size = pkgs["1.0.0"].stat().st_size
        assert size > CHUNK + 4096, size
        target = next(o for o in _objects(s3_env) if o.endswith(".digits-1.0.0.efpkg"))
        # past the agent's first read of CHUNK bytes (what it has written to disk when the link drops), with room
        # for the answer's head, and well before the end
        link.cut_next(CHUNK + (size - CHUNK) // 2 + 1024)

        agent.start()
        ident = tmp_path / "dev" / "identity.json"
        agent.wait_until(ident.exists, what="enrollment")
        identity = json.loads(ident.read_text())
        assert identity["repository_url"] == public
        # The repository moved after this device enrolled: its identity still names the old place. The desired
        # state names the new one, and that is where the agent goes.
        agent.stop()
        ident.write_text(json.dumps(identity | {"repository_url": "http://127.0.0.1:9/moved-away"}))
        agent.start()
        cp.pin("1.0.0", probation_seconds=0.3, probation_requests=1000)
        assert cp.record()["desired_state"]["repository_url"] == public
        agent.wait_until(lambda: committed_version(agent.data_dir) == "1.0.0", timeout=120, what="v1 committed")
        assert agent.serving() == "1.0.0"
        assert state_of(agent.data_dir)["state"] == "committed"

        gets = [(line, rng) for line, rng in link.requests if line.startswith("GET ") and target.split("/")[-1] in line]
        assert link.cuts == 1 and len(gets) >= 2, link.requests
        assert gets[0][1] is None
        resumed = gets[-1][1]
        assert resumed is not None and resumed.startswith("bytes=") and int(resumed[6:].split("-")[0]) > 0, gets
        assert any("/metadata/timestamp.json" in line for line, _ in link.requests)  # TUF went there too
        assert not cp.faults.gets  # nothing was downloaded from the control plane
    finally:
        agent.stop()
        cp.close()


def test_a_large_target_goes_up_in_parts_and_reads_back_whole(s3_env: S3Repo, tmp_path: Path) -> None:
    """Over boto3's multipart threshold (8 MiB) a file is uploaded in parts; the object appears once complete."""
    big = tmp_path / "big.bin"
    data = bytes(range(256)) * (9 * 4096)  # 9 MiB
    big.write_bytes(data)
    storage = S3Storage(s3_env.bucket, s3_env.prefix)
    storage.write("targets/big.bin", big)
    assert storage.list("targets/") == ["targets/big.bin"]
    tail = httpx.get(f"{s3_env.public_url}/targets/big.bin", headers={"Range": f"bytes={len(data) - 1000}-"})
    assert tail.status_code == 206 and tail.content == data[-1000:]
    assert storage.read("targets/big.bin") == data
