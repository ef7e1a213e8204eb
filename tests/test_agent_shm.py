"""The local zero-copy path: system shared memory (the KServe/Triton extension) and the Unix socket listener.

Pure checks and the registry in process first; then ``edgefleet serve --uds`` (a real agent and worker) driven by
unmodified ``tritonclient.http`` + ``tritonclient.utils.shared_memory``, and by httpx over the Unix socket.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import psutil
import pytest

from conftest import free_port, starts_processes
from edgefleet.agent.codec import BadRequest, parse_request
from edgefleet.agent.shm import Region, ShmRegistry, check_key, check_name, check_register, placement, unquote

SPECS = [{"name": "X", "dtype": "float32", "shape": [None, 4]}]


# ---------------------------------------------------------------- pure checks


@pytest.mark.parametrize("key", ["/a", "abc", "/input_simple", "a.b-c_d", "/" + "k" * 250])
def test_keys_accepted(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize("key", ["", "/", "//a", "/a/b", "../x", "/..", "a b", 3, None, "/" + "k" * 251])
def test_keys_refused(key: Any) -> None:
    with pytest.raises(BadRequest, match="POSIX shared memory object"):
        check_key(key)


@pytest.mark.parametrize("name", ["", "a/b", "a b", "x" * 129, "é"])
def test_region_names_refused(name: str) -> None:
    with pytest.raises(BadRequest, match="region name"):
        check_name(name)


def test_unquote() -> None:
    assert unquote("in%5F0") == "in_0"
    assert unquote("plain") == "plain"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "JSON object"),
        ({"key": "/k"}, "byte_size"),
        ({"key": "/k", "byte_size": 0}, "positive"),
        ({"key": "/k", "byte_size": 8, "offset": -1}, "offset"),
        ({"key": "/k", "byte_size": True}, "byte_size"),
        ({"key": "/k", "byte_size": 1.5}, "byte_size"),
        ({"byte_size": 8}, "key"),
    ],
)
def test_register_documents_refused(doc: Any, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        check_register("r", doc)


def test_placement_bounds() -> None:
    regions = {"r": Region("r", "/k", 0, 64)}
    assert placement({"shared_memory_region": "r", "shared_memory_byte_size": 16}, "input 'X'", regions) == (
        regions["r"],
        0,
        16,
    )
    ok = {"shared_memory_region": "r", "shared_memory_byte_size": 16, "shared_memory_offset": 48}
    assert placement(ok, "input 'X'", regions)[1:] == (48, 16)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"shared_memory_region": "r"}, "together"),
        ({"shared_memory_byte_size": 4}, "together"),
        ({"shared_memory_region": "nope", "shared_memory_byte_size": 4}, "unknown shared memory region"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": 65}, "past the end of region 'r' \\(64 bytes\\)"),
        ({**ok, "shared_memory_offset": 49}, "offset 49 \\+ byte size 16 is past the end"),
        ({**ok, "shared_memory_offset": -1}, "shared_memory_offset"),
        ({**ok, "shared_memory_byte_size": "16"}, "shared_memory_byte_size"),
        ({**ok, "shared_memory_region": 5}, "string"),
    ]
    for params, message in cases:
        with pytest.raises(BadRequest, match=message):
            placement(params, "input 'X'", regions)


# ---------------------------------------------------------------- the registry, in process


@pytest.fixture
def segment() -> Iterator[Any]:
    from multiprocessing import shared_memory

    seg = shared_memory.SharedMemory(f"efshm-{uuid.uuid4().hex[:12]}", create=True, size=8192)
    try:
        yield seg
    finally:
        seg.close()
        seg.unlink()


@pytest.mark.parametrize("mapped", [True, False])
def test_registry_reads_and_writes_through_the_object(segment: Any, mapped: bool) -> None:
    reg = ShmRegistry(mapped=mapped)
    changes: list[dict[str, Any]] = []
    reg.on_change = changes.append
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.ndarray(x.shape, x.dtype, buffer=segment.buf, offset=4096 + 32)[:] = x
    reg.register("in", {"key": "/" + segment.name, "offset": 4096, "byte_size": 4096})
    assert reg.status() == [{"name": "in", "key": "/" + segment.name, "offset": 4096, "byte_size": 4096}]
    params = {"shared_memory_region": "in", "shared_memory_byte_size": 32, "shared_memory_offset": 32}
    got = reg.read("input 'X'", params, np.dtype("<f4"), [2, 4], 32)
    np.testing.assert_array_equal(got, x)
    with pytest.raises(BadRequest, match="shared_memory_byte_size is 32 bytes, but shape \\[4, 4\\]"):
        reg.read("input 'X'", params, np.dtype("<f4"), [4, 4], 64)
    out = reg.write("y", ("in", 0, 16), np.array([1, 2], dtype=np.int64))
    assert out == {"shared_memory_region": "in", "shared_memory_byte_size": 16}
    assert np.frombuffer(segment.buf, np.int64, 2, offset=4096).tolist() == [1, 2]
    with pytest.raises(BadRequest, match="needs 24 bytes, but shared_memory_byte_size gives it 16"):
        reg.write("y", ("in", 0, 16), np.array([1, 2, 3], dtype=np.int64))
    with pytest.raises(BadRequest, match="already registered"):
        reg.register("in", {"key": "/" + segment.name, "byte_size": 8})
    del got
    reg.unregister("in")
    assert reg.status() == [] and [c["op"] for c in changes] == ["register", "unregister"]
    with pytest.raises(BadRequest, match="no shared memory region 'in'"):
        reg.status("in")


def test_registry_refuses_regions_past_the_object_and_missing_objects(segment: Any) -> None:
    reg = ShmRegistry(mapped=True)
    with pytest.raises(BadRequest, match=r"past the end of shared memory object .* \(8192 bytes\)"):
        reg.register("r", {"key": segment.name, "offset": 4096, "byte_size": 4097})
    with pytest.raises(BadRequest, match="cannot open shared memory object"):
        reg.register("r", {"key": "/efshm-does-not-exist", "byte_size": 8})
    assert reg.status() == []


def test_a_shrunk_object_is_refused_not_faulted(segment: Any) -> None:
    reg = ShmRegistry(mapped=True)
    reg.register("r", {"key": segment.name, "byte_size": 8192})
    fd = os.open(f"/dev/shm/{segment.name}", os.O_RDWR)
    try:
        os.ftruncate(fd, 1024)  # a client shrinks the object after registering: reading would be a SIGBUS
    finally:
        os.close(fd)
    params = {"shared_memory_region": "r", "shared_memory_byte_size": 16, "shared_memory_offset": 4096}
    with pytest.raises(BadRequest, match="shrank to 1024 bytes"):
        reg.read("input 'X'", params, np.dtype("<f4"), [1, 4], 16)
    reg.close()


def test_apply_keeps_the_two_registries_in_step(segment: Any) -> None:
    agent, worker = ShmRegistry(mapped=False), ShmRegistry(mapped=True)

    def forward(change: dict[str, Any]) -> None:
        worker.apply(change)

    agent.on_change = forward
    agent.register("a", {"key": segment.name, "byte_size": 64})
    assert worker.status() == agent.status()
    assert worker.apply({"name": "gone", "key": "/efshm-does-not-exist", "byte_size": 8}) == "gone"
    assert worker.apply("not a change") is None
    agent.unregister("")
    assert worker.status() == [] == agent.status()


def test_parse_request_with_shared_memory(segment: Any) -> None:
    reg = ShmRegistry(mapped=True)
    reg.register("r", {"key": segment.name, "byte_size": 8192})
    x = np.ones((1, 4), np.float32)
    np.ndarray(x.shape, x.dtype, buffer=segment.buf)[:] = x
    body = (
        b'{"inputs":[{"name":"X","shape":[1,4],"datatype":"FP32","parameters":{"shared_memory_region":"r",'
        b'"shared_memory_byte_size":16}}],"outputs":[{"name":"y","parameters":{"shared_memory_region":"r",'
        b'"shared_memory_byte_size":64,"shared_memory_offset":1024}}]}'
    )
    req = parse_request(body, None, SPECS, shm=reg)
    np.testing.assert_array_equal(req.feeds["X"], x)
    assert req.placed == {"y": ("r", 1024, 64)} and req.outputs == ["y"]
    with pytest.raises(BadRequest, match="shared memory is not offered"):
        parse_request(body, None, SPECS)
    both = body.replace(b'"shared_memory_byte_size":16}', b'"shared_memory_byte_size":16},"data":[1,1,1,1]')
    with pytest.raises(BadRequest, match="not both"):
        parse_request(both, None, SPECS, shm=reg)
    del req
    reg.close()


# ---------------------------------------------------------------- a real agent: tritonclient, the Unix socket


@pytest.fixture(scope="module")
@starts_processes
def server(mlp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path, Any]]:
    port = free_port()
    uds = tmp_path_factory.mktemp("uds") / "oip.sock"
    exe = str(Path(sys.executable).with_name("edgefleet"))
    cmd = [exe, "serve", str(mlp_path), "--port", str(port), "--uds", str(uds)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    url = f"127.0.0.1:{port}"
    _wait_ready(url)
    yield url, mlp_path.stem, uds, proc
    proc.terminate()
    proc.wait(15)
    assert not uds.exists()  # the agent removes its socket file


def _wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} did not become ready")


@pytest.fixture
def regions() -> Iterator[Any]:
    import tritonclient.utils.shared_memory as shm

    made: list[Any] = []

    def make(size: int) -> tuple[str, Any]:
        key = f"/efshm-{uuid.uuid4().hex[:12]}"
        made.append(shm.create_shared_memory_region(key[1:], key, size))
        return key, made[-1]

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def test_tritonclient_system_shared_memory_matches_session_run(
    server: Any, mlp_path: Path, digits: Any, regions: Any
) -> None:
    import tritonclient.http as th
    import tritonclient.utils.shared_memory as shm

    url, name, _, _ = server
    client = th.InferenceServerClient(url)
    client.unregister_system_shared_memory()
    x = digits.x_test[:3].astype(np.float32)
    want_label, want_prob = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"]).run(
        ["label", "probabilities"], {"X": x}
    )
    in_key, in_handle = regions(x.nbytes)
    out_key, out_handle = regions(4096)
    shm.set_shared_memory_region(in_handle, [x])
    client.register_system_shared_memory("in", in_key, x.nbytes)
    client.register_system_shared_memory("out", out_key, 4096)
    status = client.get_system_shared_memory_status()
    assert {r["name"]: r["byte_size"] for r in status} == {"in": x.nbytes, "out": 4096}
    assert "system_shared_memory" in client.get_server_metadata()["extensions"]

    inp = th.InferInput("X", list(x.shape), "FP32")
    inp.set_shared_memory("in", x.nbytes)
    label_out = th.InferRequestedOutput("label")
    label_out.set_shared_memory("out", 1024)
    prob_out = th.InferRequestedOutput("probabilities")
    prob_out.set_shared_memory("out", 3072, offset=1024)
    res = client.infer(name, [inp], outputs=[label_out, prob_out])
    label, prob = res.get_output("label"), res.get_output("probabilities")
    assert label["parameters"] == {"shared_memory_region": "out", "shared_memory_byte_size": want_label.nbytes}
    assert "data" not in prob
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.int64, label["shape"]), want_label)
    got_prob = shm.get_contents_as_numpy(out_handle, np.float32, prob["shape"], offset=1024)
    np.testing.assert_array_equal(got_prob, want_prob)

    # shared memory in, binary out (a mix the extension allows)
    res = client.infer(name, [inp], outputs=[th.InferRequestedOutput("probabilities", binary_data=True)])
    np.testing.assert_array_equal(res.as_numpy("probabilities"), want_prob)

    client.unregister_system_shared_memory("in")
    assert [r["name"] for r in client.get_system_shared_memory_status()] == ["out"]
    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status() == []


def _post(url: str, path: str, doc: Any) -> httpx.Response:
    return httpx.post(f"http://{url}{path}", json=doc, timeout=10)


def test_bad_offsets_and_sizes_are_refused(server: Any, regions: Any) -> None:
    url, name, _, _ = server
    key, _handle = regions(64)
    base = "/v2/systemsharedmemory/region"
    r = _post(url, f"{base}/big/register", {"key": key, "offset": 0, "byte_size": 65})
    assert r.status_code == 400 and "past the end of shared memory object" in r.json()["error"]
    r = _post(url, f"{base}/nokey/register", {"key": "/efshm-missing-object", "byte_size": 8})
    assert r.status_code == 400 and "cannot open shared memory object" in r.json()["error"]
    assert _post(url, f"{base}/r64/register", {"key": key, "byte_size": 64}).status_code == 200
    r = _post(url, f"{base}/r64/register", {"key": key, "byte_size": 64})
    assert r.status_code == 400 and "already registered" in r.json()["error"]

    def infer(params: dict[str, Any], shape: list[int] | None = None) -> httpx.Response:
        shape = shape or [1, 64]
        doc = {"inputs": [{"name": "X", "shape": shape, "datatype": "FP32", "parameters": params}]}
        return _post(url, f"/v2/models/{name}/infer", doc)

    cases: list[tuple[dict[str, Any], str]] = [
        ({"shared_memory_region": "r64", "shared_memory_byte_size": 256}, "past the end of region 'r64'"),
        (
            {"shared_memory_region": "r64", "shared_memory_byte_size": 64, "shared_memory_offset": 8},
            "offset 8 + byte size 64 is past the end",
        ),
        ({"shared_memory_region": "nope", "shared_memory_byte_size": 64}, "unknown shared memory region"),
        ({"shared_memory_region": "r64"}, "must be given together"),
        ({"shared_memory_region": "r64", "shared_memory_byte_size": 64, "shared_memory_offset": -4}, "non-negative"),
    ]
    for params, message in cases:
        r = infer(params)
        assert r.status_code == 400, (params, r.text)
        assert message in r.json()["error"], (params, r.text)
    # 64 bytes hold 16 floats, not the 64 of shape [1, 64]: the dtype × shape size must match exactly
    r = infer({"shared_memory_region": "r64", "shared_memory_byte_size": 64}, [1, 64])
    assert r.status_code == 400 and "shape [1, 64] of float32 needs 256" in r.json()["error"]
    # an output whose room is too small
    big_key, _ = regions(1 << 16)
    assert _post(url, f"{base}/in/register", {"key": big_key, "byte_size": 1 << 16}).status_code == 200
    doc = {
        "inputs": [
            {
                "name": "X",
                "shape": [1, 64],
                "datatype": "FP32",
                "parameters": {"shared_memory_region": "in", "shared_memory_byte_size": 256},
            }
        ],
        "outputs": [
            {"name": "probabilities", "parameters": {"shared_memory_region": "r64", "shared_memory_byte_size": 8}}
        ],
    }
    r = _post(url, f"/v2/models/{name}/infer", doc)
    assert r.status_code == 400 and "needs 40 bytes, but shared_memory_byte_size gives it 8" in r.json()["error"]
    r = httpx.get(f"http://{url}{base}/missing/status")
    assert r.status_code == 400 and "no shared memory region 'missing'" in r.json()["error"]
    r = httpx.get(f"http://{url}{base}/r64/register")
    assert r.status_code == 405
    assert _post(url, "/v2/systemsharedmemory/unregister", None).status_code == 200


def test_infer_over_the_unix_socket(server: Any, mlp_path: Path, digits: Any) -> None:
    _, name, uds, _ = server
    x = digits.x_test[:2].astype(np.float32)
    want = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"]).run(["probabilities"], {"X": x})[0]
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(uds)), base_url="http://local") as c:
        assert c.get("/v2/health/ready").status_code == 200
        doc = {"inputs": [{"name": "X", "shape": [2, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
        r = c.post(f"/v2/models/{name}/infer", json=doc)
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
        np.testing.assert_allclose(np.array(out["probabilities"]["data"]).reshape(2, -1), want, rtol=1e-6)


def test_regions_survive_a_worker_restart(server: Any, mlp_path: Path, digits: Any, regions: Any) -> None:
    """The agent keeps the registry and sends it with ``serve``: a restarted worker maps the regions again."""
    import tritonclient.http as th
    import tritonclient.utils.shared_memory as shm

    url, name, uds, proc = server
    client = th.InferenceServerClient(url)
    client.unregister_system_shared_memory()
    x = digits.x_test[:1].astype(np.float32)
    key, handle = regions(x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    client.register_system_shared_memory("keep", key, x.nbytes)
    client.close()
    worker = psutil.Process(proc.pid).children()[0]
    worker.kill()
    worker.wait(10)
    want = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"]).run(["probabilities"], {"X": x})[0]
    deadline = time.monotonic() + 60
    while True:  # 503 from the agent until the restarted worker serves (or a connection it closed): poll
        try:
            client = th.InferenceServerClient(url)
            inp = th.InferInput("X", list(x.shape), "FP32").set_shared_memory("keep", x.nbytes)
            res = client.infer(name, [inp], outputs=[th.InferRequestedOutput("probabilities")])
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    np.testing.assert_array_equal(res.as_numpy("probabilities"), want)
    fresh = psutil.Process(proc.pid).children()[0]
    assert fresh.pid != worker.pid
    # mapped in the new worker itself (it serves the port): the agent sent the region with ``serve``
    assert any(key[1:] in m.path for m in fresh.memory_maps(grouped=False))
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(uds)), base_url="http://local") as c:
        assert [r["name"] for r in c.get("/v2/systemsharedmemory/status").json()] == ["keep"]
    client.unregister_system_shared_memory()


@pytest.mark.process
def test_unix_socket_answers_503_without_a_worker_and_replaces_only_stale_sockets(tmp_path: Path) -> None:
    """The agent's own listener (no worker yet): the 503 of the TCP port, on the Unix socket; a socket file left by
    a dead server is replaced, any other file is refused."""
    import asyncio
    import socket

    from edgefleet.agent.oip import OIPApp
    from edgefleet.agent.service import InferenceService
    from edgefleet.agent.uds import serve_uds
    from edgefleet.errors import AgentError

    path = tmp_path / "api.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody answers on it
    (tmp_path / "plain").write_text("not a socket")

    async def main() -> tuple[bytes, bytes]:
        server = await serve_uds(OIPApp(InferenceService()), path)
        try:
            with pytest.raises(AgentError, match="not a socket"):
                await serve_uds(OIPApp(InferenceService()), tmp_path / "plain")
            reader, writer = await asyncio.open_unix_connection(str(path))
            body = b'{"inputs":[{"name":"X","shape":[1],"datatype":"FP32","data":[1]}]}'
            writer.write(
                b"POST /v2/models/m/infer HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            answer = await asyncio.wait_for(reader.readexactly(length), 10)
            writer.close()
            return head, answer
        finally:
            server.close()

    head, answer = asyncio.run(main())
    assert head.startswith(b"HTTP/1.1 503") and b"no model installed yet" in answer
    assert not path.exists()
