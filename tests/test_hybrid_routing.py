"""Hybrid edge/cloud routing (docs/agent.md, ADR 0105): the pure decision, the budget, the remote OIP client, the
agent's forwarding path, and end to end with real ``edgefleet serve`` processes (one of them the "cloud")."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import psutil
import pytest

from conftest import free_port, starts_processes
from edgefleet.agent.remote import RemoteRouter, decode_response, encode_request
from edgefleet.agent.routing import Budget, Facts, Policy, route, top1_probability
from edgefleet.agent.service import InferenceService
from edgefleet.agent.worker.spec import ModelInfo
from edgefleet.errors import RemoteUnavailable
from edgefleet.protocol import DeviceConfig

FALLBACK = Policy("fallback", "http://cloud", budget_per_minute=10)
CONFIDENCE = Policy("confidence", "http://cloud", budget_per_minute=10)

# ---------------------------------------------------------------- the decision


@pytest.mark.parametrize(
    ("policy", "facts", "to", "unsent"),
    [
        # local only: whatever happens, the local side answers (or 503s as it always did)
        (Policy(), Facts(worker_up=False), "local", False),
        (Policy("fallback"), Facts(worker_up=False), "local", False),  # no endpoint: nothing can go remote
        (Policy("local", "http://cloud"), Facts(worker_up=False), "local", False),
        # fallback
        (FALLBACK, Facts(), "local", False),
        (FALLBACK, Facts(worker_up=False), "remote", False),
        (FALLBACK, Facts(worker_up=False, budget_left=False), "none", True),
        (FALLBACK, Facts(queued=64, queue_limit=64), "remote", False),
        (FALLBACK, Facts(queued=64, queue_limit=64, budget_left=False), "none", True),
        (FALLBACK, Facts(rolling_back=True), "remote", False),
        (FALLBACK, Facts(rolling_back=True, budget_left=False), "local", True),
        (FALLBACK, Facts(confidence=0.1, threshold=0.9), "local", False),  # confidence is not fallback's
        # fallback at a queue depth below the queue size: the local side could still take it
        (Policy("fallback", "http://c", queue_depth=4), Facts(queued=3), "local", False),
        (Policy("fallback", "http://c", queue_depth=4), Facts(queued=4), "remote", False),
        (Policy("fallback", "http://c", queue_depth=4), Facts(queued=4, budget_left=False), "local", True),
        (Policy("fallback", "http://c", queue_depth=100), Facts(queued=64, queue_limit=64), "remote", False),
        # confidence
        (CONFIDENCE, Facts(), "local", False),  # no local answer yet
        (CONFIDENCE, Facts(confidence=0.95, threshold=0.9), "local", False),
        (CONFIDENCE, Facts(confidence=0.9, threshold=0.9), "local", False),  # at the threshold: not under it
        (CONFIDENCE, Facts(confidence=0.5, threshold=0.9), "remote", False),
        (CONFIDENCE, Facts(confidence=0.5, threshold=0.9, budget_left=False), "local", True),
        (CONFIDENCE, Facts(confidence=0.5), "local", False),  # the package declares no threshold
        (CONFIDENCE, Facts(worker_up=False), "remote", False),  # a remote answer beats a 503
        (CONFIDENCE, Facts(worker_up=False, budget_left=False), "none", True),
    ],
)
def test_route(policy: Policy, facts: Facts, to: str, unsent: bool) -> None:
    r = route(policy, facts)
    assert (r.to, r.unsent) == (to, unsent), r
    assert r.reason


def test_route_reasons_name_the_cause() -> None:
    assert "down" in route(FALLBACK, Facts(worker_up=False)).reason
    assert "rollback" in route(FALLBACK, Facts(rolling_back=True)).reason
    assert "wait locally" in route(FALLBACK, Facts(queued=70, queue_limit=64)).reason
    assert "0.5 is under 0.9" in route(CONFIDENCE, Facts(confidence=0.5, threshold=0.9)).reason
    assert "budget of 10 calls a minute is spent" in route(FALLBACK, Facts(worker_up=False, budget_left=False)).reason


def test_budget_is_a_sliding_minute() -> None:
    b = Budget(2)
    assert b.spend(0.0) and b.spend(30.0)
    assert not b.spend(59.9) and b.left(59.9) == 0
    assert b.left(60.0) == 1 and b.spend(60.0)  # the call at 0 s left the window
    assert not b.spend(89.0)
    assert b.spend(90.0)
    assert not Budget(0).spend(0.0)


def test_top1_probability() -> None:
    assert top1_probability(np.array([[0.1, 0.7, 0.2]], np.float32)) == pytest.approx(0.7)
    assert top1_probability(np.array([[0.1, 0.9], [0.4, 0.6]])) == pytest.approx(0.6)  # the least sure item
    assert top1_probability(np.zeros((0, 3))) is None
    assert top1_probability(np.array([[0.2, 0.8]]), axis=5) is None


def test_policy_from_the_config_document() -> None:
    doc = DeviceConfig.model_validate(
        {"routing": {"remote_url": "https://cloud.example/", "policy": "confidence", "budget_per_minute": 5}}
    ).routing
    p = Policy.from_doc(doc)
    assert (p.policy, p.remote_url, p.budget_per_minute, p.remote) == ("confidence", "https://cloud.example", 5, True)
    assert not Policy.from_doc(None).remote
    for bad in ({"remote_url": "ftp://x"}, {"policy": "cloud"}, {"timeout_s": 0}):
        with pytest.raises(ValueError):
            DeviceConfig.model_validate({"routing": bad})


# ---------------------------------------------------------------- the remote client


def test_request_and_response_round_trip() -> None:
    x = np.arange(6, dtype=np.float32).reshape(1, 6)
    body, head = encode_request({"X": x}, ["y"])
    doc = json.loads(body[:head])
    assert doc["inputs"][0] == {
        "name": "X",
        "shape": [1, 6],
        "datatype": "FP32",
        "parameters": {"binary_data_size": 24},
    }
    assert np.frombuffer(body[head:], "<f4").tolist() == x.ravel().tolist()
    # a binary answer and a JSON one read back the same
    y = np.array([[0.25, 0.75]], np.float32)
    h = json.dumps(
        {
            "model_name": "m",
            "model_version": "7",
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}}],
        }
    ).encode()
    ans = decode_response(h + y.tobytes(), len(h))
    assert (ans.model_name, ans.model_version) == ("m", "7")
    np.testing.assert_array_equal(ans.outputs["y"], y)
    js = json.dumps({"outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]}]}).encode()
    np.testing.assert_array_equal(decode_response(js, None).outputs["y"], y)


@pytest.mark.parametrize(
    ("content", "header", "why"),
    [
        (b"<html>", None, "not JSON"),
        (b"{}", None, "no outputs"),
        (b'{"outputs":[{"name":"y","datatype":"BYTES","shape":[1]}]}', None, "no numeric datatype"),
        (b'{"outputs":[{"name":"y","datatype":"FP32","shape":[2],"data":[1]}]}', None, "does not fill"),
        (b'{"outputs":[{"name":"y","datatype":"FP32","shape":[2],"parameters":{"binary_data_size":8}}]}', None, "fit"),
        (b"{}", 99, "Inference-Header-Content-Length"),
    ],
)
def test_malformed_answers_are_refused(content: bytes, header: int | None, why: str) -> None:
    with pytest.raises(RemoteUnavailable, match=why) as err:
        decode_response(content, header)
    assert err.value.reason == "refused"


def _router(handler: Any, policy: Policy = FALLBACK) -> tuple[RemoteRouter, list[str]]:
    unsent: list[str] = []
    return RemoteRouter(policy, unsent.append, transport=httpx.MockTransport(handler)), unsent


def _answer(request: httpx.Request) -> httpx.Response:
    doc = {
        "model_name": "cloud-m",
        "model_version": "9",
        "outputs": [{"name": "y", "datatype": "INT64", "shape": [1], "data": [3]}],
    }
    return httpx.Response(200, json=doc)


def test_router_spends_the_budget_and_counts_what_it_could_not_send() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        return _answer(request)

    router, unsent = _router(handler, Policy("fallback", "http://cloud/", "other", budget_per_minute=1))
    down = Facts(worker_up=False)
    assert router.decide(down).to == "remote"
    ans = asyncio.run(router.infer("m", {"X": np.zeros((1, 2), np.float32)}, None))
    assert calls == ["http://cloud/v2/models/other/infer"] and ans.outputs["y"].tolist() == [3]
    assert router.decide(down).to == "none" and unsent == ["budget"]


@pytest.mark.parametrize(
    ("handler", "reason"),
    [
        (lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused", request=r)), "unreachable"),
        (lambda r: (_ for _ in ()).throw(httpx.ReadTimeout("slow", request=r)), "timeout"),
        (lambda r: httpx.Response(503, json={"error": "no model"}), "refused"),
    ],
)
def test_remote_failures_are_counted_by_reason(handler: Any, reason: str) -> None:
    router, unsent = _router(handler)
    with pytest.raises(RemoteUnavailable) as err:
        asyncio.run(router.infer("m", {"X": np.zeros((1, 2), np.float32)}, None))
    assert err.value.reason == reason and unsent == [reason]


# ---------------------------------------------------------------- the agent's forwarding path (no worker)

_INFO = ModelInfo("m", "1", "0" * 64, [{"name": "X", "dtype": "float32", "shape": [None, 2]}], [])


def _submit(service: InferenceService) -> tuple[Any, ...]:
    async def go() -> tuple[Any, ...]:
        fut: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()
        service.submit({"X": np.zeros((1, 2), np.float32)}, None, lambda *a: fut.set_result(a))
        return await fut

    return asyncio.run(go())


def _service(handler: Any, policy: Policy) -> InferenceService:
    svc = InferenceService()
    svc.suspend("the worker is down")  # a model is known, no backend serves it
    svc.info = _INFO
    svc.set_routing(policy)
    assert svc.router is not None
    svc.router.client._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return svc


def test_with_no_worker_fallback_answers_from_the_remote_and_counts_it() -> None:
    svc = _service(_answer, FALLBACK)
    results, _compute, err, via = _submit(svc)
    assert err is None and results["y"].tolist() == [3] and via == ("cloud-m", "9")
    svc.record("ok|remote", 0.01)
    text = svc.metrics.render().decode()
    assert 'edgefleet_agent_requests_total{model="m",outcome="ok",route="remote",version="1"} 1.0' in text
    assert svc.window.remote_requests == 1 and svc.window.requests == 0  # not the local model's window


def test_offline_with_no_worker_is_a_clear_503_and_counted() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    svc = _service(down, FALLBACK)
    results, _compute, err = _submit(svc)
    assert results is None and err.status == 503
    assert "the local worker is down, and the remote endpoint could not answer" in err.message
    assert svc.window.remote_unsent == 1
    assert 'edgefleet_agent_remote_unsent_requests_total{reason="unreachable"} 1.0' in svc.metrics.render().decode()
    w = svc.window.close(model="m", version="1", model_sha256=None, restarts=0, crashes=0, worker_rss=None, drift=[])
    assert w.remote_unsent == 1 and svc.window.remote_unsent == 0


def test_budget_spent_with_no_worker_is_a_503_naming_the_budget() -> None:
    svc = _service(_answer, Policy("fallback", "http://cloud", budget_per_minute=0))
    _results, _compute, err = _submit(svc)
    assert err.status == 503 and "budget of 0 calls a minute is spent" in err.message
    assert 'edgefleet_agent_remote_unsent_requests_total{reason="budget"} 1.0' in svc.metrics.render().decode()


# ---------------------------------------------------------------- end to end: real `edgefleet serve` processes

_EXE = str(Path(sys.executable).with_name("edgefleet"))


def _serve(path: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([_EXE, "serve", str(path), "--port", str(port), *args], stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, "edgefleet serve exited"
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"{path.name} did not become ready")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="module")
@starts_processes
def cloud(mlp_path: Path) -> Iterator[str]:
    proc, url = _serve(mlp_path)
    yield url
    _stop(proc)


def _infer(url: str, model: str, x: np.ndarray) -> httpx.Response:
    body = {"inputs": [{"name": "X", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    return httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=10)


def _route(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["parameters"]["edgefleet_route"])


def _probs(r: httpx.Response) -> np.ndarray:
    out = {o["name"]: o for o in r.json()["outputs"]}["probabilities"]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def _counter(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}\{{([^}}]*)\}} ([0-9.e+]+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


@pytest.mark.process
def test_fallback_answers_from_the_cloud_while_the_worker_is_killed(cloud: str, mlp_path: Path, digits: Any) -> None:
    proc, url = _serve(mlp_path, "--route", "fallback", "--remote-url", cloud, "--remote-budget", "1000")
    try:
        name = mlp_path.stem
        x = digits.x_test[:1].astype(np.float32)
        local = _infer(url, name, x)
        assert _route(local) == "local"
        # Kill whichever worker runs (the supervisor restarts it, backing off longer each time) until a request lands
        # while none serves: the agent forwards it to the cloud instead of answering 503.
        remote = None
        deadline = time.monotonic() + 60
        while remote is None and time.monotonic() < deadline:
            for kid in psutil.Process(proc.pid).children():
                try:
                    os.kill(kid.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for _ in range(20):
                try:
                    r = _infer(url, name, x)
                except httpx.HTTPError:
                    continue  # a connection the killed worker held
                if r.status_code == 200 and _route(r) == "remote":
                    remote = r
                    break
        assert remote is not None, "no request was answered by the cloud while the worker was down"
        np.testing.assert_allclose(_probs(remote), _probs(local), rtol=1e-6)  # the same model answered, remotely
        assert remote.json()["model_name"] == name
        # recovery: the restarted worker serves the port again, and answers say local
        deadline = time.monotonic() + 60
        while True:
            try:
                if _route(_infer(url, name, x)) == "local" and psutil.Process(proc.pid).children():
                    break
            except (httpx.HTTPError, AssertionError):
                pass
            assert time.monotonic() < deadline, "the device never answered locally again"
            time.sleep(0.05)
        assert _counter(url, "edgefleet_agent_requests_total", route="remote", outcome="ok") >= 1
        # (the first local answer's stats may have died with the worker: ADR 0032 ships them every 50 ms)
        assert _counter(url, "edgefleet_agent_requests_total", route="local", outcome="ok") >= 1
    finally:
        _stop(proc)


@pytest.mark.process
def test_confidence_sends_only_unsure_answers_within_the_budget(
    cloud: str, mlp_path: Path, digits: Any, tmp_path: Path
) -> None:
    from edgefleet.data import CallData
    from edgefleet.package import build_package
    from edgefleet.runtime.processing import Confidence

    xs = digits.x_test[:40, None, :].astype(np.float32)
    sess = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])
    tops = np.array([sess.run(["probabilities"], {"X": x})[0].max() for x in xs])
    ordered = np.sort(tops)
    threshold = float((ordered[9] + ordered[10]) / 2)  # 10 of the 40 calls are under it
    assert ordered[9] < threshold < ordered[10]
    pkg = build_package(
        mlp_path,
        tmp_path / "edge-1.0.0.efpkg",
        name="edge",
        version="1.0.0",
        sample_inputs=CallData({"X": xs[:4]}),
        postprocessing=[Confidence(tensor="probabilities", remote_below=threshold)],
    )
    budget = 4
    proc, url = _serve(
        pkg, "--route", "confidence", "--remote-url", cloud, "--remote-model", mlp_path.stem,
        "--remote-budget", str(budget),
    )  # fmt: skip
    try:
        answers = [_infer(url, "edge", x) for x in xs]
        routes = [_route(r) for r in answers]
        unsure = [i for i, t in enumerate(tops) if t < threshold]
        sent = [i for i, r in enumerate(routes) if r == "remote"]
        assert sent == unsure[:budget], (sent, unsure)  # only unsure ones, until the minute's budget is spent
        assert all(routes[i] == "local" for i in unsure[budget:])
        # every answer names the model that gave it: the cloud's for the remote ones
        assert {answers[i].json()["model_name"] for i in sent} == {mlp_path.stem}
        r = _infer(url, "edge", xs[unsure[0]])
        assert _route(r) == "local" and r.json()["model_name"] == "edge"
        unsent = len(unsure) - budget + 1
        deadline = time.monotonic() + 10
        while _counter(url, "edgefleet_agent_remote_unsent_requests_total", reason="budget") != unsent:
            assert time.monotonic() < deadline, "the unsent requests were not counted"
            time.sleep(0.05)
        assert _counter(url, "edgefleet_agent_requests_total", route="remote", outcome="ok") == budget
    finally:
        _stop(proc)
