"""LiteRT and OpenVINO beside onnxruntime behind the runtime layer, and onnxruntime's execution providers.

The models are real. LiteRT: MediaPipe's short-range face detector (``face_detection_short_range.tflite``, 230 KB,
input float32[1, 128, 128, 3], outputs ``regressors`` [1, 896, 16] and ``classificators`` [1, 896, 1]), shipped
inside the ``mediapipe`` 0.10.21 wheel, which ``make`` installs without its dependencies (nothing imports it; only
the file is read). OpenVINO: the digits CNN the optimizer tests train (``optimize._models.digits_cnn``, plain ONNX
operators), read by OpenVINO from its ONNX bytes, and saved as OpenVINO IR with ``openvino.save_model`` for the IR
path.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from _fleet_support import AgentProc, Fleet, state_of
from conftest import free_port, starts_processes
from edgefleet import examples
from edgefleet.config import RuntimeSettings
from edgefleet.errors import DecryptionError, ManifestError, ModelError, RuntimeUnavailable
from edgefleet.package import GoldenTolerance, Requirements, build_package, check_requirements, open_package
from edgefleet.package.manifest import parse_manifest
from edgefleet.runtime import Model, available_runtimes, load_model
from edgefleet.runtime.onnxruntime import choose_providers

FACE = "mediapipe/modules/face_detection/face_detection_short_range.tflite"
# OpenVINO on another thread count may sum in another order: a little more room than onnxruntime's defaults
OV_TOLERANCE = GoldenTolerance(rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="session")
def face_tflite() -> Path:
    try:
        p = Path(str(importlib.metadata.distribution("mediapipe").locate_file(FACE)))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mediapipe is not installed (make installs it with --no-deps for its .tflite files)")
    if not p.is_file():
        pytest.skip(f"this mediapipe wheel has no {FACE}")
    return p


@pytest.fixture(scope="session")
def cnn_onnx(tmp_path_factory: pytest.TempPathFactory, digits: examples.Digits) -> Path:
    from edgefleet.optimize._models import digits_cnn

    p = tmp_path_factory.mktemp("ov") / "digits_cnn.onnx"
    p.write_bytes(digits_cnn(digits))
    return p


@pytest.fixture(scope="session")
def cnn_ir(cnn_onnx: Path) -> Path:
    import openvino as ov

    xml = cnn_onnx.with_suffix(".xml")
    ov.save_model(ov.Core().read_model(str(cnn_onnx)), str(xml), compress_to_fp16=False)
    return xml


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory, face_tflite: Path, cnn_ir: Path, digits: Any) -> dict[str, Path]:
    from edgefleet.data import CallData

    out = tmp_path_factory.mktemp("pkgs")
    calls = CallData({"X": digits.x_test[:8].reshape(8, 1, 1, 8, 8)})
    return {
        "face": build_package(face_tflite, out / "face-1.0.0.efpkg", name="face", version="1.0.0"),
        "cnn": build_package(
            cnn_ir, out / "cnn-1.0.0.efpkg", name="cnn", version="1.0.0", sample_inputs=calls, golden=OV_TOLERANCE
        ),
    }


# ---------------------------------------------------------------- packages and the runtime layer, in process


def test_litert_package_reproduces_its_golden_vectors(packages: dict[str, Path], face_tflite: Path) -> None:
    opened = open_package(packages["face"])
    m = opened.manifest
    assert (m.requirements.runtime, m.model_format, m.model_member) == ("litert", "tflite", "model.tflite")
    assert "model.onnx" not in opened.members and m.requirements.opset is None
    model = opened.load()
    assert (model.runtime_name, model.provider) == ("litert", "CPU")
    assert model.runtime_version == importlib.metadata.version("ai-edge-litert")
    assert [(s.name, s.dtype, s.shape) for s in model.inputs] == [("input", "float32", [1, 128, 128, 3])]
    assert {s.name for s in model.outputs} == {"regressors", "classificators"}
    opened.verify_golden(model)
    # the package's model is the wheel's file, byte for byte; a rebuild is byte-identical
    assert opened.model_bytes == face_tflite.read_bytes()
    again = build_package(face_tflite, packages["face"].with_name("again.efpkg"), name="face", version="1.0.0")
    assert again.read_bytes() == packages["face"].read_bytes()


def test_openvino_runs_onnx_and_ir_as_onnxruntime_does(packages: dict[str, Path], cnn_onnx: Path, digits: Any) -> None:
    x = digits.x_test[:5].reshape(5, 1, 8, 8)
    want = Model(cnn_onnx.read_bytes()).run({"X": x})["logits"]
    assert want.shape == (5, 10)
    from_onnx = Model(cnn_onnx.read_bytes(), runtime="openvino")
    assert (from_onnx.runtime_name, from_onnx.provider) == ("openvino", "CPU")
    np.testing.assert_allclose(from_onnx.run({"X": x})["logits"], want, rtol=1e-4, atol=1e-4)

    opened = open_package(packages["cnn"])
    m = opened.manifest
    assert (m.requirements.runtime, m.model_format, m.model_member) == ("openvino", "openvino-ir", "model.ir.tar")
    model = opened.load()
    assert model.runtime_name == "openvino" and [s.shape for s in model.inputs] == [[None, 1, 8, 8]]
    opened.verify_golden(model)
    np.testing.assert_allclose(model.run({"X": x})["logits"], want, rtol=1e-4, atol=1e-4)
    # a bare IR loads too (its .bin beside it), and the labels are the digits'
    bare = load_model(cnn_onnx.with_suffix(".xml"))
    labels = bare.run({"X": digits.x_test.reshape(-1, 1, 8, 8)})["logits"].argmax(axis=1)
    assert float(np.mean(labels == digits.y_test)) > 0.9


def test_an_encrypted_ir_package_opens_with_the_device_key(tmp_path: Path, cnn_ir: Path) -> None:
    from edgefleet.package import generate_device_keypair

    keys = generate_device_keypair(tmp_path)
    pkg = build_package(
        cnn_ir, tmp_path / "p.efpkg", name="cnn", version="1.0.0", recipients=[keys.public_key_hex], golden=OV_TOLERANCE
    )
    sealed = open_package(pkg)
    assert "model.ir.tar.enc" in sealed.members and "model.ir.tar" not in sealed.members
    with pytest.raises(DecryptionError, match="encrypted"):
        sealed.load()
    opened = open_package(pkg, device_key=keys.private_key_path)
    opened.verify_golden()


def test_an_onnx_package_is_run_by_openvino_when_its_requirements_say_so(
    tmp_path: Path, cnn_onnx: Path, digits: Any
) -> None:
    pkg = build_package(
        cnn_onnx, tmp_path / "p.efpkg", name="cnn", version="1.0.0", requirements=Requirements(runtime="openvino")
    )
    opened = open_package(pkg)
    assert (opened.manifest.model_format, opened.manifest.model_member) == ("onnx", "model.onnx")
    assert opened.load().runtime_name == "openvino"
    opened.verify_golden()


def test_an_onnx_manifest_is_written_as_before(mlp_path: Path, tmp_path: Path) -> None:
    # agents that predate model_format refuse unknown fields: an ONNX package must not carry it
    opened = open_package(build_package(mlp_path, tmp_path / "p.efpkg", name="digits", version="1.0.0"))
    raw = json.loads(opened.manifest.to_json())
    assert "model_format" not in raw and raw["requirements"]["runtime"] == "onnxruntime"
    assert opened.load().runtime_name == "onnxruntime"


def test_manifest_and_builder_refuse_a_runtime_that_cannot_read_the_model(
    packages: dict[str, Path], face_tflite: Path, tmp_path: Path
) -> None:
    raw = json.loads(open_package(packages["face"]).manifest.to_json())
    raw["requirements"]["runtime"] = "onnxruntime"
    with pytest.raises(ManifestError, match="onnxruntime cannot run a tflite model"):
        parse_manifest(raw)
    from edgefleet.errors import UsageError

    with pytest.raises(UsageError, match="openvino cannot run a tflite model"):
        build_package(
            face_tflite, tmp_path / "x.efpkg", name="x", version="1.0.0", requirements=Requirements(runtime="openvino")
        )


@pytest.mark.parametrize(("runtime", "module"), [("litert", "ai_edge_litert"), ("openvino", "openvino")])
def test_a_device_without_the_runtime_gets_a_clear_refusal(
    monkeypatch: pytest.MonkeyPatch, packages: dict[str, Path], runtime: str, module: str
) -> None:
    # the runtime's package made unimportable, as on a device installed without its extra
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")] + [module]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, f"edgefleet.runtime.{runtime}", raising=False)
    opened = open_package(packages["face" if runtime == "litert" else "cnn"])
    with pytest.raises(RuntimeUnavailable, match=rf"needs the {runtime} runtime.*edgefleet\[{runtime}\]"):
        opened.load()


def test_check_requirements_has_a_runtime_axis(packages: dict[str, Path], mlp_path: Path, tmp_path: Path) -> None:
    face = open_package(packages["face"]).manifest
    ort_only = {"onnxruntime": "1.32.0"}
    reasons = check_requirements(face, tier=None, runtime_version="1.32.0", memory_mb=None, runtimes=ort_only)
    assert reasons == ["the package runs on litert, which the device does not have (it has onnxruntime)"]
    # an agent that reports no runtimes has onnxruntime alone
    assert check_requirements(face, tier=None, runtime_version="1.32.0", memory_mb=None) == reasons
    both = {**ort_only, "litert": "2.3.0"}
    assert check_requirements(face, tier=None, runtime_version="1.32.0", memory_mb=None, runtimes=both) == []
    newer = face.model_copy(
        update={"requirements": face.requirements.model_copy(update={"min_runtime_version": "2.4"})}
    )
    assert check_requirements(newer, tier=None, runtime_version="9.0", memory_mb=None, runtimes=both) == [
        "litert 2.3.0 is older than the required 2.4"
    ]
    # ONNX opsets bound onnxruntime only
    cnn = open_package(packages["cnn"]).manifest.model_copy()
    cnn = cnn.model_copy(update={"requirements": cnn.requirements.model_copy(update={"opset": 99})})
    have = {**ort_only, "openvino": "2026.4.1"}
    assert (
        check_requirements(cnn, tier=None, runtime_version="1.32.0", memory_mb=None, max_opset=21, runtimes=have) == []
    )
    assert set(available_runtimes()) >= {"onnxruntime", "litert", "openvino"}


def test_execution_providers_first_available_then_cpu(mlp_path: Path) -> None:
    assert choose_providers(["CUDAExecutionProvider", "TensorrtExecutionProvider"], ["CPUExecutionProvider"]) == [
        "CPUExecutionProvider"
    ]
    available = ["OpenVINOExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "OpenVINOExecutionProvider"], available
    ) == [
        "CUDAExecutionProvider",
        "OpenVINOExecutionProvider",
        "CPUExecutionProvider",
    ]
    # a real session: the package's wish for providers this build lacks falls back to the CPU, and says so
    model = Model(mlp_path.read_bytes(), providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    assert model.provider == "CPUExecutionProvider"
    # settings that name a provider are a demand: refused when it is missing
    with pytest.raises(ModelError, match="CUDAExecutionProvider is not available"):
        Model(mlp_path.read_bytes(), settings=RuntimeSettings(providers=["CUDAExecutionProvider"]))


def test_compat_matrix_runtime_axis() -> None:
    from edgefleet.controlplane.compat import device_problems, runtime_axis

    assert runtime_axis("onnxruntime", "1.32.0") == "1.32.0"  # as every cell was before other runtimes
    assert runtime_axis("litert", "2.3.0") == "litert 2.3.0"
    manifest = parse_manifest(
        {
            "name": "face",
            "version": "1.0.0",
            "created": "1980-01-01T00:00:00Z",
            "io": {
                "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 4]}],
                "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 4]}],
            },
            "requirements": {"runtime": "litert"},
            "model_format": "tflite",
            "model_sha256": "0" * 64,
            "model_size": 1,
        }
    )
    have = {"onnxruntime": "1.32.0", "litert": "2.3.0"}
    kw: dict[str, Any] = {"tier": "t", "runtime_version": "1.32.0", "memory_mb": None}
    assert device_problems(manifest, set(), runtimes=have, **kw) == []
    assert device_problems(manifest, {("t", "1.32.0")}, runtimes=have, **kw) == []  # another runtime's cell
    assert device_problems(manifest, {("t", "litert 2.3.0")}, runtimes=have, **kw) == [
        "compatibility matrix: failed on tier t with runtime litert 2.3.0"
    ]
    assert "does not have" in device_problems(manifest, set(), runtimes=None, **kw)[0]


@pytest.mark.process
def test_bench_records_the_runtime_and_provider(packages: dict[str, Path]) -> None:
    from edgefleet.bench.report import BenchSettings
    from edgefleet.bench.runner import bench
    from edgefleet.bench.tiers import host_tier

    fast = BenchSettings(time_budget_s=0.3, min_samples=10, warmup=1, batch_sizes=[1], throughput_time_s=0.05)
    report = bench([packages["face"], packages["cnn"]], [host_tier()], settings=fast)
    rts = available_runtimes()
    got = {
        (r.runtime, r.runtime_version, r.provider, r.compat.runtime, r.compat.runtime_version) for r in report.results
    }
    assert got == {
        ("litert", rts["litert"], "CPU", "litert", rts["litert"]),
        ("openvino", rts["openvino"], "CPU", "openvino", rts["openvino"]),
    }
    assert all(r.status == "ok" and r.opset == {} for r in report.results)


# ---------------------------------------------------------------- real agents


@pytest.fixture
@starts_processes
def fleet(tmp_path: Path, packages: dict[str, Path]) -> Any:
    f = Fleet(tmp_path / "cp")
    f.publish(*packages.values())
    yield f
    f.close()


def _infer(url: str, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    body = {
        "inputs": [
            {"name": k, "shape": list(v.shape), "datatype": "FP32", "data": v.ravel().tolist()}
            for k, v in feeds.items()
        ]
    }
    r = httpx.post(f"{url}/v2/models/{name}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return {o["name"]: np.asarray(o["data"], dtype=np.float32).reshape(o["shape"]) for o in r.json()["outputs"]}


def test_real_agent_serves_litert_and_openvino_packages_over_oip(
    fleet: Fleet, tmp_path: Path, packages: dict[str, Path], digits: Any
) -> None:
    agent = AgentProc(fleet.url, fleet.enrollment_token(), tmp_path / "dev", free_port())
    agent.start()
    try:
        agent.wait_until(lambda: fleet.device_ids(), what="enrollment")
        hw = fleet.record()["hardware"]
        assert hw["runtimes"] == available_runtimes() and "CPUExecutionProvider" in hw["execution_providers"]
        for name, version in (("face", "1.0.0"), ("cnn", "1.0.0")):
            fleet.pin(version, model=name, probation_seconds=0.3, probation_requests=1000)
            agent.wait_until(
                lambda n=name: (state_of(agent.data_dir).get("committed") or {}).get("model") == n,  # type: ignore[misc]
                what=f"{name} committed",
            )
            events = [k for k, v, _ in fleet.events()]
            assert "health_check_passed" in events  # the golden vectors, reproduced in a fresh worker
            opened = open_package(packages[name])
            meta = httpx.get(f"{agent.url}/v2/models/{name}", timeout=10).json()
            assert meta["platform"] == opened.manifest.requirements.runtime
            feed = next(iter(opened.golden_inputs))
            got = _infer(agent.url, name, feed)
            want = opened.load().run(feed)
            for out, value in want.items():
                np.testing.assert_allclose(got[out], value, rtol=1e-3, atol=1e-4)
        labels = _infer(agent.url, "cnn", {"X": digits.x_test[:20].reshape(20, 1, 8, 8).astype(np.float32)})
        assert float(np.mean(labels["logits"].argmax(axis=1) == digits.y_test[:20])) > 0.8
        # the compatibility matrix: a cell per package on the device's version of its runtime, verified
        agent.wait_until(
            lambda: sum(1 for c in fleet.api("GET", "/api/v1/compat") if c["status"] == "verified") == 2,
            what="two verified cells",
        )
        cells = {(c["model"], c["runtime"], c["runtime_version"]) for c in fleet.api("GET", "/api/v1/compat")}
        rts = available_runtimes()
        assert ("face", "litert", f"litert {rts['litert']}") in cells
        assert ("cnn", "openvino", f"openvino {rts['openvino']}") in cells
    finally:
        agent.stop()
