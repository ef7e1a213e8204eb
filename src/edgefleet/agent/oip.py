"""The Open Inference Protocol v2 REST surface (KServe v2) as a plain ASGI app.

Routes: ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/{m}[/versions/{v}]``,
``…/ready``, ``POST …/infer`` (JSON tensors and the binary tensor extension), ``GET /metrics``.
No Content-Type is required. Every error is a 4xx/5xx with ``{"error": "..."}`` — tritonclient reports anything
else as a decode failure. The infer path has its own strict parser (``codec.py``) instead of a validation
framework; each response goes out as one ``http.response.body`` message.
"""

from __future__ import annotations

import json
import time
from typing import Any

from edgefleet import __version__
from edgefleet.agent.codec import DTYPE_TO_OIP, BadRequest, encode_response, parse_request
from edgefleet.agent.service import InferenceService

__all__ = ["MAX_BODY", "OIPApp"]

MAX_BODY = 64 * 1024 * 1024
_JSON = [(b"content-type", b"application/json")]

_OUTCOME = {400: "bad_request", 404: "not_found", 413: "bad_request", 503: "unavailable", 500: "model_error"}


def _dims(shape: list[Any]) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape]


class OIPApp:
    def __init__(self, service: InferenceService, *, live: bool = True) -> None:
        self.service = service
        self.live = live
        self.server_meta = json.dumps(
            {"name": "edgefleet", "version": __version__, "extensions": ["binary_tensor_data"]}
        ).encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        try:
            if path.endswith("/infer") and path.startswith("/v2/models/"):
                if method != "POST":
                    raise BadRequest("use POST for infer", 405)
                await self._infer(scope, receive, send, path)
                return
            if method not in ("GET", "HEAD"):
                raise BadRequest(f"{method} is not allowed on {path}", 405)
            await self._get(path, send)
        except BadRequest as err:
            await _reply(send, err.status, {"error": err.message})

    async def _get(self, path: str, send: Any) -> None:
        svc = self.service
        if path == "/v2/health/live":
            await _reply(send, 200 if self.live else 503, {"live": self.live})
        elif path == "/v2/health/ready":
            if svc.backend is None:
                raise BadRequest(f"not ready: {svc.unavailable_reason}", 503)
            await _reply(send, 200, {"ready": True})
        elif path in ("/v2", "/v2/"):
            await _send(send, 200, self.server_meta, _JSON)
        elif path == "/metrics":
            await _send(send, 200, svc.metrics.render(), [(b"content-type", b"text/plain; version=0.0.4")])
        elif path.startswith("/v2/models/"):
            parts = path[len("/v2/models/") :].split("/")
            ready = parts[-1] == "ready"
            if ready:
                parts = parts[:-1]
            self._model(parts)
            info = svc.info
            assert info is not None
            if ready:
                await _reply(send, 200, {"name": info.name, "ready": True})
            else:
                meta = {
                    "name": info.name,
                    "versions": [info.version],
                    "platform": info.platform,
                    "inputs": [
                        {
                            "name": s["name"],
                            "datatype": DTYPE_TO_OIP.get(s["dtype"], s["dtype"]),
                            "shape": _dims(s["shape"]),
                        }
                        for s in info.inputs
                    ],
                    "outputs": [
                        {
                            "name": s["name"],
                            "datatype": DTYPE_TO_OIP.get(s["dtype"], s["dtype"]),
                            "shape": _dims(s["shape"]),
                        }
                        for s in info.outputs
                    ],
                }
                await _reply(send, 200, meta)
        else:
            raise BadRequest(f"no route {path}", 404)

    def _model(self, parts: list[str]) -> None:
        """Check that ``parts`` ([m] or [m, 'versions', v]) names the served model, else 404/503."""
        name = parts[0] if parts else ""
        version = None
        if len(parts) == 3 and parts[1] == "versions":
            version = parts[2]
        elif len(parts) != 1 or not name:
            raise BadRequest("no such route; use /v2/models/{model}[/versions/{version}]", 404)
        info = self.service.info
        if info is None:
            raise BadRequest(f"model {name!r} is not available: {self.service.unavailable_reason}", 503)
        if name != info.name:
            raise BadRequest(f"unknown model {name!r}; this device serves {info.name!r}", 404)
        if version is not None and version != info.version:
            raise BadRequest(f"unknown version {version!r} of {name!r}; this device serves {info.version!r}", 404)

    async def _infer(self, scope: dict[str, Any], receive: Any, send: Any, path: str) -> None:
        t0 = time.perf_counter()
        svc = self.service
        try:
            self._model(path[len("/v2/models/") : -len("/infer")].split("/"))
            header_length = None
            for k, v in scope["headers"]:
                if k == b"inference-header-content-length":
                    try:
                        header_length = int(v)
                    except ValueError:
                        raise BadRequest("Inference-Header-Content-Length must be an integer")
            body = await _body(receive)
            info = svc.info
            assert info is not None
            req = parse_request(body, header_length, info.inputs)
            known = {s["name"] for s in info.outputs}
            for o in req.outputs or ():
                if o not in known:
                    raise BadRequest(f"unknown output {o!r}; the model has {sorted(known)}")
            results, compute = await svc.infer(req.feeds, req.outputs)
            payload, json_len = encode_response(info.name, info.version, req.id, results, req.binary)
        except BadRequest as err:
            svc.record(_OUTCOME.get(err.status, "bad_request"), None)
            await _reply(send, err.status, {"error": err.message})
            return
        headers = list(_JSON)
        if json_len is not None:
            headers = [
                (b"content-type", b"application/octet-stream"),
                (b"inference-header-content-length", str(json_len).encode()),
            ]
        await _send(send, 200, payload, headers)
        svc.record("ok", time.perf_counter() - t0, compute)


async def _body(receive: Any) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise BadRequest("client disconnected")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise BadRequest(f"request body over {MAX_BODY} bytes", 413)
        chunks.append(chunk)
        if not msg.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _reply(send: Any, status: int, doc: Any) -> None:
    await _send(send, status, json.dumps(doc).encode(), _JSON)


async def _send(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
