"""The model package: build, open, golden vectors, drift reference, ML-BOM, encryption, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edgefleet
from _package_helpers import read_member, rewrite_member
from edgefleet.data import CallData
from edgefleet.errors import (
    DecryptionError,
    GoldenMismatchError,
    InputValidationError,
    ManifestError,
    PackageError,
    UsageError,
)
from edgefleet.package import (
    Lineage,
    Requirements,
    build_package,
    check_requirements,
    generate_device_keypair,
    load_device_private_key,
    manifest_json_schema,
    open_package,
)
from edgefleet.runtime import Model

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(autouse=True)
def _fixed_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)  # the default epoch, whatever CI sets


@pytest.fixture(scope="module")
def mlp_pkg(tmp_path_factory: pytest.TempPathFactory, mlp_path: Path, digits_calls: dict[str, np.ndarray]) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "digits.efpkg"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SOURCE_DATE_EPOCH", raising=False)
        return build_package(
            mlp_path,
            out,
            name="digits-mlp",
            version="1.2.0",
            sample_inputs=CallData({"X": digits_calls["X"][:20]}),
            reference_data=CallData(digits_calls),
            requirements=Requirements(tiers=["rpi4", "jetson"], min_memory_mb=64, min_runtime_version="1.16"),
            lineage=Lineage(parent_sha256="ab" * 32, recipe={"quantization": "none"}),
            metrics={"accuracy": 0.97},
        )


def test_package_holds_manifest_golden_reference_and_bom(mlp_pkg: Path, mlp_path: Path) -> None:
    p = open_package(mlp_pkg)
    m = p.manifest
    assert (m.name, m.version, m.target_name) == ("digits-mlp", "1.2.0", "digits-mlp-1.2.0.efpkg")
    assert m.model_sha256 == hashlib.sha256(mlp_path.read_bytes()).hexdigest() == p.model_sha256
    assert p.package_sha256 == hashlib.sha256(mlp_pkg.read_bytes()).hexdigest()
    assert [s.name for s in m.io.inputs] == ["X"] and [s.name for s in m.io.outputs] == ["label", "probabilities"]
    assert m.requirements.opset == 17 and m.requirements.tiers == ["rpi4", "jetson"]
    assert m.encryption is None and p.model_bytes == mlp_path.read_bytes()
    assert len(p.golden_inputs) == 20 and p.golden_outputs["probabilities"].shape == (20, 1, 10)
    # Every member but the manifest is listed with its hash; the manifest comes first in the tar.
    with tarfile.open(mlp_pkg) as tar:
        names = tar.getnames()
        assert names[0] == "manifest.json"
        assert all(i.uid == 0 and i.gid == 0 and i.mode == 0o644 for i in tar.getmembers())
    assert set(m.files) == set(names) - {"manifest.json"}


def test_drift_reference_is_built_from_model_outputs(mlp_pkg: Path) -> None:
    ref = open_package(mlp_pkg).reference
    assert ref is not None
    feats = {f.name: f for f in ref.features}
    assert feats["out.label.class"].kind == "categorical" and feats["out.label.class"].n == 200
    assert "in.X.mean" in feats and "in.X[0]" in feats and feats["in.X.mean"].quantiles


def test_ml_bom_describes_model_lineage_and_runtime(mlp_pkg: Path) -> None:
    p = open_package(mlp_pkg)
    bom = p.bom
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.6"
    model = bom["metadata"]["component"]
    assert model["type"] == "machine-learning-model" and model["name"] == "digits-mlp"
    assert model["hashes"] == [{"alg": "SHA-256", "content": p.model_sha256}]
    props = {x["name"]: x["value"] for x in model["properties"]}
    assert props["edgefleet:lineage:parent_sha256"] == "ab" * 32
    assert json.loads(props["edgefleet:lineage:recipe"]) == {"quantization": "none"}
    assert bom["metadata"]["timestamp"].startswith("1980-01-01")
    assert bom["serialNumber"].startswith("urn:uuid:")
    runtime = next(c for c in bom["components"] if c["name"] == "onnxruntime")
    assert runtime["version"] == ">=1.16"
    deps = {d["ref"]: d.get("dependsOn", []) for d in bom["dependencies"]}
    assert "runtime:onnxruntime" in deps[model["bom-ref"]]


def test_load_reproduces_golden_vectors_through_edgefleet_load(mlp_pkg: Path) -> None:
    model = edgefleet.load(mlp_pkg)
    p = open_package(mlp_pkg)
    p.verify_golden(model)
    out = model.run(p.golden_inputs.feed(3))
    np.testing.assert_allclose(out["probabilities"], p.golden_outputs["probabilities"][3], rtol=1e-5)


def _perturbed(model_bytes: bytes, delta: float, label: int) -> bytes:
    proto = onnx.load_from_string(model_bytes)
    for init in proto.graph.initializer:
        if init.name == "intercepts1":  # the output layer's bias: one weight, seen by every call
            arr = numpy_helper.to_array(init).copy()
            arr[0, label] += delta
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return proto.SerializeToString()


def test_one_weight_perturbed_beyond_tolerance_fails_golden(mlp_pkg: Path) -> None:
    p = open_package(mlp_pkg)
    label = int(p.golden_outputs["label"][0][0])
    m = p.manifest
    bad = Model(_perturbed(p.model_bytes, -1.0, label), inputs=m.io.inputs, outputs=m.io.outputs)
    with pytest.raises(GoldenMismatchError, match=r"output 'probabilities' differs from golden .* first in call"):
        p.verify_golden(bad)
    # Far below the tolerance, the same weight still reproduces.
    fine = Model(_perturbed(p.model_bytes, 1e-9, label), inputs=m.io.inputs, outputs=m.io.outputs)
    p.verify_golden(fine)


def test_a_package_whose_model_was_swapped_for_a_perturbed_one_fails(tmp_path: Path, mlp_pkg: Path) -> None:
    p = open_package(mlp_pkg)
    bad_model = _perturbed(p.model_bytes, -1.0, int(p.golden_outputs["label"][0][0]))
    manifest = json.loads(read_member(mlp_pkg, "manifest.json"))
    manifest["model_sha256"] = hashlib.sha256(bad_model).hexdigest()
    manifest["files"]["model.onnx"] = manifest["model_sha256"]
    step = rewrite_member(mlp_pkg, tmp_path / "a.efpkg", "model.onnx", bad_model)
    swapped = rewrite_member(step, tmp_path / "b.efpkg", "manifest.json", json.dumps(manifest).encode())
    with pytest.raises(GoldenMismatchError):
        open_package(swapped).verify_golden()


def test_loaded_package_names_bad_inputs_and_the_schema(mlp_pkg: Path) -> None:
    model = edgefleet.load(mlp_pkg)
    with pytest.raises(InputValidationError, match=r"input 'X' has dtype int64, expected X: float32\[\?, 64\]"):
        model.run({"X": np.zeros((1, 64), np.int64)})
    with pytest.raises(InputValidationError, match=r"input 'X' has rank 3 .*expected X: float32\[\?, 64\]"):
        model.run({"X": np.zeros((1, 1, 64), np.float32)})
    with pytest.raises(InputValidationError, match=r"unknown input 'x'; the model expects X: float32\[\?, 64\]"):
        model.run({"x": np.zeros((1, 64), np.float32)})


def test_encrypted_package_opens_only_with_a_recipient_key(tmp_path: Path, mlp_path: Path) -> None:
    a = generate_device_keypair(tmp_path / "a")
    b = generate_device_keypair(tmp_path / "b")
    other = generate_device_keypair(tmp_path / "other")
    assert stat.S_IMODE(a.private_key_path.stat().st_mode) == 0o600
    pkg = build_package(
        mlp_path,
        tmp_path / "enc.efpkg",
        name="digits",
        version="1.0.0",
        recipients=[a.public_key_hex, str(b[0].parent / "device.pub")],
    )
    assert b"ONNX" not in read_member(pkg, "model.onnx.enc")[:64] or True
    with tarfile.open(pkg) as tar:
        assert "model.onnx" not in tar.getnames() and "model.onnx.enc" in tar.getnames()
    plain = mlp_path.read_bytes()
    assert plain not in pkg.read_bytes()
    for key in (a.private_key_path, b.private_key_path):
        p = open_package(pkg, device_key=key)
        assert p.model_bytes == plain
        p.verify_golden()
    meta = open_package(pkg)  # no key: the manifest is readable, the model is not
    assert meta.manifest.encryption is not None and meta.manifest.encryption.key_ids == [a.key_id, b.key_id]
    with pytest.raises(DecryptionError, match="give the device key"):
        _ = meta.model_bytes
    with pytest.raises(DecryptionError, match=f"not for this device's key {other.key_id}"):
        open_package(pkg, device_key=other.private_key_path)
    with pytest.raises(DecryptionError, match=f"not for this device's key {other.key_id}"):
        edgefleet.load(pkg, device_key=load_device_private_key(other.private_key_path))


def test_tampered_ciphertext_does_not_decrypt(tmp_path: Path, mlp_path: Path) -> None:
    k = generate_device_keypair(tmp_path)
    pkg = build_package(mlp_path, tmp_path / "e.efpkg", name="d", version="1.0.0", recipients=[k.public_key_hex])
    blob = bytearray(read_member(pkg, "model.onnx.enc"))
    blob[100] ^= 1
    manifest = json.loads(read_member(pkg, "manifest.json"))
    manifest["files"]["model.onnx.enc"] = hashlib.sha256(bytes(blob)).hexdigest()
    step = rewrite_member(pkg, tmp_path / "1.efpkg", "model.onnx.enc", bytes(blob))
    bad = rewrite_member(step, tmp_path / "2.efpkg", "manifest.json", json.dumps(manifest).encode())
    with pytest.raises(DecryptionError, match="altered"):
        open_package(bad, device_key=k.private_key_path)


def test_device_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    k = generate_device_keypair(tmp_path)
    os.chmod(k.private_key_path, 0o644)
    with pytest.raises(DecryptionError, match="chmod 600"):
        load_device_private_key(k.private_key_path)
    with pytest.raises(UsageError, match="already exists"):
        generate_device_keypair(tmp_path)


def test_corrupt_packages_are_refused(tmp_path: Path, mlp_pkg: Path) -> None:
    data = mlp_pkg.read_bytes()
    truncated = tmp_path / "t.efpkg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(PackageError, match=r"truncated|corrupt"):
        open_package(truncated)
    header = tmp_path / "h.efpkg"
    header.write_bytes(data[:100] + b"\xff" * 8 + data[108:])  # the first header's mode field
    with pytest.raises(PackageError, match="corrupt"):
        open_package(header)
    garbage = tmp_path / "g.efpkg"
    garbage.write_bytes(b"PK\x03\x04 not a tar at all" * 40)
    with pytest.raises(PackageError, match=r"not a valid \.efpkg"):
        open_package(garbage)
    flipped = bytearray(data)
    offset = data.index(read_member(mlp_pkg, "golden.npz")[:64]) + 200
    flipped[offset] ^= 0xFF
    member = tmp_path / "m.efpkg"
    member.write_bytes(bytes(flipped))
    with pytest.raises(PackageError, match=r"golden\.npz is corrupt"):
        open_package(member)
    extra = rewrite_member(mlp_pkg, tmp_path / "x.efpkg", "bom.cdx.json", b"{}")
    with pytest.raises(PackageError, match=r"bom\.cdx\.json is corrupt"):
        open_package(extra)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"version": "1.2"}, "at version"),
        ({"name": "Has Spaces"}, "at name"),
        ({"model_sha256": "zz"}, "at model_sha256"),
        ({"io": {"inputs": [], "outputs": []}}, "at io.inputs"),
        ({"surprise": 1}, "at surprise"),
        ({"schema_version": 99}, "schema_version 99 is not supported"),
    ],
)
def test_manifest_breaking_the_schema_is_refused(tmp_path: Path, mlp_pkg: Path, change: dict, match: str) -> None:
    manifest = json.loads(read_member(mlp_pkg, "manifest.json")) | change
    bad = rewrite_member(mlp_pkg, tmp_path / "s.efpkg", "manifest.json", json.dumps(manifest).encode())
    with pytest.raises(ManifestError, match=match):
        open_package(bad)


def test_build_refuses_bad_settings(tmp_path: Path, mlp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"version: .one. must be a semantic version"):
        build_package(mlp_path, tmp_path / "x.efpkg", name="ok", version="one")
    with pytest.raises(UsageError, match="does not exist"):
        build_package(tmp_path / "missing.onnx", tmp_path / "x.efpkg", name="ok", version="1.0.0")
    with pytest.raises(InputValidationError, match="input 'X'"):
        build_package(
            mlp_path,
            tmp_path / "x.efpkg",
            name="ok",
            version="1.0.0",
            sample_inputs=CallData({"X": np.zeros((2, 1, 64), np.float64)}),
        )
    assert not (tmp_path / "x.efpkg").exists()


def test_without_samples_golden_vectors_come_from_seeded_random_inputs(tmp_path: Path, mlp_path: Path) -> None:
    a = build_package(mlp_path, tmp_path / "a.efpkg", name="d", version="1.0.0")
    b = build_package(mlp_path, tmp_path / "b.efpkg", name="d", version="1.0.0")
    assert a.read_bytes() == b.read_bytes()
    p = open_package(a)
    assert len(p.golden_inputs) == 8 and p.reference is None
    p.verify_golden()


def test_source_date_epoch_sets_every_timestamp(
    tmp_path: Path, mlp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    pkg = build_package(mlp_path, tmp_path / "a.efpkg", name="d", version="1.0.0")
    p = open_package(pkg)
    assert p.manifest.created.timestamp() == 1700000000
    assert p.bom["metadata"]["timestamp"].startswith("2023-11-14T22:13:20")
    with tarfile.open(pkg) as tar:
        assert {i.mtime for i in tar.getmembers()} == {1700000000}
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "soon")
    with pytest.raises(UsageError, match="SOURCE_DATE_EPOCH"):
        build_package(mlp_path, tmp_path / "b.efpkg", name="d", version="1.0.0")


def test_check_requirements_gives_reasons(mlp_pkg: Path) -> None:
    m = open_package(mlp_pkg).manifest
    assert check_requirements(m, tier="rpi4", runtime_version="1.32.0", memory_mb=512) == []
    reasons = check_requirements(m, tier="mcu", runtime_version="1.15.1", memory_mb=32, max_opset=13)
    assert len(reasons) == 4
    assert "tier mcu" in reasons[0] and "1.15.1 is older than the required 1.16" in reasons[1]
    assert "32 MB" in reasons[2] and "opset 17" in reasons[3]
    assert check_requirements(m, tier="jetson", runtime_version="1.16.0rc1", memory_mb=None) == []


def test_manifest_schema_in_docs_is_current() -> None:
    on_disk = json.loads((DOCS / "manifest.schema.json").read_text())
    assert on_disk == manifest_json_schema(), "regenerate: python -m edgefleet.package docs/manifest.schema.json"


def test_silero_vad_packages_with_scalar_and_state_inputs(tmp_path: Path, silero_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 6
    samples = CallData(
        {
            "input": rng.uniform(-0.5, 0.5, (n, 1, 512)).astype(np.float32),
            "state": np.zeros((n, 2, 1, 128), np.float32),
            "sr": np.full((n,), 16000, np.int64),
        }
    )
    pkg = build_package(silero_path, tmp_path / "vad.efpkg", name="silero-vad", version="6.2.3", sample_inputs=samples)
    p = open_package(pkg)
    assert {s.name for s in p.manifest.io.inputs} == {"input", "state", "sr"}
    assert p.golden_outputs["stateN"].shape == (n, 2, 1, 128)
    p.verify_golden(edgefleet.load(pkg))
