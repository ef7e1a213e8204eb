"""The Python SDK (edgefleet.Client): pinned to the server's OpenAPI document (one method per operator route, both
ways, returning that route's response model), its errors by status and by the server's error name, its transport
policy, and a session against a real server on loopback."""

from __future__ import annotations

import asyncio
import inspect
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import TypeAdapter

import edgefleet
from _cp_support import CP, build_pkg, gate_verdict
from edgefleet import apierrors, sdk
from edgefleet import errors as e
from edgefleet.config import ServerSettings
from edgefleet.controlplane.app import create_app
from edgefleet.controlplane.auth import effective_routes
from edgefleet.controlplane.reconciler import reconcile_once


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    d = tmp_path_factory.mktemp("sdk-app")
    a = create_app(ServerSettings(db=f"sqlite:///{d / 'cp.db'}", repo=d / "repo"))
    yield a
    a.state.context.db.dispose()


def _operator_ops(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (m.upper(), p)
        for p, ops in spec["paths"].items()
        for m, op in ops.items()
        if {"apiToken": []} in op.get("security", []) and p.startswith("/api/v1/")
    }


def _method(name: str) -> Any:
    """The function behind an OPERATIONS entry: "whoami" on Client, "devices.list" on Client's devices."""
    if "." not in name:
        return getattr(sdk.Client, name)
    resource, meth = name.split(".")
    owner = next(cls for cls, attr in sdk._RESOURCE_OF.items() if attr == resource)
    return getattr(getattr(sdk, owner), meth)


def test_every_operator_route_has_exactly_one_sdk_method_and_no_more(app: Any) -> None:
    ops = _operator_ops(app.openapi())
    assert len(ops) > 40
    assert set(sdk.OPERATIONS) == ops, (
        f"routes without an SDK method: {sorted(ops - set(sdk.OPERATIONS))}; "
        f"SDK methods without a route: {sorted(set(sdk.OPERATIONS) - ops)}"
    )
    assert len(set(sdk.OPERATIONS.values())) == len(sdk.OPERATIONS)
    # and every public method of a resource is in the table
    public = {"whoami"} | {
        f"{attr}.{n}"
        for cls, attr in sdk._RESOURCE_OF.items()
        for n, _ in inspect.getmembers(getattr(sdk, cls), inspect.isfunction)
        if not n.startswith("_")
    }
    assert public == set(sdk.OPERATIONS.values())
    assert set(sdk._RESOURCE_OF.values()) == {
        n for n, v in vars(sdk.Client("http://127.0.0.1:1", "t")).items() if isinstance(v, sdk._Resource)
    }


def test_each_sdk_method_returns_its_routes_response_model(app: Any) -> None:
    models = {
        (m, path): getattr(route, "response_model", None)
        for route, path, methods in effective_routes(app.routes)
        for m in methods or ()
    }
    for key, name in sdk.OPERATIONS.items():
        returns = typing.get_type_hints(_method(name), vars(sdk))["return"]
        assert returns == models[key], (key, name, returns, models[key])
        route_model: Any = models[key]
        assert TypeAdapter(returns).json_schema() == TypeAdapter(route_model).json_schema()


def _dummy(p: inspect.Parameter, hints: dict[str, Any], tmp: Path) -> Any:
    tp = hints[p.name]
    text = str(tp)
    if "Path" in text:
        f = tmp / "x.efpkg"
        f.write_bytes(b"x")
        return f
    if tp is int:
        return 7
    if "Mapping" in text:
        return {"k": 1}
    if tp is bool:
        return False
    return "x1"


