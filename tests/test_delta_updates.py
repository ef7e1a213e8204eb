"""Delta updates: the next package as a zstd patch of the one a device has installed.

The patch itself (``edgefleet.package.delta``) and the choice of the versions a delta starts from are pure and
tested here directly; publishing signs deltas in as TUF targets of their own. Against the real control plane
(``tests/_fleet_support.py``), a real ``edgefleet agent`` updates from a delta and downloads a fraction of the
package; a delta corrupted in the repository (TUF refuses its hash) and a delta signed correctly that rebuilds the
wrong bytes (the full target's hash refuses the result) each fall back to the full package, and the device ends on
the version it was asked for."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from _fleet_support import AgentProc, Fleet, committed_version, make_packages, state_of
from _package_helpers import run_cli
from conftest import free_port, starts_processes
from edgefleet.errors import PackageError
from edgefleet.package.delta import apply_delta, delta_custom, delta_target_name, make_delta
from edgefleet.repository import Repository, TufClient
from edgefleet.repository.repo import delta_bases
from edgefleet.repository.status import TargetInfo

VERSIONS = ["1.0.0", "2.0.0", "3.0.0"]


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory: pytest.TempPathFactory, mlp_path: Path, digits: Any) -> dict[str, Path]:
    return make_packages(mlp_path, digits.x_test, tmp_path_factory.mktemp("pkgs"), VERSIONS)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ---------------------------------------------------------------- the patch


def test_a_delta_rebuilds_the_next_package_exactly_and_is_small(pkgs: dict[str, Path]) -> None:
    old, new = pkgs["1.0.0"].read_bytes(), pkgs["2.0.0"].read_bytes()
    delta = make_delta(old, new)
    assert apply_delta(old, delta, expected_length=len(new)) == new
    # the same weights, another manifest: the delta is a small fraction of the package
    assert len(delta) < len(new) / 10, (len(delta), len(new))
    assert apply_delta(b"", make_delta(b"", new), expected_length=len(new)) == new  # no base: plain compression


def test_a_delta_that_does_not_fit_is_refused_never_misapplied(pkgs: dict[str, Path]) -> None:
    old, new = pkgs["1.0.0"].read_bytes(), pkgs["2.0.0"].read_bytes()
    # Another base that differs in every byte. (Another package of the same model would not do: it differs from
    # ``old`` only in a few manifest bytes, and where the delta never copies those it rebuilds ``new`` exactly, which
    # is right, not a misapplication; a fresh-clone run met that.)
    other = bytes(b ^ 0x5A for b in old)
    delta = make_delta(old, new)
    with pytest.raises(PackageError, match="not the signed"):
        apply_delta(old, delta, expected_length=len(new) + 1)  # the frame records the size: checked before decoding
    with pytest.raises(PackageError, match="not a zstd frame"):
        apply_delta(old, b"not a delta at all", expected_length=len(new))
    with pytest.raises(PackageError, match="does not apply"):
        apply_delta(old, delta[: len(delta) // 2], expected_length=len(new))  # truncated
    flipped = bytearray(delta)
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(PackageError, match="does not apply"):
        apply_delta(old, bytes(flipped), expected_length=len(new))
    with pytest.raises(PackageError, match="does not apply"):
        # another base: the frame's checksum of what it rebuilt does not match
        apply_delta(other, delta, expected_length=len(new))


def _t(name: str, version: str, created: str, *, model: str = "digits", encrypted: bool = False) -> TargetInfo:
    custom = {"name": model, "version": version, "created": created, "encrypted": encrypted}
    return TargetInfo(name=name, length=1, sha256="0" * 64, custom=custom, path=f"{'0' * 64}.{name}")


def test_deltas_start_from_the_newest_other_unencrypted_versions_of_the_model() -> None:
    listed = [
        _t("digits-1.0.0.efpkg", "1.0.0", "2026-01-01T00:00:00+00:00"),
        _t("digits-1.1.0.efpkg", "1.1.0", "2026-03-01T00:00:00+00:00"),
        _t("digits-1.2.0.efpkg", "1.2.0", "2026-02-01T00:00:00+00:00"),
        _t("digits-1.3.0.efpkg", "1.3.0", "2026-04-01T00:00:00+00:00", encrypted=True),
        _t("other-9.0.0.efpkg", "9.0.0", "2026-05-01T00:00:00+00:00", model="other"),
        TargetInfo("digits-1.0.0-to-1.1.0.efdelta", 1, "0" * 64, {"delta": {}}, "x"),
        _t("digits-2.0.0.efpkg", "2.0.0", "2026-06-01T00:00:00+00:00"),
    ]
    names = [t.name for t in delta_bases(listed, "digits", "2.0.0", 2)]
    assert names == ["digits-1.1.0.efpkg", "digits-1.2.0.efpkg"]
    assert [t.name for t in delta_bases(listed, "digits", "2.0.0", 10)] == [
        "digits-1.1.0.efpkg",
        "digits-1.2.0.efpkg",
        "digits-1.0.0.efpkg",
    ]
    assert delta_bases(listed, "digits", "2.0.0", 0) == []
    assert delta_bases(listed, "nothing", "1.0.0", 3) == []


# ---------------------------------------------------------------- publishing


def test_publish_signs_deltas_in_and_a_client_finds_the_one_for_its_package(
    tmp_path: Path, pkgs: dict[str, Path]
) -> None:
    repo = Repository.init(tmp_path / "repo")
    repo.publish(pkgs["1.0.0"], deltas=0)
    repo.publish(pkgs["2.0.0"], deltas=3)
    info = repo.publish(pkgs["3.0.0"], deltas=1)  # only from the newest other version
    names = {t.name for t in repo.targets()}
    assert names == {
        "digits-1.0.0.efpkg",
        "digits-2.0.0.efpkg",
        "digits-3.0.0.efpkg",
        "digits-1.0.0-to-2.0.0.efdelta",
        "digits-2.0.0-to-3.0.0.efdelta",
    }
    # publishing again is idempotent and adds what a larger count asks for
    assert {d.name for d in repo.publish_deltas(info, 3)} == {
        "digits-2.0.0-to-3.0.0.efdelta",
        "digits-1.0.0-to-3.0.0.efdelta",
    }
    delta = next(t for t in repo.targets() if t.name == "digits-2.0.0-to-3.0.0.efdelta")
    assert delta.custom["delta"] == {
        "name": "digits",
        "from_version": "2.0.0",
        "to_version": "3.0.0",
        "base_sha256": _sha(pkgs["2.0.0"]),
        "target": "digits-3.0.0.efpkg",
        "target_sha256": _sha(pkgs["3.0.0"]),
        "format": "zstd-patch",
    }
    assert delta.length < info.length / 10

    client = TufClient(tmp_path / "cache", str(tmp_path / "repo"), repo.root_json())
    found = client.delta_for("digits-3.0.0.efpkg", _sha(pkgs["2.0.0"]))
    assert found is not None and found.name == delta.name
    assert client.delta_for("digits-3.0.0.efpkg", "f" * 64) is None  # a device with some other package
    got = client.download(found.name, tmp_path / "out")  # verified by TUF like any target
    rebuilt = apply_delta(pkgs["2.0.0"].read_bytes(), got.read_bytes(), expected_length=info.length)
    (tmp_path / "rebuilt").write_bytes(rebuilt)
    client.verify_file("digits-3.0.0.efpkg", tmp_path / "rebuilt")  # the FULL target's signed hash


def test_publish_cli_option_and_json(tmp_path: Path, pkgs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    Repository.init(tmp_path / "repo")
    repo: list[str | Path] = ["--repo", tmp_path / "repo"]
    code, out, err = run_cli(capsys, "publish", pkgs["1.0.0"], *repo, "--json")
    assert code == 0 and json.loads(out)["deltas"] == [], err
    code, out, err = run_cli(capsys, "publish", pkgs["2.0.0"], *repo, "--json")
    assert code == 0, err
    assert [d["name"] for d in json.loads(out)["deltas"]] == ["digits-1.0.0-to-2.0.0.efdelta"]
    code, out, err = run_cli(capsys, "publish", pkgs["3.0.0"], *repo)
    assert code == 0 and "delta digits-2.0.0-to-3.0.0.efdelta" in out and "of the package" in out, out + err
    code, out, err = run_cli(capsys, "repo", "targets", tmp_path / "repo")
    assert code == 0 and "delta to digits-3.0.0.efpkg" in out, out + err
    code, out, err = run_cli(capsys, "publish", pkgs["3.0.0"], *repo, "--deltas", "-1")
    assert code == 2 and "Traceback" not in out + err, out + err


# ---------------------------------------------------------------- a real agent


@pytest.fixture
@starts_processes
def cp(tmp_path: Path) -> Any:
    f = Fleet(tmp_path / "cp")
    f.store.repo.deltas = 3  # the server's default (repo_deltas); the shared test world turns it off
    yield f
    f.close()


def _verified(cp: Fleet, version: str) -> list[dict[str, Any]]:
    from edgefleet.controlplane.db import UpdateEventRow

    q = select(UpdateEventRow).where(UpdateEventRow.kind == "verified", UpdateEventRow.version == version)
    with cp.store.db.session() as s:
        return [
            {"bytes": e.bytes_downloaded, "delta_from": e.delta_from, "reason": e.reason}
            for e in s.scalars(q.order_by(UpdateEventRow.id))
        ]


def _sent(cp: Fleet, suffix: str) -> tuple[int, int]:
    """(GETs, bytes) of the targets whose name ends with ``suffix``, as the edge counted them."""
    names = [n for n in cp.faults.gets if n.endswith(suffix)]
    return sum(cp.faults.gets[n] for n in names), sum(cp.faults.bytes[n] for n in names)


def _agent(cp: Fleet, tmp_path: Path) -> AgentProc:
    agent = AgentProc(cp.url, cp.enrollment_token(), tmp_path / "dev", free_port())
    agent.start()
    agent.wait_until(lambda: cp.device_ids(), what="enrollment")
    return agent


def test_an_agent_updates_from_a_delta_and_downloads_a_fraction(
    cp: Fleet, tmp_path: Path, pkgs: dict[str, Path]
) -> None:
    cp.publish(pkgs["1.0.0"], pkgs["2.0.0"])
    delta = next((cp.settings.repo / "targets").glob("*.digits-1.0.0-to-2.0.0.efdelta"))
    full = pkgs["2.0.0"].stat().st_size
    agent = _agent(cp, tmp_path)
    try:
        cp.pin("1.0.0", probation_seconds=0.3, probation_requests=1000)
        agent.wait_until(lambda: committed_version(agent.data_dir) == "1.0.0", what="v1 committed")
        rid = cp.rollout("2.0.0")
        agent.wait_until(lambda: committed_version(agent.data_dir) == "2.0.0", what="v2 committed")
        assert agent.serving() == "2.0.0"
        assert _sent(cp, "digits-2.0.0.efpkg") == (0, 0)  # the full package never came down
        assert _sent(cp, ".efdelta") == (1, delta.stat().st_size)
        assert delta.stat().st_size < full / 10
        agent.wait_until(lambda: _verified(cp, "2.0.0"), what="the verified event reported")
        assert _verified(cp, "2.0.0") == [{"bytes": delta.stat().st_size, "delta_from": "1.0.0", "reason": None}]
        first = _verified(cp, "1.0.0")
        assert first == [{"bytes": pkgs["1.0.0"].stat().st_size, "delta_from": None, "reason": None}]
        page = cp.http.get(f"/rollouts/{rid}", headers=cp.h()).text
        assert "delta from 1.0.0" in page and f"{delta.stat().st_size:,}" in page and f"{full:,}" in page
    finally:
        agent.stop()


def _wrong_delta(cp: Fleet, base: Path, new: Path) -> None:
    """A test-only publisher: a delta whose TUF entry is right (signed like any target, its hash that of its bytes)
    but which rebuilds the wrong package: ``new`` with one byte flipped, of the same length."""
    wrong = bytearray(new.read_bytes())
    wrong[len(wrong) // 2] ^= 0xFF
    name = delta_target_name("digits", "2.0.0", "3.0.0")
    custom = delta_custom(
        name="digits",
        from_version="2.0.0",
        to_version="3.0.0",
        base_sha256=_sha(base),
        target="digits-3.0.0.efpkg",
        target_sha256=_sha(new),
    )
    Repository(cp.settings.repo).add_target(name, make_delta(base.read_bytes(), bytes(wrong)), custom)


def test_a_bad_delta_falls_back_to_the_full_package(cp: Fleet, tmp_path: Path, pkgs: dict[str, Path]) -> None:
    cp.publish(pkgs["1.0.0"], pkgs["2.0.0"])
    cp.store.repo.deltas = 0
    cp.publish(pkgs["3.0.0"])
    _wrong_delta(cp, pkgs["2.0.0"], pkgs["3.0.0"])
    # the repository's copy of the 1.0.0 → 2.0.0 delta altered after signing: TUF refuses its hash
    stored = next((cp.settings.repo / "targets").glob("*.digits-1.0.0-to-2.0.0.efdelta"))
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    agent = _agent(cp, tmp_path)
    try:
        cp.pin("1.0.0", probation_seconds=0.3, probation_requests=1000)
        agent.wait_until(lambda: committed_version(agent.data_dir) == "1.0.0", what="v1 committed")

        cp.rollout("2.0.0")
        agent.wait_until(lambda: committed_version(agent.data_dir) == "2.0.0", what="v2 committed")
        assert agent.serving() == "2.0.0" and state_of(agent.data_dir)["committed"]["version"] == "2.0.0"
        assert _sent(cp, "digits-1.0.0-to-2.0.0.efdelta")[0] == 1
        assert _sent(cp, "digits-2.0.0.efpkg") == (1, pkgs["2.0.0"].stat().st_size)  # once: no retry was needed
        agent.wait_until(lambda: _verified(cp, "2.0.0"), what="the verified event reported")
        [ev] = _verified(cp, "2.0.0")
        assert ev["delta_from"] is None
        assert ev["bytes"] == pkgs["2.0.0"].stat().st_size + stored.stat().st_size  # both count
        assert "delta from 1.0.0 not used" in ev["reason"] and "signed" in ev["reason"], ev["reason"]

        cp.rollout("3.0.0")
        agent.wait_until(lambda: committed_version(agent.data_dir) == "3.0.0", what="v3 committed")
        assert agent.serving() == "3.0.0"
        assert _sent(cp, "digits-2.0.0-to-3.0.0.efdelta")[0] == 1
        assert _sent(cp, "digits-3.0.0.efpkg") == (1, pkgs["3.0.0"].stat().st_size)
        agent.wait_until(lambda: _verified(cp, "3.0.0"), what="the verified event reported")
        [ev] = _verified(cp, "3.0.0")
        assert ev["delta_from"] is None and "delta from 2.0.0 not used" in ev["reason"], ev
        assert "digits-3.0.0.efpkg" in ev["reason"]  # the rebuilt bytes failed the FULL target's hash
        kinds = [k for k, v, _ in cp.events() if v in ("2.0.0", "3.0.0")]
        assert "refused" not in kinds and kinds.count("committed") == 2
    finally:
        agent.stop()
