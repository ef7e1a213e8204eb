"""`edgefleet package`, `inspect`, `keys`, `repo` and `publish` through the real entry point."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _package_helpers import assert_refused, listing, read_member, rewrite_member, run_cli
from edgefleet.data import save_calls
from edgefleet.package import open_package

Capsys = pytest.CaptureFixture[str]
EXE = Path(sys.executable).with_name("edgefleet")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, digits_calls: dict[str, np.ndarray], digits) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("cli-inputs")
    n = len(digits_calls["X"])
    save_calls(d / "samples.npz", {"X": digits_calls["X"][:16]})
    save_calls(d / "reference.npz", digits_calls, labels=digits.y_test[:n])
    (d / "io.yaml").write_text(
        "inputs:\n  - {name: X, dtype: float32, shape: [null, 64], value_range: [0, 16]}\n"
        "preprocessing:\n  - {op: scale, mul: 0.0625}\n"
        "postprocessing:\n  - {op: argmax, tensor: probabilities}\n"
    )
    (d / "lineage.json").write_text(json.dumps({"parent_sha256": "cd" * 32, "recipe": {"quantization": "dynamic"}}))
    (d / "metrics.json").write_text(json.dumps({"accuracy": 0.96, "latency_p95_ms": {"rpi4": 1.5}}))
    return {
        k: d / f"{k}.{ext}"
        for k, ext in (
            ("samples", "npz"),
            ("reference", "npz"),
            ("io", "yaml"),
            ("lineage", "json"),
            ("metrics", "json"),
        )
    }


def _package_args(mlp_path: Path, out: Path, inputs: dict[str, Path]) -> list[str]:
    return [
        "package",
        str(mlp_path),
        "-o",
        str(out),
        "--name",
        "digits",
        "--version",
        "2.0.0",
        "--samples",
        str(inputs["samples"]),
        "--reference",
        str(inputs["reference"]),
        "--tier",
        "rpi4",
        "--tier",
        "jetson",
        "--min-memory-mb",
        "128",
        "--min-runtime-version",
        "1.17",
        "--lineage-json",
        str(inputs["lineage"]),
        "--metrics-json",
        str(inputs["metrics"]),
        "--rtol",
        "1e-3",
        "--atol",
        "1e-4",
    ]


def test_package_then_inspect_table_and_json(
    tmp_path: Path, capsys: Capsys, mlp_path: Path, inputs: dict[str, Path]
) -> None:
    out = tmp_path / "digits.efpkg"
    code, stdout, err = run_cli(capsys, *_package_args(mlp_path, out, inputs))
    assert code == 0, err
    assert "wrote" in stdout
    p = open_package(out)
    m = p.manifest
    assert m.requirements.tiers == ["rpi4", "jetson"] and m.requirements.min_memory_mb == 128
    assert m.requirements.min_runtime_version == "1.17" and (m.golden.rtol, m.golden.atol) == (1e-3, 1e-4)
    assert m.lineage.recipe == {"quantization": "dynamic"} and m.metrics["latency_p95_ms"] == {"rpi4": 1.5}
    assert len(p.golden_inputs) == 16 and p.reference is not None
    p.verify_golden()

    code, table, err = run_cli(capsys, "inspect", out)
    assert code == 0, err
    for text in (
        "digits 2.0.0",
        "digits-2.0.0.efpkg",
        p.package_sha256[:20],
        "X: float32[?, 64]",
        "label: int64[?]",
        "tiers rpi4, jetson",
        "memory >= 128 MB",
        "16 calls",
        "encryption",
        "none",
    ):
        assert text in table, text

    code, js, err = run_cli(capsys, "inspect", out, "--json")
    assert code == 0, err
    assert json.loads(js) == json.loads(read_member(out, "manifest.json")) == m.model_dump(mode="json")

    code, verified, _ = run_cli(capsys, "inspect", out, "--verify")
    assert code == 0 and "golden vectors reproduce (16 calls)" in verified


def test_io_yaml_declares_raw_inputs_and_processing(
    tmp_path: Path, capsys: Capsys, mlp_path: Path, inputs: dict[str, Path], digits_calls: dict[str, np.ndarray]
) -> None:
    raw = tmp_path / "raw.npz"
    save_calls(raw, {"X": digits_calls["X"][:8] * 16})  # raw pixels 0..16; the package scales them
    out = tmp_path / "p.efpkg"
    code, _, err = run_cli(
        capsys,
        "package",
        mlp_path,
        "-o",
        out,
        "--name",
        "digits",
        "--version",
        "1.0.0",
        "--samples",
        raw,
        "--io",
        inputs["io"],
    )
    assert code == 0, err
    p = open_package(out)
    assert [s.op for s in p.manifest.preprocessing] == ["scale"]
    assert "probabilities_argmax" in p.golden_outputs
    model = p.load()
    got = model.run({"X": digits_calls["X"][0] * 16})
    assert got["probabilities_argmax"][0] == got["label"][0]


@pytest.mark.process
def test_rebuild_in_another_process_later_with_other_tz_and_umask_is_identical(
    tmp_path: Path, capsys: Capsys, mlp_path: Path, inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    monkeypatch.setenv("TZ", "UTC")
    first = tmp_path / "a" / "digits.efpkg"
    code, _, err = run_cli(capsys, *_package_args(mlp_path, first, inputs))
    assert code == 0, err
    time.sleep(3.1)
    second = tmp_path / "b" / "digits.efpkg"
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"} | {"TZ": "Pacific/Chatham"}
    script = f"umask 077 && exec {EXE} " + " ".join(f"'{a}'" for a in _package_args(mlp_path, second, inputs))
    proc = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(first.read_bytes()).hexdigest() == hashlib.sha256(second.read_bytes()).hexdigest()


def test_encrypt_for_a_device_key_file(tmp_path: Path, capsys: Capsys, mlp_path: Path) -> None:
    code, stdout, err = run_cli(capsys, "keys", "device", "-o", tmp_path / "dev", "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert stat.S_IMODE(Path(info["private_key"]).stat().st_mode) == 0o600
    out = tmp_path / "e.efpkg"
    code, _, err = run_cli(
        capsys,
        "package",
        mlp_path,
        "-o",
        out,
        "--name",
        "d",
        "--version",
        "1.0.0",
        "--encrypt-for",
        tmp_path / "dev" / "device.pub",
    )
    assert code == 0, err
    code, table, _ = run_cli(capsys, "inspect", out)
    assert code == 0 and f"AES-256-GCM for key(s) {info['key_id']}" in table
    code, _, err = run_cli(capsys, "inspect", out, "--verify")
    assert_refused(code, err, match="give the device key")
    code, _, err = run_cli(capsys, "inspect", out, "--verify", "--device-key", info["private_key"])
    assert code == 0, err
    code, _, err = run_cli(capsys, "keys", "device", "-o", tmp_path / "dev")
    assert_refused(code, err, match="already exists")


def test_inspect_refuses_corrupt_tar_and_broken_manifest(tmp_path: Path, capsys: Capsys, mlp_path: Path) -> None:
    pkg = tmp_path / "p.efpkg"
    assert run_cli(capsys, "package", mlp_path, "-o", pkg, "--name", "d", "--version", "1.0.0")[0] == 0
    before = listing(tmp_path)
    cut = tmp_path / "cut.efpkg"
    cut.write_bytes(pkg.read_bytes()[:3000])
    code, _, err = run_cli(capsys, "inspect", cut)
    assert_refused(code, err, match="not a valid .efpkg")
    manifest = json.loads(read_member(pkg, "manifest.json"))
    manifest["io"]["inputs"][0]["dtype"] = "complex128"
    bad = rewrite_member(pkg, tmp_path / "bad.efpkg", "manifest.json", json.dumps(manifest).encode())
    code, _, err = run_cli(capsys, "inspect", bad)
    assert_refused(code, err, match="breaks the schema at io.inputs.0.dtype")
    code, out, err = run_cli(capsys, "inspect", bad, "--json")  # with --json the error is JSON on stdout
    assert code == 2 and err == "" and "breaks the schema at io.inputs.0.dtype" in json.loads(out)["error"]
    assert listing(tmp_path) == sorted([*before, "cut.efpkg", "bad.efpkg"])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--version", "1.0"], "must be a semantic version"),
        (["--version", "1.0.0", "--samples", "missing.npz"], "does not exist"),
        (["--version", "1.0.0", "--encrypt-for", "abc"], "neither a 64-hex-character X25519 public key"),
        (["--version", "1.0.0", "--min-runtime-version", "new"], "min_runtime_version"),
    ],
)
def test_package_user_mistakes_are_one_line_exit_2(
    tmp_path: Path, capsys: Capsys, mlp_path: Path, args: list[str], match: str
) -> None:
    code, _, err = run_cli(capsys, "package", mlp_path, "-o", tmp_path / "x.efpkg", "--name", "d", *args)
    assert_refused(code, err, match=match)
    assert not (tmp_path / "x.efpkg").exists()


def test_wrong_sample_dtype_names_the_input(tmp_path: Path, capsys: Capsys, mlp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    save_calls(bad, {"X": np.zeros((4, 1, 64), np.float64)})
    code, _, err = run_cli(
        capsys, "package", mlp_path, "-o", tmp_path / "x.efpkg", "--name", "d", "--version", "1.0.0", "--samples", bad
    )
    assert_refused(code, err, match="input 'X' has dtype float64, expected X: float32[?, 64]")


def test_repo_commands(tmp_path: Path, capsys: Capsys, mlp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    monkeypatch.setenv("EDGEFLEET_REPO_PASSPHRASE", "s3cret")
    code, out, err = run_cli(
        capsys,
        "repo",
        "init",
        repo,
        "--root-keys",
        "3",
        "--root-threshold",
        "2",
        "--expiry",
        "timestamp=6h",
        "--expiry",
        "snapshot=2d",
    )
    assert code == 0, err
    assert "timestamp" in out and "6 h" in out
    assert all(b"ENCRYPTED" in k.read_bytes() for k in (repo / "keys").iterdir())
    pkg = tmp_path / "p.efpkg"
    assert run_cli(capsys, "package", mlp_path, "-o", pkg, "--name", "d", "--version", "1.0.0")[0] == 0
    code, out, err = run_cli(capsys, "publish", pkg, "--repo", repo, "--json")
    assert code == 0, err
    assert json.loads(out)["name"] == "d-1.0.0.efpkg"
    code, out, _ = run_cli(capsys, "repo", "status", repo, "--json")
    st = json.loads(out)
    assert [r["version"] for r in st["roles"]] == [1, 2, 2, 2] and st["targets"] == 1 and st["warnings"] == []
    code, out, _ = run_cli(capsys, "repo", "refresh", repo)
    assert code == 0 and "nothing was close to expiring" in out
    code, out, _ = run_cli(capsys, "repo", "refresh", repo, "--force", "--json")
    assert json.loads(out)["resigned"] == ["root", "targets", "snapshot", "timestamp"]
    code, out, _ = run_cli(capsys, "keys", "list", "--repo", repo, "--json")
    assert sorted(r["role"] for r in json.loads(out)) == ["root", "root", "root", "snapshot", "targets", "timestamp"]
    code, out, _ = run_cli(capsys, "repo", "targets", repo)
    assert "d-1.0.0.efpkg" in out
    monkeypatch.setenv("EDGEFLEET_REPO_PASSPHRASE", "wrong")
    assert run_cli(capsys, "publish", pkg, "--repo", repo)[0] == 0  # already there: nothing to sign
    pkg2 = tmp_path / "p2.efpkg"
    assert run_cli(capsys, "package", mlp_path, "-o", pkg2, "--name", "d", "--version", "1.0.1")[0] == 0
    code, _, err = run_cli(capsys, "publish", pkg2, "--repo", repo)
    assert_refused(code, err, match="wrong passphrase")
    code, _, err = run_cli(capsys, "publish", pkg)
    assert_refused(code, err, match="exactly one of --repo")
    code, _, err = run_cli(capsys, "repo", "init", tmp_path / "r2", "--expiry", "forever=1d")
    assert_refused(code, err, match="ROLE=DURATION")
    code, _, err = run_cli(capsys, "repo", "status", tmp_path / "nowhere")
    assert_refused(code, err, match="not an edgefleet repository")


def test_status_warns_before_expiry(tmp_path: Path, capsys: Capsys) -> None:
    from datetime import UTC, datetime, timedelta

    from edgefleet.repository import Repository

    repo = Repository.init(tmp_path / "r")
    repo.resign("timestamp", expires=datetime.now(UTC) + timedelta(hours=2))
    code, out, err = run_cli(capsys, "repo", "status", repo.path)
    assert code == 0
    assert "expires soon" in out
    assert "warning: timestamp expires on" in err and "under 25 % of its 24 h period" in err


def test_an_unexpected_error_is_one_line_and_the_traceback_is_on_request(
    monkeypatch: pytest.MonkeyPatch, capsys: Capsys
) -> None:
    import edgefleet.cli.main as cli_main

    def broken(**_: object) -> None:
        raise ValueError("something internal\nsecond line")

    monkeypatch.setattr(cli_main, "_app", broken)
    monkeypatch.setattr(cli_main, "register_groups", lambda argv=None: None)
    monkeypatch.delenv("EDGEFLEET_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli_main.run()
    err = capsys.readouterr().err
    assert exit_.value.code == 70
    assert "internal error: ValueError: something internal, please report" in err and "Traceback" not in err
    assert "second line" not in err
    monkeypatch.setenv("EDGEFLEET_DEBUG", "1")
    with pytest.raises(ValueError):
        cli_main.run()


# ------------------------------------------------------------------------------------------------ fleet keys


def _enroll_with_key(cp: Any, tmp: Path, name: str, tier: str, group: str | None) -> tuple[str, Path, str]:
    """A device enrolled through the real API with a real key pair: (device id, private key path, key id)."""
    from edgefleet.package import generate_device_keypair

    pair = generate_device_keypair(tmp / name)
    tok = cp.api("POST", "/api/v1/enrollment-tokens", json={"tier": tier, "group": group})["token"]
    r = cp.http.post(
        "/api/v1/enroll",
        json={
            "token": tok,
            "hardware": {"arch": "x86_64", "cpu_count": 2, "memory_mb": 1024},
            "runtime_version": "1.32.0",
            "agent_version": "0.1.0",
            "public_key": pair.public_key_hex,
        },
    )
    assert r.status_code == 200, r.text
    return str(r.json()["device_id"]), pair.private_key_path, pair.key_id


def test_encrypt_for_a_group_uses_the_control_planes_keys(
    cp: Any, tmp_path: Path, capsys: Capsys, mlp_path: Path
) -> None:
    from edgefleet.errors import DecryptionError

    for g in ("enc", "other"):
        cp.api("PUT", f"/api/v1/groups/{g}", json={})
    a = _enroll_with_key(cp, tmp_path, "a", "tier-a", "enc")
    b = _enroll_with_key(cp, tmp_path, "b", "tier-b", "enc")
    outside = _enroll_with_key(cp, tmp_path, "o", "tier-a", "other")
    gone = _enroll_with_key(cp, tmp_path, "r", "tier-a", "enc")
    cp.api("POST", f"/api/v1/devices/{gone[0]}/revoke")
    viewer = cp.token("viewer")
    remote = ["--server", cp.url, "--api-token", viewer]

    # the key export: a viewer may read it, "keys" is not taken for a device id, revoked devices are left out
    code, out, err = run_cli(capsys, "devices", "keys", "--group", "enc", "--json", *remote)
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["device_id"], r["key_id"], r["group"]) for r in rows] == [(a[0], a[2], "enc"), (b[0], b[2], "enc")]
    code, out, err = run_cli(capsys, "devices", "keys", "--group", "enc", "--tier", "tier-b", "--json", *remote)
    assert code == 0 and [r["device_id"] for r in json.loads(out)] == [b[0]], err
    code, out, err = run_cli(capsys, "devices", "keys", "--tier", "tier-a", *remote)
    assert code == 0 and a[0] in out and outside[0] in out and gone[0] not in out, err
    code, out, err = run_cli(capsys, "devices", "keys", "--group", "nobody", *remote)
    assert code == 0 and "no active device in group nobody" in out, err
    assert cp.http.get("/api/v1/devices/keys").status_code == 401  # not public

    pkg = tmp_path / "enc.efpkg"
    args: list[str | Path] = ["package", mlp_path, "-o", pkg, "--name", "d", "--version", "1.0.0"]
    code, out, err = run_cli(capsys, *args, "--encrypt-for-group", "enc", *remote)
    assert code == 0, err
    assert f"encrypted for 2 device(s) of group enc: {a[0]}, {b[0]}" in out
    opened = open_package(pkg)
    assert opened.manifest.encryption is not None
    assert sorted(opened.manifest.encryption.key_ids) == sorted([a[2], b[2]])
    for _, key, _ in (a, b):  # every member of the group opens it and its model reproduces the golden vectors
        open_package(pkg, device_key=key).verify_golden()
    with pytest.raises(DecryptionError, match="not for this device's key"):
        open_package(pkg, device_key=outside[1])

    code, out, err = run_cli(capsys, *args, "--encrypt-for-tier", "tier-b", "--json", *remote)
    assert code == 0, err
    assert json.loads(out)["encrypted_for_devices"] == [{"device_id": b[0], "key_id": b[2]}]

    pkg.unlink()
    code, _, err = run_cli(capsys, *args, "--encrypt-for-group", "nobody", *remote)
    assert_refused(code, err, match="group nobody has no enrolled, active device")
    assert not pkg.exists()
    code, _, err = run_cli(capsys, *args, "--encrypt-for-group", "enc", "--server", cp.url, "--api-token", "nope")
    assert_refused(code, err, match="invalid or revoked API token", exit_code=4)
    assert not pkg.exists()
