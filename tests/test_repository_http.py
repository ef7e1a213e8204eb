"""End to end over a real HTTP server on 127.0.0.1: round trips, and every attack refused through `edgefleet fetch`.

The attacks change the bytes the server serves (the repository folder on disk); the client is the real
`edgefleet fetch` entry point. Each refusal: exit 2, one line on stderr, the output folder's listing unchanged.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

import edgefleet
from _package_helpers import assert_refused, listing, run_cli, serve_repository
from edgefleet.data import CallData
from edgefleet.package import build_package, generate_device_keypair, open_package
from edgefleet.repository import Repository

Capsys = pytest.CaptureFixture[str]


@pytest.fixture(scope="module")
def packages(
    tmp_path_factory: pytest.TempPathFactory, mlp_path: Path, digits_calls: dict[str, np.ndarray]
) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("http-pkgs")
    samples = CallData({"X": digits_calls["X"][:10]})
    return {
        v: build_package(mlp_path, d / f"{v}.efpkg", name="digits", version=v, sample_inputs=samples)
        for v in ("1.0.0", "1.1.0", "1.2.0")
    }


class Site:
    """A repository, the root a client trusts, a client cache, and an output folder with something in it."""

    def __init__(self, tmp: Path, url: str, repo: Repository) -> None:
        self.tmp, self.url, self.repo = tmp, url, repo
        self.root = tmp / "trusted-root.json"
        self.root.write_bytes(repo.root_json())
        self.cache = tmp / "client-cache"
        self.out = tmp / "out"
        self.out.mkdir(exist_ok=True)
        (self.out / "already-here.txt").write_text("keep me")

    def fetch(self, capsys: Capsys, version: str, *extra: str, name: str = "digits") -> tuple[int, str, str]:
        return run_cli(
            capsys,
            "fetch",
            name,
            version,
            "--repo",
            self.url,
            "--root",
            self.root,
            "-o",
            self.out,
            "--metadata-dir",
            self.cache,
            *extra,
        )

    def refused(self, capsys: Capsys, version: str, match: str, *extra: str, name: str = "digits") -> None:
        before = listing(self.out)
        code, _, err = self.fetch(capsys, version, *extra, name=name)
        assert_refused(code, err, match=match)
        assert listing(self.out) == before


@pytest.fixture
def site(tmp_path: Path, packages: dict[str, Path]) -> Iterator[Site]:
    repo = Repository.init(tmp_path / "repo", root_keys=3, root_threshold=2)
    repo.publish(packages["1.0.0"])
    with serve_repository(repo.path) as url:
        yield Site(tmp_path, url, repo)


@pytest.fixture(scope="module")
def silero_pkg(tmp_path_factory: pytest.TempPathFactory, silero_path: Path) -> Path:
    rng = np.random.default_rng(1)
    n = 6
    samples = CallData(
        {
            "input": rng.uniform(-0.3, 0.3, (n, 1, 512)).astype(np.float32),
            "state": np.zeros((n, 2, 1, 128), np.float32),
            "sr": np.full((n,), 16000, np.int64),
        }
    )
    out = tmp_path_factory.mktemp("silero") / "vad.efpkg"
    return build_package(silero_path, out, name="silero-vad", version="6.2.3", sample_inputs=samples)


@pytest.mark.parametrize("which", ["digits", "silero-vad"])
def test_round_trip_over_http_and_from_a_folder(
    site: Site, capsys: Capsys, packages: dict[str, Path], request: pytest.FixtureRequest, which: str
) -> None:
    pkg = packages["1.0.0"] if which == "digits" else request.getfixturevalue("silero_pkg")
    version = open_package(pkg).manifest.version
    site.repo.publish(pkg)
    code, out, err = site.fetch(capsys, version, name=which)
    assert code == 0, err
    got = site.out / f"{which}-{version}.efpkg"
    assert got.read_bytes() == pkg.read_bytes() and "fetched and verified" in out
    opened = open_package(got)
    opened.verify_golden(edgefleet.load(got))
    usb = site.tmp / "usb-stick"  # an air-gapped copy: metadata and targets only
    shutil.copytree(site.repo.path / "metadata", usb / "metadata")
    shutil.copytree(site.repo.path / "targets", usb / "targets")
    code, _, err = run_cli(
        capsys,
        "fetch",
        which,
        version,
        "--repo",
        usb,
        "--root",
        site.root,
        "-o",
        site.tmp / "out2",
        "--metadata-dir",
        site.tmp / "cache2",
    )
    assert code == 0, err
    from_usb = site.tmp / "out2" / f"{which}-{version}.efpkg"
    assert from_usb.read_bytes() == got.read_bytes()
    model = edgefleet.load(from_usb)
    expected = opened.golden_outputs
    for i in range(len(opened.golden_inputs)):
        out_i = model.run(opened.golden_inputs.feed(i))
        for name, want in expected.items():
            np.testing.assert_allclose(
                out_i[name], want[i], rtol=opened.manifest.golden.rtol, atol=opened.manifest.golden.atol
            )


def test_keys_are_not_served(site: Site) -> None:
    import urllib.error
    import urllib.request

    key = next(site.repo.keys_dir.iterdir()).name
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{site.url}/keys/{key}")


@pytest.mark.parametrize("how", ["flip", "append"])
def test_tampered_target_is_refused(site: Site, capsys: Capsys, how: str) -> None:
    info = site.repo.targets()[0]
    target = site.repo.targets_dir / info.path
    data = bytearray(target.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data += b"\0" * 512
    target.write_bytes(bytes(data))
    site.refused(capsys, "1.0.0", "does not match its signed length/hash")


def test_replayed_older_timestamp_is_refused(site: Site, capsys: Capsys, packages: dict[str, Path]) -> None:
    old = (site.repo.metadata_dir / "timestamp.json").read_bytes()
    site.repo.publish(packages["1.1.0"])
    assert site.fetch(capsys, "1.1.0")[0] == 0  # the client now trusts the newer timestamp
    (site.out / "digits-1.1.0.efpkg").unlink()
    (site.repo.metadata_dir / "timestamp.json").write_bytes(old)  # the attacker serves the old, validly signed one
    site.refused(capsys, "1.0.0", "rollback attack")


def test_replayed_older_snapshot_is_refused(site: Site, capsys: Capsys, packages: dict[str, Path]) -> None:
    assert site.fetch(capsys, "1.0.0")[0] == 0
    (site.out / "digits-1.0.0.efpkg").unlink()
    old = (site.repo.metadata_dir / "2.snapshot.json").read_bytes()
    site.repo.publish(packages["1.1.0"])
    (site.repo.metadata_dir / "3.snapshot.json").write_bytes(old)
    site.refused(capsys, "1.1.0", "rollback attack")


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_expired_metadata_is_refused(site: Site, capsys: Capsys, role: str) -> None:
    site.repo.resign(role, expires=datetime.now(UTC) - timedelta(minutes=1))
    site.refused(capsys, "1.0.0", "freeze attack")


def _sign_root_v2(site: Site, n_signers: int) -> None:
    md = Metadata.from_bytes(site.repo.root_json())
    md.signed.version += 1
    md.signatures.clear()
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    for keyid in md.signed.roles["root"].keyids[:n_signers]:
        pem = (site.repo.keys_dir / f"root-{keyid}.pem").read_bytes()
        # load_pem_private_key's type covers DH and DSA keys too, which CryptoSigner does not take: these are Ed25519
        md.sign(CryptoSigner(load_pem_private_key(pem, None), md.signed.keys[keyid]), append=True)  # type: ignore[arg-type]
    (site.repo.metadata_dir / "2.root.json").write_bytes(md.to_bytes(JSONSerializer(compact=False)))


def test_root_signed_below_threshold_is_refused(site: Site, capsys: Capsys) -> None:
    _sign_root_v2(site, 1)  # 1 of the 2 required signatures
    site.refused(capsys, "1.0.0", "without enough valid signatures")


def test_root_signed_at_threshold_is_accepted(site: Site, capsys: Capsys) -> None:
    _sign_root_v2(site, 2)
    code, _, err = site.fetch(capsys, "1.0.0")
    assert code == 0, err
    assert (site.cache / "root_history" / "2.root.json").is_file()


def test_package_encrypted_for_another_device_is_refused(site: Site, capsys: Capsys, mlp_path: Path) -> None:
    mine = generate_device_keypair(site.tmp / "mine")
    theirs = generate_device_keypair(site.tmp / "theirs")
    enc = build_package(
        mlp_path, site.tmp / "e.efpkg", name="secret", version="1.0.0", recipients=[theirs.public_key_hex]
    )
    site.repo.publish(enc)
    site.refused(
        capsys,
        "1.0.0",
        f"not for this device's key {mine.key_id}",
        "--device-key",
        str(mine.private_key_path),
        name="secret",
    )
    code, _, err = site.fetch(capsys, "1.0.0", "--device-key", str(theirs.private_key_path), name="secret")
    assert code == 0, err


def test_signed_corrupt_tar_and_broken_manifest_are_refused(
    site: Site, capsys: Capsys, packages: dict[str, Path]
) -> None:
    from _package_helpers import read_member, rewrite_member

    data = packages["1.0.0"].read_bytes()
    site.repo.add_target("corrupt-1.0.0.efpkg", data[: len(data) // 3], {"name": "corrupt"})
    site.refused(capsys, "1.0.0", "not a valid .efpkg", name="corrupt")
    manifest = read_member(packages["1.0.0"], "manifest.json").replace(b'"1.0.0"', b'"one"')
    bad = rewrite_member(packages["1.0.0"], site.tmp / "bad.efpkg", "manifest.json", manifest)
    site.repo.add_target("schema-1.0.0.efpkg", bad.read_bytes(), {"name": "schema"})
    site.refused(capsys, "1.0.0", "breaks the schema at version", name="schema")


def test_missing_package_and_unreachable_server(site: Site, capsys: Capsys) -> None:
    site.refused(capsys, "9.9.9", "digits-9.9.9.efpkg is not in the repository")
    site.url = "http://127.0.0.1:9"  # nothing listens on the discard port
    site.refused(capsys, "1.0.0", "download failed")


def test_root_rotation_two_of_three_clients_follow_the_chain(
    site: Site, capsys: Capsys, packages: dict[str, Path]
) -> None:
    assert site.fetch(capsys, "1.0.0")[0] == 0  # client A caches root v1
    old_root_keys = {p.name for p in site.repo.keys_dir.glob("root-*.pem")}
    code, _, err = run_cli(capsys, "repo", "rotate-key", site.repo.path, "root")  # all three root keys
    assert code == 0, err
    assert not old_root_keys & {p.name for p in site.repo.keys_dir.glob("root-*.pem")}
    key = Metadata.from_bytes(site.repo.root_json()).signed.roles["root"].keyids[0]
    assert run_cli(capsys, "repo", "rotate-key", site.repo.path, "root", "--key", key[:12])[0] == 0
    assert run_cli(capsys, "repo", "rotate-key", site.repo.path, "timestamp")[0] == 0
    site.repo.publish(packages["1.2.0"])
    root = Metadata.from_bytes(site.repo.root_json()).signed
    assert root.version == 4 and root.roles["root"].threshold == 2 and len(root.roles["root"].keyids) == 3
    # Client A (cache at root v1) and client B (fresh, holding only root v1) both walk 1 → 2 → 3 → 4.
    code, _, err = site.fetch(capsys, "1.2.0")
    assert code == 0, err
    assert sorted(p.name for p in (site.cache / "root_history").iterdir()) == [f"{v}.root.json" for v in (1, 2, 3, 4)]
    code, _, err = run_cli(
        capsys,
        "fetch",
        "digits",
        "1.2.0",
        "--repo",
        site.url,
        "--root",
        site.root,
        "-o",
        site.tmp / "b",
        "--metadata-dir",
        site.tmp / "cache-b",
    )
    assert code == 0, err
    # A root v5 signed only by the retired keys would not be accepted: the old keys are gone from the threshold.
    assert open_package(site.tmp / "b" / "digits-1.2.0.efpkg").manifest.version == "1.2.0"


@pytest.mark.process
def test_console_script_prints_one_line_and_exits_2(site: Site) -> None:
    """The installed `edgefleet` command itself, in a fresh process."""
    target = site.repo.targets_dir / site.repo.targets()[0].path
    target.write_bytes(target.read_bytes()[:-1] + b"!")
    before = listing(site.out)
    exe = Path(sys.executable).with_name("edgefleet")
    proc = subprocess.run(
        [
            str(exe),
            "fetch",
            "digits",
            "1.0.0",
            "--repo",
            site.url,
            "--root",
            str(site.root),
            "-o",
            str(site.out),
            "--metadata-dir",
            str(site.cache),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_refused(proc.returncode, proc.stderr, match="tampered")
    assert listing(site.out) == before
