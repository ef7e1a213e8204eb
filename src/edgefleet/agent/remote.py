"""Hybrid edge/cloud routing's remote side: an OIP v2 client, and the router that decides, spends and counts.

:class:`RemoteClient` sends one request to any OIP v2 server (``POST {url}/v2/models/{model}/infer``) with the
binary tensor extension both ways (no JSON number lists for tensors; any KServe v2 server, Triton and
``edgefleet serve`` included, takes it) and reads the answer back into arrays, within a timeout. Every failure is
a :class:`~edgefleet.errors.RemoteUnavailable` with a bounded reason (timeout, unreachable, refused).

:class:`RemoteRouter` is what the agent's serving side holds while a policy may send requests remote: the
policy, the sliding-minute :class:`~edgefleet.agent.routing.Budget`, the client, and ``count_unsent`` (the
Prometheus counter and the telemetry window's ``remote_unsent``). The decision itself is
:func:`~edgefleet.agent.routing.route` (pure). It runs in the agent only (ADR 0105): the worker hands its
low-confidence answers over the control socket rather than calling out itself.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import httpx
import numpy as np

from edgefleet.agent.routing import Budget, Facts, Policy, Route, route
from edgefleet.dtypes import DTYPE_TO_OIP, OIP_TO_DTYPE
from edgefleet.errors import RemoteUnavailable

__all__ = ["RemoteAnswer", "RemoteClient", "RemoteRouter", "decode_response", "encode_request"]

_MAX_ANSWER = 256 * 1024 * 1024  # a remote answer larger than this is refused, not held


class RemoteAnswer(NamedTuple):
    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]


def encode_request(feeds: dict[str, np.ndarray], outputs: list[str] | None) -> tuple[bytes, int]:
    """An OIP infer body with binary inputs and binary outputs asked for: ``(body, JSON header length)``."""
    inputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, value in feeds.items():
        arr = np.asarray(value)
        dt = DTYPE_TO_OIP.get(arr.dtype.name)
        if dt is None:
            raise RemoteUnavailable(f"input {name!r} has dtype {arr.dtype}, which OIP cannot carry", "refused")
        raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        inputs.append(
            {"name": name, "shape": list(arr.shape), "datatype": dt, "parameters": {"binary_data_size": len(raw)}}
        )
        blobs.append(raw)
    doc: dict[str, Any] = {"inputs": inputs, "parameters": {"binary_data_output": True}}
    if outputs:
        doc["outputs"] = [{"name": o, "parameters": {"binary_data": True}} for o in outputs]
    head = json.dumps(doc, separators=(",", ":")).encode()
    return b"".join([head, *blobs]), len(head)


def decode_response(content: bytes, header_length: int | None) -> RemoteAnswer:
    """An OIP infer answer (JSON, or JSON header + binary outputs) as arrays; RemoteUnavailable ("refused") for
    anything that does not follow the protocol."""

    def bad(why: str) -> RemoteUnavailable:
        return RemoteUnavailable(f"the remote answer is not an OIP v2 infer response: {why}", "refused")

    if header_length is not None and not 0 <= header_length <= len(content):
        raise bad(f"Inference-Header-Content-Length {header_length} for a body of {len(content)} bytes")
    head = content if header_length is None else content[:header_length]
    try:
        doc = json.loads(head)
    except ValueError as err:
        raise bad(f"not JSON ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), list):
        raise bad("no outputs list")
    out: dict[str, np.ndarray] = {}
    pos = len(head)
    for o in doc["outputs"]:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise bad("an output without a name")
        name = o["name"]
        dtype_name = OIP_TO_DTYPE.get(o.get("datatype"))  # type: ignore[arg-type]
        shape = o.get("shape")
        if dtype_name is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise bad(f"output {name!r} has no numeric datatype or no shape")
        dtype = np.dtype(dtype_name).newbyteorder("<")
        count = int(np.prod(shape)) if shape else 1
        params = o.get("parameters")
        params = params if isinstance(params, dict) else {}
        size = params.get("binary_data_size")
        if size is not None:
            if header_length is None or not isinstance(size, int) or size != count * dtype.itemsize:
                raise bad(f"output {name!r}: binary_data_size {size!r} does not fit {shape} {o['datatype']}")
            if pos + size > len(content):
                raise bad(f"output {name!r}: the body ends before its {size} bytes")
            arr = np.frombuffer(content, dtype=dtype, count=count, offset=pos)
            pos += size
        else:
            data = o.get("data")
            if not isinstance(data, list) or len(data) != count:
                raise bad(f"output {name!r}: data does not fill {shape}")
            try:
                arr = np.asarray(data, dtype=dtype)
            except (TypeError, ValueError) as err:
                raise bad(f"output {name!r}: {err}") from None
        out[name] = arr.astype(dtype.newbyteorder("="), copy=False).reshape(shape)
    return RemoteAnswer(str(doc.get("model_name", "")), str(doc.get("model_version", "")), out)


class RemoteClient:
    """One remote OIP v2 server; a single connection pool, reused across calls."""

    def __init__(self, url: str, timeout_s: float, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._client = httpx.AsyncClient(timeout=timeout_s, transport=transport)

    async def infer(self, model: str, feeds: dict[str, np.ndarray], outputs: list[str] | None) -> RemoteAnswer:
        body, head = encode_request(feeds, outputs)
        headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(head)}
        url = f"{self.url}/v2/models/{model}/infer"
        try:
            r = await self._client.post(url, content=body, headers=headers)
        except httpx.TimeoutException:
            raise RemoteUnavailable(f"{url} did not answer within {self.timeout_s:g} s", "timeout") from None
        except httpx.HTTPError as err:
            raise RemoteUnavailable(f"{url} is unreachable: {err or type(err).__name__}", "unreachable") from None
        if r.status_code != 200:
            try:
                why = str(r.json().get("error", ""))[:300]
            except (ValueError, AttributeError):
                why = r.text[:300]
            raise RemoteUnavailable(f"{url} answered {r.status_code}: {why}", "refused")
        if len(r.content) > _MAX_ANSWER:
            raise RemoteUnavailable(f"{url} answered {len(r.content)} bytes, over {_MAX_ANSWER}", "refused")
        raw = r.headers.get("inference-header-content-length")
        if raw is not None and not raw.isdigit():
            raise RemoteUnavailable(f"{url} sent Inference-Header-Content-Length {raw[:40]!r}", "refused")
        return decode_response(r.content, int(raw) if raw is not None else None)

    async def aclose(self) -> None:
        await self._client.aclose()


class RemoteRouter:
    """The policy in force, its budget and client. ``count_unsent(reason)`` is called for every request routing
    wanted remote and did not send there (budget, timeout, unreachable, refused)."""

    def __init__(
        self,
        policy: Policy,
        count_unsent: Callable[[str], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        assert policy.remote_url is not None
        self.policy = policy
        self.count_unsent = count_unsent
        self.clock = clock
        self.budget = Budget(policy.budget_per_minute)
        self.client = RemoteClient(policy.remote_url, policy.timeout_s, transport)

    def decide(self, facts: Facts) -> Route:
        """:func:`route` with the budget's room filled in; a remote route spends one call, a request that could
        not go for the budget is counted."""
        now = self.clock()
        r = route(self.policy, dataclasses.replace(facts, budget_left=self.budget.left(now) > 0))
        if r.to == "remote":
            self.budget.spend(now)
        elif r.unsent:
            self.count_unsent("budget")
        return r

    async def infer(self, model: str, feeds: dict[str, np.ndarray], outputs: list[str] | None) -> RemoteAnswer:
        """Ask the remote (a route already decided ``remote``); a failure is counted, then raised."""
        try:
            return await self.client.infer(self.policy.remote_model or model, feeds, outputs)
        except RemoteUnavailable as err:
            self.count_unsent(err.reason)
            raise

    async def aclose(self) -> None:
        await self.client.aclose()
