"""The operator API's OpenAPI document: a response model per route that round-trips what a populated server really
answers (no key lost, none undeclared), the bearer security schemes, one tag per route, /docs and /redoc with no
asset from the internet, and a conflicting publish answered 409."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import TypeAdapter

from _cp_support import CP, build_pkg
from edgefleet.agent.sampling import seal
from edgefleet.controlplane import apidocs, devices
from edgefleet.controlplane.api.rollouts import rollout_dict
from edgefleet.controlplane.auth import MATRIX, Access, effective_routes
from edgefleet.controlplane.db import Device, Rollout
from edgefleet.controlplane.reconciler import reconcile_once

A = "/api/v1"
TAGS = {"tokens", "audit", "fleet", "devices", "groups", "models", "release-policy", "rollouts", "compat", "enrollment"}


def _operator_ops(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (m.upper(), p)
        for p, ops in spec["paths"].items()
        for m, op in ops.items()
        if p.startswith(A) and {"apiToken": []} in op.get("security", [])
    }


class Recorder:
    """Calls the API as admin and keeps every (method, path template, status, body) for the round-trip check."""

    def __init__(self, cp: CP) -> None:
        self.cp = cp
        self.seen: list[tuple[str, str, int, Any]] = []

    def __call__(self, method: str, template: str, token: str | None = None, **kw: Any) -> Any:
        params = kw.pop("path", {})
        path = A + template.format(**params)
        r = self.cp.http.request(method, path, headers={**self.cp.h(token), **kw.pop("headers", {})}, **kw)
        assert r.status_code < 400, (method, path, r.status_code, r.text)
        self.seen.append((method, A + template, r.status_code, r.json()))
        return r.json()


@pytest.fixture(scope="module")
def populated(mlp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CP, Recorder]]:
    """A server with two versions (one with a drift reference), bench and gate evidence, devices in a group, a
    pinned device, release-policy overrides, a cleared compat cell, rotated and revoked tokens, and a rollout
    that has run a reconcile step and been paused: every operator route is called at least once."""
    d = tmp_path_factory.mktemp("schema")
    cp = CP(d, f"sqlite:///{d / 'cp.db'}")
    call = Recorder(cp)
    octet = {"Content-Type": "application/octet-stream"}
    v1 = call(
        "POST", "/packages", content=build_pkg(mlp_path, d, "1.0.0", reference_calls=40).read_bytes(), headers=octet
    )
    v2 = call("POST", "/packages", content=build_pkg(mlp_path, d / "b", "2.0.0").read_bytes(), headers=octet)
    for v in (v1, v2):
        cp.attach_gate(v["model"], v["version"], v["package_sha256"])
    ver = {"name": "digits", "version": "1.0.0"}
    call("PUT", "/models/{name}/versions/{version}/gate", path=ver, json={"passed": True, "status": "pass"})
    cp.attach_gate("digits", "1.0.0", v1["package_sha256"])
    bench = {
        "compat": [
            {"tier": "rpi4", "runtime_version": "1.32.0", "model_sha256": v1["model_sha256"], "result": "failed"}
        ]
    }
    call("PUT", "/models/{name}/versions/{version}/bench", path=ver, json=bench)
    call("POST", "/models/{name}/versions/{version}/promote", path=ver)
    call("PUT", "/release-policy", json={"require_bench": False, "reason": "test"})
    call("PUT", "/models/{name}/release-policy", path={"name": "digits"}, json={"require_gate": True})
    call("PUT", "/models/{name}/release-policy", path={"name": "other"}, json={"require_bench": None})
    call("DELETE", "/models/{name}/release-policy", path={"name": "other"})
    sample_key = "5" * 64  # an operator's X25519 public key (any 32 bytes are one)
    lab = {
        "checkin_interval_s": 5,
        "remote_logs": True,
        "crash_reports": True,
        "input_sampling": True,
        "sample_public_key": sample_key,
    }
    call("PUT", "/groups/{name}", path={"name": "lab"}, json={"channel": "stable", "config": lab})
    enrolled = call("POST", "/enrollment-tokens", json={"tier": "rpi4", "group": "lab"})
    assert enrolled["group"] == "lab"
    devs = [cp.device("rpi4", group="lab") for _ in range(3)]
    for dev in devs:
        dev.report(model="digits", version="1.0.0", events=[("committed", None)], requests=120)
    call(
        "POST",
        "/compat/clear",
        json={"tier": "rpi4", "runtime_version": "1.32.0", "model": "digits", "version": "1.0.0", "reason": "t"},
    )
    one = {"device_id": devs[0].id}
    call("POST", "/devices/{device_id}/pin", path=one, json={"version": "1.0.0", "model": "digits"})
    call("POST", "/devices/{device_id}/unpin", path=one)
    call("POST", "/devices/{device_id}/group", path=one, json={"group": "lab"})
    call("POST", "/devices/{device_id}/rotate-credential", path=one)
    call("POST", "/devices/{device_id}/rotate-key", path=one)
    call("POST", "/devices/{device_id}/logs/request", path=one, json={"since_s": 600})
    call("GET", "/devices/{device_id}/logs", path=one)  # asked, not answered yet
    since = devs[0].desired()["send_logs_since"]
    answer = {"since": since, "lines": ["2026-01-01T00:00:00Z INFO edgefleet.agent: hello"], "dropped": 0}
    r = cp.http.post(f"/api/v1/devices/{devs[0].id}/logs", json=answer, headers=cp.h(devs[0].credential))
    assert r.status_code == 204, r.text
    call("GET", "/devices/{device_id}/logs", path=one)  # answered
    crash = {"crash_id": "c1", "at": since, "reason": "worker exited (exit -11)", "exit_code": -11, "signal": "SIGSEGV"}
    r = cp.http.post(
        f"/api/v1/devices/{devs[0].id}/crashes", json={"reports": [crash]}, headers=cp.h(devs[0].credential)
    )
    assert r.status_code == 200, r.text
    call("GET", "/devices/{device_id}/crashes", path=one)
    sample = seal(
        {"X": np.zeros((1, 4), np.float32)}, sample_key, at=datetime.now(UTC), device_id=devs[0].id, model="digits",
        version="1.0.0", sample_id="s1",
    )  # fmt: skip
    r = cp.http.post(
        f"/api/v1/devices/{devs[0].id}/samples",
        json={"samples": [sample.model_dump(mode="json")]},
        headers=cp.h(devs[0].credential),
    )
    assert r.status_code == 200, r.text
    call("GET", "/devices/{device_id}/samples", path=one)
    call("GET", "/devices/{device_id}/samples/{sample_id}", path={**one, "sample_id": "s1"})
    call("POST", "/groups/{name}/rotate-credential", path={"name": "lab"}, params={"key": "true"})
    call("PUT", "/groups/{name}", path={"name": "lab"}, json={"pinned_model": "digits", "pinned_version": "1.0.0"})
    call("PUT", "/groups/{name}", path={"name": "lab"}, json={"unpin": True})
    spare = cp.device("rpi4")
    call("POST", "/devices/{device_id}/revoke", path={"device_id": spare.id})
    call("POST", "/devices/{device_id}/decommission", path={"device_id": spare.id})
    policy = {"waves": [50.0, 100.0], "bake_s": 0, "min_devices": 1, "min_requests": 0}
    start = {"model": "digits", "version": "2.0.0", "policy": policy}
    call("POST", "/rollouts/plan", json=start)
    rid = call("POST", "/rollouts", json=start)["rollout_id"]
    reconcile_once(cp.store)
    for action in ("pause", "resume", "pause"):
        call("POST", f"/rollouts/{{rollout_id}}/{action}", path={"rollout_id": rid}, json={"reason": "test"})
    call("POST", "/rollouts/{rollout_id}/rollback", path={"rollout_id": rid})
    call("POST", "/rollouts", json={**start, "tier": "nowhere"})  # blocked at once: a warning, no device
    rid2 = call("GET", "/rollouts")[0]["rollout_id"]
    call("POST", "/rollouts/{rollout_id}/abort", path={"rollout_id": rid2})
    created = call("POST", "/tokens", json={"role": "viewer", "name": "ci"})
    rotated = call("POST", "/tokens/{token_id}/rotate", path={"token_id": created["id"]}, json={"grace_s": 60})
    call("DELETE", "/tokens/{token_id}", path={"token_id": rotated["id"]})
    call("GET", "/whoami")
    for template, params in [
        ("/tokens", {}),
        ("/audit", {}),
        ("/fleet", {}),
        ("/fleet/field-accuracy", {}),
        ("/compat", {}),
        ("/devices", {}),
        ("/devices/keys", {}),
        ("/devices/{device_id}", one),
        ("/devices/{device_id}", {"device_id": spare.id}),
        ("/groups", {}),
        ("/models", {}),
        ("/models/{name}", {"name": "digits"}),
        ("/models/{name}/versions/{version}", ver),
        ("/models/{name}/versions/{version}", {"name": "digits", "version": "2.0.0"}),
        ("/release-policy", {}),
        ("/models/{name}/release-policy", {"name": "digits"}),
        ("/models/{name}/release-policy", {"name": "unknown"}),
        ("/rollouts/{rollout_id}", {"rollout_id": rid}),
        ("/rollouts/{rollout_id}", {"rollout_id": rid2}),
    ]:
        call("GET", template, path=params)
    yield cp, call
    cp.close()


def _route_models(cp: CP) -> dict[tuple[str, str], Any]:
    out = {}
    for route, path, methods in effective_routes(cp.app.routes):
        for m in methods or ():
            out[(m, path)] = getattr(route, "response_model", None)
    return out


def test_every_operator_route_has_a_model_that_round_trips_real_answers(populated: tuple[CP, Recorder]) -> None:
    cp, call = populated
    models = _route_models(cp)
    covered = set()
    for method, template, _status, body in call.seen:
        model = models[(method, template)]
        assert model is not None, f"{method} {template} has no response model"
        adapter: TypeAdapter[Any] = TypeAdapter(model)
        # strict models: a key the model does not declare fails here (and in the server, as a 500)
        value = adapter.validate_python(body)
        again = adapter.dump_python(value, mode="json", by_alias=True, exclude_unset=True)
        assert again == body, f"{method} {template}: the model changes the body"
        covered.add((method, template))
    spec = cp.http.get("/openapi.json").json()
    assert _operator_ops(spec) - covered == set(), "operator routes the populated server never called"


def test_the_api_answers_what_the_routes_build(populated: tuple[CP, Recorder]) -> None:
    """The response model drops nothing: a device and a rollout as the routes' own dict builders make them."""
    cp, call = populated
    with cp.store.db.session() as s:
        d = s.get(Device, call("GET", "/devices")[0]["device_id"])
        assert d is not None
        built = devices.device_dict(d, overdue_after_s=cp.settings.overdue_after_s)
        r = s.get(Rollout, call("GET", "/rollouts")[-1]["rollout_id"])
        assert r is not None
        rollout = rollout_dict(s, r, full=True)
    got = call("GET", "/devices/{device_id}", path={"device_id": d.id})
    assert set(got) - {"desired_state"} == set(built)
    assert {k: got[k] for k in built if k not in ("overdue", "last_seen")} == {
        k: v for k, v in built.items() if k not in ("overdue", "last_seen")
    }
    assert got["desired_state"]["device_id"] == d.id
    assert call("GET", "/rollouts/{rollout_id}", path={"rollout_id": r.id}) == rollout


