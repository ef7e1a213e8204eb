"""The Open Inference Protocol v2 REST surface (KServe v2).

Routes: ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/{m}[/versions/{v}]``,
``…/ready``, ``POST …/infer`` (JSON tensors and the binary tensor extension), ``POST …/feedback`` (ground truth for
a served request id, ``feedback.py``), ``GET /metrics``.
No Content-Type is required. Every error is a 4xx/5xx with ``{"error": "..."}`` — tritonclient reports anything
else as a decode failure. The infer path has its own strict parser (``codec.py``) instead of a validation
framework.

:meth:`OIPApp.handle` is transport-agnostic and callback-based: the agent's HTTP server
(``httpserver.py``) calls it from ``data_received``, and an infer request is answered from the worker
connection's callback, with no task per request. ``OIPApp`` is also a plain ASGI app (``__call__``), for
embedding it in another server.

The same app runs inside the inference worker when the worker serves the port itself (ADR 0032), over a
service with the same interface (``worker/httpserve.py``'s ``WorkerService``): the app is typed against
``serving.Serving``, which both implement, so this module imports neither asyncio nor either service.
"""

from __future__ import annotations

import json
import time
from typing import Any

from edgefleet import __version__
from edgefleet.agent.codec import DTYPE_TO_OIP, BadRequest, PlanCache, encode_response, parse_request
from edgefleet.agent.feedback import Predictions, parse_feedback, top1
from edgefleet.agent.httpserver import JSON_HEADERS, MAX_BODY, HTTPLimits, Respond, error_body
from edgefleet.agent.serving import ServedModel, Serving

__all__ = ["MAX_BODY", "OIPApp"]

_BINARY_HEAD = b"content-type: application/octet-stream\r\ninference-header-content-length: "
_METRICS_HEADERS = b"content-type: text/plain; version=0.0.4\r\n"

# Every answer says where it came from (docs/agent.md, "Hybrid edge/cloud routing"): an OIP response parameter.
_LOCAL = {"edgefleet_route": "local"}
_REMOTE = {"edgefleet_route": "remote"}
_OUTCOME = {400: "bad_request", 404: "not_found", 413: "bad_request", 503: "unavailable", 500: "model_error"}


def _dims(shape: list[Any]) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape]


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