def test_each_sdk_method_calls_the_route_the_table_names(tmp_path: Path) -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(404, json={"detail": "nothing here", "error": "NotFoundError"})

    c = sdk.Client("http://127.0.0.1:1", "tok", transport=httpx.MockTransport(answer))
    for (method, template), name in sdk.OPERATIONS.items():
        fn = _method(name)
        hints = typing.get_type_hints(fn, vars(sdk))
        params = list(inspect.signature(fn).parameters.values())[1:]
        required = [p for p in params if p.default is inspect.Parameter.empty]
        args = [_dummy(p, hints, tmp_path) for p in required if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        kwargs = {p.name: _dummy(p, hints, tmp_path) for p in required if p.kind is inspect.Parameter.KEYWORD_ONLY}
        target = c if "." not in name else getattr(c, name.split(".")[0])
        with pytest.raises(e.NotFoundError, match=r"nothing here \(HTTP 404\)"):
            getattr(target, fn.__name__)(*args, **kwargs)
        req = sent.pop()
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
        assert req.method == method and re.fullmatch(pattern, req.url.path), (name, req.method, req.url.path)
        assert req.headers["authorization"] == "Bearer tok"


@pytest.mark.parametrize(
    ("status", "body", "cls", "message"),
    [
        (401, {"detail": "missing API token", "error": "AuthError"}, e.AuthError, "missing API token"),
        (403, {"detail": "role viewer may not", "error": "ForbiddenError"}, e.ForbiddenError, "role viewer"),
        (404, {"detail": "no device d1"}, e.NotFoundError, "no device d1"),
        (409, {"detail": "already active", "error": "ConflictError"}, e.ConflictError, "already active"),
        (409, {"detail": "tier unsupported", "error": "IncompatibleError"}, e.IncompatibleError, "unsupported"),
        (413, {"detail": "over the cap", "error": "TooLargeError"}, e.TooLargeError, "over the cap"),
        (400, {"detail": "bad name", "error": "UsageError"}, e.UsageError, "bad name"),
        (422, {"detail": [{"loc": ["body", "tier"], "msg": "Field required"}]}, e.UsageError, "body.tier: Field"),
        (422, {"detail": "not a .efpkg", "error": "PackageError"}, e.PackageError, "not a .efpkg"),
        (418, {"detail": "odd", "error": "NotAnEdgefleetName"}, e.UsageError, "odd"),
        (500, {"detail": "boom", "error": "SystemExit"}, e.ServerError, "control plane failed: boom"),
        (503, {"detail": "upstream down"}, e.ServerUnreachable, "upstream down"),
    ],
)
@pytest.mark.parametrize("client", ["sdk", "async"])
def test_errors_come_back_as_edgefleet_errors(
    status: int, body: Any, cls: type, message: str, client: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One table for every operator API client: the SDK (which the CLI uses) and an async caller (the simulator)
    mapping its own ``httpx.AsyncClient``'s answers."""
    fixed = httpx.MockTransport(lambda r: httpx.Response(status, json=body))
    with pytest.raises(cls, match=re.escape(message)) as err:
        if client == "sdk":
            sdk.Client("http://127.0.0.1:1", "t", transport=fixed).devices.list()
        else:

            async def ask() -> None:
                async with httpx.AsyncClient(base_url="http://127.0.0.1:1", transport=fixed) as ac:
                    r = await ac.get("/api/v1/devices")
                raise apierrors.error_of(r)

            asyncio.run(ask())
    assert type(err.value) is cls and f"(HTTP {status})" in str(err.value)


def test_an_error_page_that_is_not_json_is_one_line() -> None:
    page = "<html>\n<body>502 Bad Gateway</body>\n</html>\n"
    err = apierrors.error_of(httpx.Response(502, text=page))
    assert type(err) is e.ServerUnreachable
    assert str(err) == "<html> <body>502 Bad Gateway</body> </html> (HTTP 502)"
    err = apierrors.error_of(httpx.Response(500, content=b""))
    assert type(err) is e.ServerError and str(err) == "the control plane failed: Internal Server Error (HTTP 500)"


def test_a_server_that_cannot_be_reached_or_is_not_edgefleet_says_so() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(e.ServerUnreachable, match=r"cannot reach the control plane at http://127\.0\.0\.1:1"):
        sdk.Client("http://127.0.0.1:1", "t", transport=httpx.MockTransport(down)).fleet.kpis()
    from edgefleet.cli.connection import client

    with pytest.raises(e.ServerUnreachable, match=r"cannot reach the control plane at http://127\.0\.0\.1:1"):
        client("http://127.0.0.1:1", "t").fleet.kpis()  # as the CLI builds it
    html = httpx.MockTransport(lambda r: httpx.Response(200, text="<html>", headers={"content-type": "text/html"}))
    with pytest.raises(e.EdgefleetError, match=re.escape("not JSON: is http://127.0.0.1:1 an edgefleet control plane")):
        sdk.Client("http://127.0.0.1:1", "t", transport=html).whoami()


def test_transport_policy_and_arguments() -> None:
    with pytest.raises(e.UsageError, match=re.escape("refusing cleartext http://fleet.example.com")):
        sdk.Client("http://fleet.example.com", "t")
    sdk.Client("http://fleet.example.com", "t", insecure_http=True).close()
    with pytest.raises(e.UsageError, match="no API token"):
        sdk.Client("https://fleet.example.com", "")
    with pytest.raises(e.UsageError, match=re.escape("CA file /nonexistent.pem does not exist")):
        sdk.Client("https://fleet.example.com", "t", ca_file="/nonexistent.pem")
    with pytest.raises(e.UsageError, match="no package at"):
        sdk.Client("https://fleet.example.com", "t").models.publish("/nonexistent.efpkg")
    assert edgefleet.Client is sdk.Client


def test_a_newer_servers_extra_keys_are_accepted() -> None:
    body = {"name": "ci", "role": "viewer", "since": "a field from the future"}
    c = sdk.Client("http://127.0.0.1:1", "t", transport=httpx.MockTransport(lambda r: httpx.Response(200, json=body)))
    me = c.whoami()
    assert me.name == "ci" and me.role == "viewer" and me.model_extra == {"since": "a field from the future"}


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CP]:
    d = tmp_path_factory.mktemp("sdk")
    c = CP(d, f"sqlite:///{d / 'cp.db'}")
    yield c
    c.close()


def test_a_release_through_the_sdk(cp: CP, mlp_path: Path, tmp_path: Path) -> None:
    with edgefleet.Client(cp.url, cp.admin) as c:
        assert c.whoami().role == "admin"
        v1 = c.models.publish(build_pkg(mlp_path, tmp_path / "a", "1.0.0"))
        assert (v1.model, v1.version, v1.channel) == ("digits", "1.0.0", "dev")
        detail = c.models.attach_gate("digits", "1.0.0", gate_verdict(True), package_sha256=v1.package_sha256)
        assert detail.release.allowed and detail.release.gate_matches_package
        assert c.models.promote("digits", "1.0.0").channel == "canary"
        with pytest.raises(e.ConflictError, match="already published with different content"):
            c.models.publish(build_pkg(mlp_path, tmp_path / "b", "1.0.0", tiers=["rpi4"]))
        v2 = c.models.publish(build_pkg(mlp_path, tmp_path / "c", "2.0.0"))
        with pytest.raises(e.ConflictError, match="no passing gate verdict"):
            c.rollouts.start("digits", "2.0.0")
        c.models.attach_gate("digits", "2.0.0", gate_verdict(True), package_sha256=v2.package_sha256)
        assert [m.model for m in c.models.list()] == ["digits"]
        assert c.models.get("digits").channels == {"canary": "1.0.0", "dev": "2.0.0"}

        policy = c.release_policy.set_model("digits", require_bench=False, reason="sdk test")
        assert policy.model == "digits" and policy.models["digits"].require_bench is False
        assert policy.global_ is None and policy.source.require_bench == "model"
        assert c.release_policy.get().effective.require_gate is True
        assert c.release_policy.clear_model("digits").models == {}

        c.groups.put("lab", channel="stable", config={"checkin_interval_s": 5})
        tok = c.enrollment.create_token("rpi4", group="lab")
        assert tok.tier == "rpi4" and tok.group == "lab" and tok.token
        devs = [cp.device("rpi4", group="lab") for _ in range(2)]
        for d in devs:
            d.report(model="digits", version="1.0.0", events=[("committed", None)])
        listed = {d.device_id for d in c.devices.list()}
        assert listed == {d.id for d in devs}
        one = c.devices.get(devs[0].id)
        assert one.group == "lab" and one.desired_state is not None and one.desired_state.config.checkin_interval_s == 5
        assert c.devices.pin(devs[0].id, "1.0.0", model="digits").pinned is not None
        assert c.devices.unpin(devs[0].id).pinned is None
        assert {k.device_id for k in c.devices.keys(group="lab")} == listed
        assert [g.name for g in c.groups.list()] == ["lab"]

        plan = c.rollouts.plan("digits", "2.0.0", policy={"waves": [100.0], "bake_s": 0, "min_devices": 1})
        assert plan.devices == 2 and plan.release.allowed
        started = c.rollouts.start("digits", "2.0.0", policy={"waves": [100.0], "bake_s": 0, "min_devices": 1})
        assert started.state == "running" and started.plan.devices == 2 and started.warning is None
        reconcile_once(cp.store)
        assert c.rollouts.pause(started.rollout_id, reason="look first").state == "paused"
        got = c.rollouts.get(started.rollout_id)
        assert [t.to for t in got.transitions][-1] == "paused" and len(got.devices) == 2
        assert c.rollouts.rollback(started.rollout_id).state == "rolled_back"
        assert [r.rollout_id for r in c.rollouts.list()] == [started.rollout_id]

        kpis = c.fleet.kpis()
        assert kpis.devices.total == 2 and kpis.rollouts[0].rollout_id == started.rollout_id
        assert {cell.tier for cell in c.compat.matrix(model="digits")} == {"rpi4"}
        actions = [a.action for a in c.audit.list(limit=500)]
        assert {"package.publish", "model.promote", "rollout.start", "device.pin"} <= set(actions)
        assert [a.action for a in c.audit.list(action="rollout.start")] == ["rollout.start"]

        with pytest.raises(e.NotFoundError, match="no device nope"):
            c.devices.get("nope")
        made = c.tokens.create("viewer", name="sdk")
        assert made.status == "active" and made.token.startswith("efa_")
    with edgefleet.Client(cp.url, made.token) as viewer:
        assert viewer.whoami().name == "sdk"
        with pytest.raises(e.ForbiddenError, match="may not POST"):
            viewer.rollouts.start("digits", "2.0.0")
    with edgefleet.Client(cp.url, cp.admin) as c:
        rotated = c.tokens.rotate(made.id)
        assert rotated.replaces == made.id
        assert c.tokens.revoke(rotated.id).revoked
        assert {t.id: t.status for t in c.tokens.list()}[rotated.id] == "revoked"
    with pytest.raises(e.AuthError, match="invalid or revoked API token"):
        edgefleet.Client(cp.url, rotated.token).whoami()
