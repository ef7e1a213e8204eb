"""The infer path's caches (codec.PlanCache, encode_response's header cache, the worker's HTTPLoop): a request
header checked once is not trusted for what depends on the body or the regions, and a cached answer says exactly
what an uncached one says."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.codec import BadRequest, PlanCache, encode_response, parse_request
from edgefleet.agent.httpserver import DEFAULT_LIMITS, JSON_HEADERS, Respond
from edgefleet.agent.shm import ShmRegistry
from edgefleet.agent.worker.httpserve import HTTPLoop

SPECS: list[dict[str, Any]] = [{"name": "X", "dtype": "float32", "shape": [None, 4]}]
X = np.arange(4, dtype=np.float32).reshape(1, 4)
BIN_HEAD = json.dumps(
    {
        "inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    }
).encode()


def test_a_repeated_binary_header_is_checked_once_and_its_body_every_time() -> None:
    cache = PlanCache()
    first = parse_request(BIN_HEAD + X.tobytes(), len(BIN_HEAD), SPECS, cache=cache)
    assert list(cache.plans) == [BIN_HEAD]
    again = parse_request(BIN_HEAD + (X + 1).tobytes(), len(BIN_HEAD), SPECS, cache=cache)
    np.testing.assert_array_equal(first.feeds["X"], X)
    np.testing.assert_array_equal(again.feeds["X"], X + 1)
    assert (again.outputs, again.binary, again.id, again.placed) == (first.outputs, first.binary, None, None)
    # the body is still the request's own: too short, too long, each refused as without the cache
    for body in (BIN_HEAD + X.tobytes()[:8], BIN_HEAD + X.tobytes() + b"extra"):
        with pytest.raises(BadRequest) as cached:
            parse_request(body, len(BIN_HEAD), SPECS, cache=cache)
        with pytest.raises(BadRequest) as fresh:
            parse_request(body, len(BIN_HEAD), SPECS)
        assert cached.value.message == fresh.value.message


def test_headers_with_values_refused_headers_and_other_models_are_not_kept() -> None:
    cache = PlanCache()
    body = json.dumps({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()
    parse_request(body, None, SPECS, cache=cache)
    assert cache.plans == {}
    bad = BIN_HEAD.replace(b'"FP32"', b'"INT64"')
    with pytest.raises(BadRequest, match="datatype INT64"):
        parse_request(bad + X.tobytes(), len(bad), SPECS, cache=cache)
    assert cache.plans == {}
    parse_request(BIN_HEAD + X.tobytes(), len(BIN_HEAD), SPECS, cache=cache)
    other = [{"name": "X", "dtype": "float32", "shape": [None, 8]}]
    with pytest.raises(BadRequest, match="has shape"):  # checked against the new model, not the kept plan
        parse_request(BIN_HEAD + X.tobytes(), len(BIN_HEAD), other, cache=cache)
    with pytest.raises(BadRequest, match="decode to over 8 bytes"):  # and against the tensor cap in force
        parse_request(BIN_HEAD + X.tobytes(), len(BIN_HEAD), SPECS, 8, cache=cache)


@pytest.fixture
def segment() -> Iterator[Any]:
    from multiprocessing import shared_memory

    seg = shared_memory.SharedMemory(f"efcache-{uuid.uuid4().hex[:12]}", create=True, size=8192)
    try:
        yield seg
    finally:
        seg.close()
        seg.unlink()


def test_a_kept_shared_memory_header_still_checks_its_regions(segment: Any) -> None:
    reg = ShmRegistry(mapped=True)
    reg.register("r", {"key": segment.name, "byte_size": 8192})
    np.ndarray(X.shape, X.dtype, buffer=segment.buf)[:] = X
    body = (
        b'{"inputs":[{"name":"X","shape":[1,4],"datatype":"FP32","parameters":{"shared_memory_region":"r",'
        b'"shared_memory_byte_size":16}}],"outputs":[{"name":"y","parameters":{"shared_memory_region":"r",'
        b'"shared_memory_byte_size":64,"shared_memory_offset":1024}}]}'
    )
    cache = PlanCache()
    for _ in range(2):
        req = parse_request(body, None, SPECS, shm=reg, cache=cache)
        np.testing.assert_array_equal(req.feeds["X"], X)
        assert req.placed == {"y": ("r", 1024, 64)}
    del req
    reg.unregister("r")
    with pytest.raises(BadRequest, match="unknown shared memory region 'r'"):
        parse_request(body, None, SPECS, shm=reg, cache=cache)
    reg.register("r", {"key": segment.name, "byte_size": 512})  # smaller now: the output no longer fits
    with pytest.raises(BadRequest, match="past the end of region 'r'"):
        parse_request(body, None, SPECS, shm=reg, cache=cache)
    reg.close()


def test_a_cached_response_header_says_what_an_encoded_one_says() -> None:
    heads: dict[tuple[Any, ...], bytes] = {}
    route = {"edgefleet_route": "local"}
    for y in (np.array([[0.25, 0.75]], np.float32), np.array([[0.5, 0.5]], np.float32), np.zeros((2, 2), np.float32)):
        results = {"y": y, "label": np.array([1], np.int64)}
        binary = {"*": True}
        assert encode_response("m", "1", "id-1", results, binary, None, route, heads) == encode_response(
            "m", "1", "id-1", results, binary, None, route
        )
        placed = {"y": {"shared_memory_region": "r", "shared_memory_byte_size": y.nbytes}}
        assert encode_response("m", "1", None, results, binary, placed, route, heads) == encode_response(
            "m", "1", None, results, binary, placed, route
        )
    assert len(heads) == 4  # one per shape and placement; the values themselves are not in the header
    json_values = encode_response("m", "1", None, {"y": np.ones((1, 2), np.float32)}, {"*": False}, None, route, heads)
    assert json.loads(json_values[0])["outputs"][0]["data"] == [1.0, 1.0] and len(heads) == 4


def test_the_worker_loop_serves_a_plain_handler() -> None:
    """HTTPLoop with any handler: what serve_plain runs (the benchmark's null floor), outside the worker."""
    listen = socket.socket()
    listen.bind(("127.0.0.1", 0))
    listen.listen(8)

    def handle(method: str, path: str, headers: dict[bytes, bytes], body: bytes, respond: Respond) -> None:
        respond(200, json.dumps({"path": path, "size": len(body)}).encode(), JSON_HEADERS)

    loop = HTTPLoop([listen], handle, DEFAULT_LIMITS)
    with socket.create_connection(listen.getsockname()) as client:
        client.sendall(b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\nabc")
        client.setblocking(False)
        data = b""
        deadline = time.monotonic() + 10
        while b"}" not in data and time.monotonic() < deadline:
            assert loop.wait(time.monotonic() + 0.05) == []  # nothing of the caller's is registered
            loop.housekeeping(time.monotonic())
            try:
                data += client.recv(4096)
            except BlockingIOError:
                pass
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b'{"path": "/x", "size": 3}')
    loop.stop_accepting()
    loop.close()
