"""The OIP v2 API of ``edgefleet serve`` (a real process on 127.0.0.1) driven by unmodified tritonclient."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from conftest import free_port, starts_processes


@pytest.fixture(scope="module")
@starts_processes
def server(mlp_path: Path) -> Any:
    port = free_port()
    exe = str(Path(sys.executable).with_name("edgefleet"))
    proc = subprocess.Popen([exe, "serve", str(mlp_path), "--port", str(port)], stdin=subprocess.DEVNULL)
    url = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{url}/v2/health/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield url, mlp_path.stem
    proc.terminate()
    proc.wait(15)


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_matches_session_run(server: Any, mlp_path: Path, digits: Any, binary: bool) -> None:
    import tritonclient.http as th

    url, name = server
    client = th.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    meta = client.get_model_metadata(name)
    assert meta["inputs"][0] == {"name": "X", "datatype": "FP32", "shape": [-1, 64]}
    sess = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])
    x = digits.x_test[:3].astype(np.float32)
    want_label, want_prob = sess.run(["label", "probabilities"], {"X": x})
    inp = th.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [th.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probabilities")]
    res = client.infer(name, [inp], outputs=outs)
    np.testing.assert_array_equal(res.as_numpy("label"), want_label)
    np.testing.assert_array_equal(res.as_numpy("probabilities"), want_prob)
    res = client.infer(name, [inp])  # tritonclient's defaults: binary in, binary out for all outputs
    np.testing.assert_array_equal(res.as_numpy("probabilities"), want_prob)


def _post(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"http://{url}{path}", content=body, headers=headers or {})


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        ("wrong shape", 400, "shape"),
        ("wrong dtype", 400, "datatype"),
        ("binary size", 400, "binary_data_size"),
        ("short binary", 400, "binary"),
        ("unknown model", 404, "unknown model"),
        ("unknown version", 404, "unknown version"),
        ("bad json", 400, "not valid JSON"),
        ("not an object", 400, "JSON object"),
        ("missing input", 400, "inputs"),
        ("too few values", 400, "do not fill"),
        ("unknown output", 400, "unknown output"),
        ("bad header length", 400, "Inference-Header-Content-Length"),
        ("wrong method", 405, "POST"),
    ],
)
def test_malformed_requests_get_4xx_with_message(server: Any, case: str, status: int, message: str) -> None:
    url, name = server
    good = {"name": "X", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}
    infer = f"/v2/models/{name}/infer"
    import json

    raw = np.zeros(64, np.float32).tobytes()
    bin_head = json.dumps(
        {"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": 100}}]}
    ).encode()
    ok_head = json.dumps(
        {"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": 256}}]}
    ).encode()
    r: httpx.Response
    if case == "wrong shape":
        r = _post(url, infer, json.dumps({"inputs": [good | {"shape": [1, 63], "data": [0.0] * 63}]}).encode())
    elif case == "wrong dtype":
        r = _post(url, infer, json.dumps({"inputs": [good | {"datatype": "INT64", "data": [0] * 64}]}).encode())
    elif case == "binary size":
        r = _post(url, infer, bin_head + raw, {"Inference-Header-Content-Length": str(len(bin_head))})
    elif case == "short binary":
        r = _post(url, infer, ok_head + raw[:100], {"Inference-Header-Content-Length": str(len(ok_head))})
    elif case == "unknown model":
        r = _post(url, "/v2/models/nope/infer", json.dumps({"inputs": [good]}).encode())
    elif case == "unknown version":
        r = _post(url, f"/v2/models/{name}/versions/7/infer", json.dumps({"inputs": [good]}).encode())
    elif case == "bad json":
        r = _post(url, infer, b'{"inputs": [')
    elif case == "not an object":
        r = _post(url, infer, b"[1, 2]")
    elif case == "missing input":
        r = _post(url, infer, b'{"inputs": []}')
    elif case == "too few values":
        r = _post(url, infer, json.dumps({"inputs": [good | {"data": [0.0] * 10}]}).encode())
    elif case == "unknown output":
        r = _post(url, infer, json.dumps({"inputs": [good], "outputs": [{"name": "logits"}]}).encode())
    elif case == "bad header length":
        r = _post(url, infer, b"{}", {"Inference-Header-Content-Length": "12345"})
    else:
        r = httpx.get(f"http://{url}{infer}")
    assert r.status_code == status, r.text
    assert message.lower() in r.json()["error"].lower()


def test_metrics_has_histograms_and_totals(server: Any) -> None:
    url, name = server
    body = b'{"inputs":[{"name":"X","shape":[1,64],"datatype":"FP32","data":[' + b",".join([b"0.1"] * 64) + b"]}]}"
    assert _post(url, f"/v2/models/{name}/infer", body).status_code == 200
    text = httpx.get(f"http://{url}/metrics").text
    for metric in ("queue", "compute"):
        assert f'edgefleet_agent_{metric}_duration_seconds_bucket{{le="0.001",model="{name}",version="1"}}' in text
    # the request metrics say where each answer came from (hybrid routing: docs/agent.md)
    labels = f'le="0.001",model="{name}",route="local",version="1"'
    assert f"edgefleet_agent_request_duration_seconds_bucket{{{labels}}}" in text
    assert f'edgefleet_agent_requests_total{{model="{name}",outcome="ok",route="local",version="1"}}' in text