def test_every_operator_route_documents_its_body_and_one_resource_tag(populated: tuple[CP, Recorder]) -> None:
    cp, _ = populated
    spec = cp.http.get("/openapi.json").json()
    for method, path in _operator_ops(spec):
        op = spec["paths"][path][method.lower()]
        ok = next(v for k, v in op["responses"].items() if k.startswith("2"))
        schema = ok["content"]["application/json"]["schema"]
        assert "$ref" in schema or "$ref" in schema.get("items", {}), f"{method} {path} answers a bare {schema}"
        assert len(op["tags"]) == 1 and op["tags"][0] in TAGS, (method, path, op["tags"])
    schemas = spec["components"]["schemas"]
    assert schemas["Device"]["additionalProperties"] is False
    assert "global" in schemas["ReleasePolicyDoc"]["properties"]
    assert "from" in schemas["RolloutTransition"]["properties"]


def test_security_schemes_match_the_authorization_matrix(populated: tuple[CP, Recorder]) -> None:
    cp, _ = populated
    spec = cp.http.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["apiToken"]["type"] == "http" and schemes["apiToken"]["scheme"] == "bearer"
    assert schemes["deviceCredential"] == {**schemes["deviceCredential"], "type": "http", "scheme": "bearer"}
    documented = {(m.upper(), p): op for p, ops in spec["paths"].items() for m, op in ops.items()}
    for (method, path), access in MATRIX.items():
        op = documented.get((method, path))
        if op is None:
            continue  # not in the document: the dashboard, /docs, the TUF mount
        security = op.get("security", [])
        if access >= Access.viewer:
            assert security == [{"apiToken": []}], (method, path, security)
        elif access is Access.device:
            assert security == [{"deviceCredential": []}], (method, path, security)
        else:
            assert security == [], (method, path, security)