class OIPApp:
    def __init__(self, service: Serving, *, live: bool = True, limits: HTTPLimits | None = None) -> None:
        self.service = service
        self.live = live
        # The device's HTTP limits; the HTTP server takes them from here (serve_http). The infer path checks the
        # binary header length and the decoded tensors against them.
        self.limits = limits or HTTPLimits.for_device(None)
        # the service's shared memory regions (agent/shm.py), when it offers the extension
        self.shm = service.shm
        extensions = ["binary_tensor_data", *(["system_shared_memory"] if self.shm is not None else [])]
        self.server_meta = json.dumps({"name": "edgefleet", "version": __version__, "extensions": extensions}).encode()
        self._outputs_of: tuple[ServedModel, frozenset[str]] | None = None
        # Infer paths checked against the model they named (path -> that model), and request headers checked
        # against its inputs (codec.PlanCache): a keep-alive client repeats both, call after call.
        self._routes: dict[str, ServedModel] = {}
        self._plans = PlanCache()
        self._heads: dict[tuple[Any, ...], bytes] = {}  # response JSON headers (codec.encode_response)
        # predicted top-1 of recent requests that carried an id, for ground-truth feedback (agent/feedback.py)
        self.predictions = Predictions()

    # ------------------------------------------------------------------ the callback interface

    def handle(self, method: str, path: str, headers: dict[bytes, bytes], body: bytes, respond: Respond) -> None:
        """Answer one request through ``respond(status, body, header_lines)``, now or from a later callback."""
        try:
            if path.endswith("/infer") and path.startswith("/v2/models/"):
                if method != "POST":
                    raise BadRequest("use POST for infer", 405)
                self._infer(path, headers, body, respond)
                return
            if path.endswith("/feedback") and path.startswith("/v2/models/"):
                if method != "POST":
                    raise BadRequest("use POST for feedback", 405)
                respond(*self._feedback(path, body))
                return
            if path.startswith("/v2/systemsharedmemory/"):
                respond(200, self._shm_route(method, path, body), JSON_HEADERS)
                return
            if method not in ("GET", "HEAD"):
                raise BadRequest(f"{method} is not allowed on {path}", 405)
            if path == "/metrics":  # maybe answered later: the worker asks the agent, which holds the registry
                self.service.render_metrics(lambda payload: respond(200, payload, _METRICS_HEADERS))
                return
            status, payload, extra = self._get(path)
            respond(status, payload, extra)
        except BadRequest as err:
            respond(err.status, error_body(err.message), JSON_HEADERS)

    # ------------------------------------------------------------------ ASGI, for embedding

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
        import asyncio

        answer: asyncio.Future[tuple[int, bytes, bytes]] = asyncio.get_running_loop().create_future()

        def respond(status: int, payload: bytes, extra: bytes) -> None:
            if not answer.done():
                answer.set_result((status, payload, extra))

        try:
            body = await _body(receive)
        except BadRequest as err:
            respond(err.status, error_body(err.message), JSON_HEADERS)
        else:
            headers = {k.lower(): v for k, v in scope["headers"]}
            self.handle(scope["method"], scope["path"], headers, body, respond)
        status, payload, extra = await answer
        hdrs = [tuple(line.split(b": ", 1)) for line in extra.split(b"\r\n") if line]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*hdrs, (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    # ------------------------------------------------------------------ routes

    def _get(self, path: str) -> tuple[int, bytes, bytes]:
        svc = self.service
        if path == "/v2/health/live":
            return 200 if self.live else 503, _json({"live": self.live}), JSON_HEADERS
        if path == "/v2/health/ready":
            if not svc.ready:
                raise BadRequest(f"not ready: {svc.unavailable_reason}", 503)
            return 200, _json({"ready": True}), JSON_HEADERS
        if path in ("/v2", "/v2/"):
            return 200, self.server_meta, JSON_HEADERS
        if path.startswith("/v2/models/"):
            parts = path[len("/v2/models/") :].split("/")
            ready = parts[-1] == "ready"
            if ready:
                parts = parts[:-1]
            self._model(parts)
            info = svc.info
            assert info is not None
            if ready:
                return 200, _json({"name": info.name, "ready": True}), JSON_HEADERS
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
            return 200, _json(meta), JSON_HEADERS
        raise BadRequest(f"no route {path}", 404)

    def _feedback(self, path: str, body: bytes) -> tuple[int, bytes, bytes]:
        """Match ground truth to the prediction of the request it names; counted either way (an unknown or
        expired id is a 404, and counted as unmatched)."""
        self._model(path[len("/v2/models/") : -len("/feedback")].split("/"))
        rid, label = parse_feedback(body)
        predicted = self.predictions.take(rid)
        self.service.record_feedback(predicted, label)
        if predicted is None:
            raise BadRequest(self.predictions.unknown_message(rid), 404)
        doc = {"id": rid, "predicted": predicted, "label": label, "correct": predicted == label}
        return 200, _json(doc), JSON_HEADERS

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

    def _shm_route(self, method: str, path: str, body: bytes) -> bytes:
        """``GET …[/region/{name}]/status``, ``POST …/region/{name}/register``, ``POST …[/region/{name}]/unregister``
        (the system shared memory extension; agent/shm.py)."""
        from edgefleet.agent.shm import check_name, unquote

        shm = self.shm
        if shm is None:
            raise BadRequest("system shared memory is not offered on this server", 404)
        parts = path[len("/v2/systemsharedmemory/") :].split("/")
        action = parts[-1]
        if len(parts) == 3 and parts[0] == "region":
            name = check_name(unquote(parts[1]))
        elif len(parts) == 1:
            name = ""
        else:
            raise BadRequest(f"no route {path}", 404)
        if action not in ("status", "register", "unregister") or (action == "register" and not name):
            raise BadRequest(f"no route {path}", 404)
        want = "GET" if action == "status" else "POST"
        if method != want and not (want == "GET" and method == "HEAD"):
            raise BadRequest(f"use {want} for {action}", 405)
        if action == "status":
            return _json(shm.status(name))
        if action == "unregister":
            shm.unregister(name)
            return b"{}"
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise BadRequest("the register request is not valid JSON") from None
        shm.register(name, doc)
        return b"{}"

    def _known_outputs(self, info: ServedModel) -> frozenset[str]:
        cached = self._outputs_of
        if cached is None or cached[0] is not info:
            cached = self._outputs_of = (info, frozenset(s["name"] for s in info.outputs))
        return cached[1]

    def _infer(self, path: str, headers: dict[bytes, bytes], body: bytes, respond: Respond) -> None:
        t0 = time.perf_counter()
        svc = self.service
        try:
            info = svc.info
            if info is None or self._routes.get(path) is not info:
                self._model(path[len("/v2/models/") : -len("/infer")].split("/"))
                info = svc.info
                assert info is not None
                if len(self._routes) >= 16:
                    self._routes.clear()
                self._routes[path] = info
            raw = headers.get(b"inference-header-content-length")
            header_length = None
            if raw is not None:
                if not raw.isdigit() or len(raw) > 19:
                    raise BadRequest("Inference-Header-Content-Length must be a non-negative integer")
                header_length = int(raw)
                if header_length > self.limits.max_json_bytes:
                    raise BadRequest(
                        f"Inference-Header-Content-Length {header_length} is over the JSON cap of "
                        f"{self.limits.max_json_bytes} bytes",
                        413,
                    )
            req = parse_request(body, header_length, info.inputs, self.limits.max_tensor_bytes, self.shm, self._plans)
            if req.outputs:
                known = self._known_outputs(info)
                for o in req.outputs:
                    if o not in known:
                        raise BadRequest(f"unknown output {o!r}; the model has {sorted(known)}")
        except BadRequest as err:
            svc.record(_OUTCOME.get(err.status, "bad_request"), None)
            respond(err.status, error_body(err.message), JSON_HEADERS)
            return

        def done(results: dict[str, Any] | None, compute: float, err: BadRequest | None, via: Any = None) -> None:
            # via: the remote endpoint's answer (hybrid routing, agent/remote.py): its model and version, route remote
            if err is None:
                assert results is not None
                name, version, route = (info.name, info.version, _LOCAL) if via is None else (*via[:2], _REMOTE)
                try:
                    placed = None
                    shm = self.shm
                    if req.placed is not None and shm is not None:  # written before the answer the client waits on
                        placed = {n: shm.write(n, req.placed[n], results[n]) for n in req.placed if n in results}
                    payload, json_len = encode_response(
                        name, version, req.id, results, req.binary, placed, route, self._heads
                    )
                except BadRequest as bad:
                    err = bad
                else:
                    if json_len is None:
                        respond(200, payload, JSON_HEADERS)
                    else:
                        respond(200, payload, b"%s%d\r\n" % (_BINARY_HEAD, json_len))
                    # After the answer is on its way: bookkeeping never delays the response.
                    svc.record("ok" if via is None else "ok|remote", time.perf_counter() - t0, compute)
                    if req.id is not None and (predicted := top1(results)) is not None:
                        self.predictions.remember(req.id, predicted)
                    return
            svc.record(_OUTCOME.get(err.status, "bad_request"), None)
            respond(err.status, error_body(err.message), JSON_HEADERS)

        svc.submit(req.feeds, req.outputs, done)


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