def test_security_declaration_changes_no_answer(populated: tuple[CP, Recorder]) -> None:
    cp, _ = populated
    r = cp.http.get(f"{A}/devices")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"] == "AuthError" and "missing API token" in r.json()["detail"]
    r = cp.http.get(f"{A}/devices", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401 and r.json()["error"] == "AuthError"
    assert cp.http.get("/metrics", headers=cp.h()).status_code == 200


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "spec-url") and value:
                self.urls.append(value)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_local_assets(populated: tuple[CP, Recorder], page: str) -> None:
    cp, _ = populated
    r = cp.http.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://", r.text), "the page names a URL on another host"
    parser = _Assets()
    parser.feed(r.text)
    scripts = [u for u in parser.urls if u.endswith(".js")]
    assert scripts and all(u.startswith("/static/") for u in scripts), parser.urls
    for url in parser.urls:
        if url.startswith("data:"):
            continue
        assert url.startswith("/"), url
        got = cp.http.get(url)
        assert got.status_code == 200, url
        want = {".js": "javascript", ".css": "text/css", ".json": "application/json"}[Path(url).suffix]
        assert want in got.headers["content-type"], (url, got.headers["content-type"])
    if page == "/docs":
        assert "/static/swagger-ui.css" in parser.urls and "/openapi.json" in r.text
        assert "SwaggerUIBundle" in cp.http.get("/static/swagger-ui-bundle.js").text
        assert cp.http.get("/docs/oauth2-redirect").status_code == 200


def test_vendored_assets_ship_with_their_licenses() -> None:
    static = Path(apidocs.__file__).parent / "dashboard" / "static"
    for name in apidocs.ASSETS:
        assert (static / name).stat().st_size > 100_000, name
    licenses = {p.name for p in (static / "third-party").iterdir()}
    assert {"swagger-ui-dist.LICENSE", "swagger-ui-dist.NOTICE", "redoc.LICENSE"} <= licenses


def test_a_conflicting_publish_is_409_and_the_same_package_again_is_not(
    populated: tuple[CP, Recorder], mlp_path: Path, tmp_path: Path
) -> None:
    cp, _ = populated
    other = build_pkg(mlp_path, tmp_path, "1.0.0", tiers=["rpi4"])  # digits 1.0.0 again, other content
    h = {**cp.h(), "Content-Type": "application/octet-stream"}
    r = cp.http.post(f"{A}/packages", content=other.read_bytes(), headers=h)
    assert r.status_code == 409 and r.json()["error"] == "ConflictError", r.text
    assert "already published with different content" in r.json()["detail"]
    versions = cp.api("GET", f"{A}/models/digits")["versions"]
    assert [v["version"] for v in versions] == ["1.0.0", "2.0.0"]
