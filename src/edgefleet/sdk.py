"""The Python SDK of the control plane's operator API: ``edgefleet.Client``.

One method per operator route, grouped by resource (``client.devices.list()``, ``client.rollouts.start(...)``),
each returning the route's response model from :mod:`edgefleet.controlplane.schemas` — the same models the server
documents in its OpenAPI. :data:`OPERATIONS` maps every ``(method, path)`` of the API to its SDK method; the tests
hold it equal to the server's OpenAPI document both ways.

Errors come back as the exceptions of :mod:`edgefleet.errors` with the server's one-line message: the class the
server names (``ConflictError``, ``NotFoundError``, ...), else the one its HTTP status means (401 ``AuthError``,
403 ``ForbiddenError``, 404 ``NotFoundError``, 409 ``ConflictError``, 413 ``TooLargeError``, other 4xx
``UsageError``, 5xx ``ServerError``). A server that cannot be reached (or a proxy answering 502-504 for it) is a
:class:`~edgefleet.errors.ServerUnreachable` saying so — the exit codes of docs/cli.md follow from the classes.

Transport policy (:mod:`edgefleet.transport`): https is verified (``ca_file`` pins a private CA) and ``http://``
to another machine is refused unless ``insecure_http=True``: the API token rides in every request.

Responses are read leniently: a key a newer server adds is accepted (kept on the model, not dumped), so an older
SDK keeps working against it.
"""

from __future__ import annotations

import builtins
import enum
import functools
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
from pydantic import BaseModel, TypeAdapter

from edgefleet import errors as e
from edgefleet.apierrors import error_of, unreachable
from edgefleet.controlplane.rollout import RolloutPolicy
from edgefleet.controlplane.schemas import (
    ApiToken,
    ApiTokenCreated,
    ApiTokenRevoked,
    ApiTokenRotated,
    AuditEntry,
    CompatCell,
    CompatCleared,
    Device,
    DeviceCrashes,
    DeviceDetail,
    DeviceKey,
    DeviceLogs,
    DeviceSamples,
    EnrollmentToken,
    FieldAccuracyKpi,
    FleetKpis,
    Group,
    GroupRotation,
    Model,
    ModelVersion,
    ModelVersionDetail,
    ReleasePolicyDoc,
    Rollout,
    RolloutAction,
    RolloutDetail,
    RolloutPlanPreview,
    RolloutStarted,
    SampleDownload,
    WhoAmI,
)
from edgefleet.protocol import API_PREFIX, DeviceConfig
from edgefleet.transport import check_url, verify_arg

__all__ = ["OPERATIONS", "UNSET", "Client"]

F = TypeVar("F", bound=Callable[..., Any])

# items per page when the SDK follows a list route's cursor: the server's maximum, so the fewest round trips
PAGE_SIZE = 1000

# (HTTP method, full path template) → the SDK method that calls it: "resource.method", or "method" on Client.
OPERATIONS: dict[tuple[str, str], str] = {}


def _op(method: str, path: str) -> Callable[[F], F]:
    """Register the decorated method as the SDK's one call of ``method path`` (a path below ``/api/v1``)."""

    def register(fn: F) -> F:
        owner = fn.__qualname__.split(".")[0]
        name = fn.__name__ if owner == "Client" else f"{_RESOURCE_OF[owner]}.{fn.__name__}"
        key = (method, API_PREFIX + path)
        if key in OPERATIONS:
            raise RuntimeError(f"two SDK methods for {method} {path}: {OPERATIONS[key]} and {name}")
        OPERATIONS[key] = name
        return fn

    return register


# the class of each resource → its attribute on Client
_RESOURCE_OF = {
    "Tokens": "tokens",
    "Audit": "audit",
    "Fleet": "fleet",
    "Compat": "compat",
    "Enrollment": "enrollment",
    "Devices": "devices",
    "Groups": "groups",
    "Models": "models",
    "ReleasePolicy": "release_policy",
    "Rollouts": "rollouts",
}


class _Unset(enum.Enum):
    UNSET = "UNSET"


UNSET = _Unset.UNSET
"""A release-policy field left as it is (``None`` is a value there: inherit)."""


@functools.cache
def _adapter(tp: Hashable) -> TypeAdapter[Any]:
    adapter: TypeAdapter[Any] = TypeAdapter(cast(Any, tp))  # a model class or list[model]: both hashable
    return adapter


def _drop_none(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


class Client:
    """A connection to one control plane, as one API token.

    ``server`` is the base URL (``https://edgefleet.example.com``); ``token`` an operator API token. Use it as a
    context manager, or call :meth:`close`."""

    # what to do about a TLS certificate this client does not trust; a wrapper that takes its CA elsewhere (the
    # CLI: an environment variable) says so instead
    _untrusted_fix = "pass ca_file= the CA file that signed it"

    def __init__(
        self,
        server: str,
        token: str,
        *,
        ca_file: Path | str | None = None,
        insecure_http: bool = False,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        check_url(self.server, insecure_http, allow_with="insecure_http=True")
        if not token:
            raise e.UsageError("no API token: create one with `edgefleet tokens create --role R`")
        self._http = httpx.Client(
            base_url=self.server,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            verify=verify_arg(ca_file),
            transport=transport,
        )
        self.tokens = Tokens(self)
        self.audit = Audit(self)
        self.fleet = Fleet(self)
        self.compat = Compat(self)
        self.enrollment = Enrollment(self)
        self.devices = Devices(self)
        self.groups = Groups(self)
        self.models = Models(self)
        self.release_policy = ReleasePolicy(self)
        self.rollouts = Rollouts(self)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self,
        method: str,
        path: str,
        returns: Any,
        *,
        path_params: Mapping[str, str | int] | None = None,
        **kw: Any,
    ) -> Any:
        """``method`` on ``/api/v1`` + ``path`` (its ``{name}`` parts filled from ``path_params``, each quoted as one
        path segment), the answer validated as ``returns``."""
        return self._answer(method, *self._send(method, path, path_params, **kw), returns)

    def call_pages(
        self, path: str, returns: Any, *, params: Mapping[str, Any] | None = None, max_items: int | None = None
    ) -> builtins.list[Any]:
        """GET a list route (``returns``: ``list[Model]``) page by page, following ``X-Next-Cursor`` to the last
        page (or until ``max_items``): the whole list, however the server pages it (docs/api.md, "Pagination")."""
        out: builtins.list[Any] = []
        query = {**(params or {}), "limit": PAGE_SIZE}
        while True:
            if max_items is not None:
                query["limit"] = max(1, min(PAGE_SIZE, max_items - len(out)))
            url, r = self._send("GET", path, None, params=query)
            out.extend(self._answer("GET", url, r, returns))
            cursor = r.headers.get("X-Next-Cursor")
            if not cursor or (max_items is not None and len(out) >= max_items):
                return out
            query["cursor"] = cursor

    def _send(
        self, method: str, path: str, path_params: Mapping[str, str | int] | None, **kw: Any
    ) -> tuple[str, httpx.Response]:
        url = API_PREFIX + path
        for name, value in (path_params or {}).items():
            url = url.replace("{" + name + "}", _segment(value))
        try:
            r = self._http.request(method, url, **kw)
        except httpx.HTTPError as exc:
            raise unreachable(self.server, exc, self._untrusted_fix) from exc
        if r.status_code >= 400:
            raise error_of(r)
        return url, r

    def _answer(self, method: str, url: str, r: httpx.Response, returns: Any) -> Any:
        try:
            data = r.json()
        except ValueError:
            raise e.EdgefleetError(
                f"{method} {url} answered {r.headers.get('content-type', 'no content type')}, not JSON: is "
                f"{self.server} an edgefleet control plane?"
            ) from None
        return _adapter(returns).validate_python(data, extra="allow")

    @_op("GET", "/whoami")
    def whoami(self) -> WhoAmI:
        """The name and role of this client's token."""
        return self.call("GET", "/whoami", WhoAmI)


def _segment(value: str | int) -> str:
    from urllib.parse import quote

    return quote(str(value), safe="")


class _Resource:
    def __init__(self, client: Client) -> None:
        self._c = client


class Tokens(_Resource):
    """Operator API tokens (admin)."""

    @_op("GET", "/tokens")
    def list(self) -> builtins.list[ApiToken]:
        return self._c.call_pages("/tokens", list[ApiToken])

    @_op("POST", "/tokens")
    def create(self, role: str, *, name: str = "api", expires_s: float | None = None) -> ApiTokenCreated:
        """``role``: viewer, operator or admin. The secret is in ``.token``, shown this once."""
        body = _drop_none(role=role, name=name, expires_s=expires_s)
        return self._c.call("POST", "/tokens", ApiTokenCreated, json=body)

    @_op("POST", "/tokens/{token_id}/rotate")
    def rotate(self, token_id: int, *, grace_s: float = 0.0, expires_s: float | None = None) -> ApiTokenRotated:
        """A new secret for the same name and role; the old one keeps working for ``grace_s``."""
        body = _drop_none(grace_s=grace_s, expires_s=expires_s)
        return self._c.call(
            "POST", "/tokens/{token_id}/rotate", ApiTokenRotated, path_params={"token_id": token_id}, json=body
        )

    @_op("DELETE", "/tokens/{token_id}")
    def revoke(self, token_id: int) -> ApiTokenRevoked:
        return self._c.call("DELETE", "/tokens/{token_id}", ApiTokenRevoked, path_params={"token_id": token_id})


class Audit(_Resource):
    @_op("GET", "/audit")
    def list(
        self, *, limit: int = 200, action: str | None = None, target: str | None = None
    ) -> builtins.list[AuditEntry]:
        """The newest ``limit`` entries first, optionally of one ``action`` or ``target`` (as many pages as that
        takes)."""
        params = _drop_none(action=action, target=target)
        return self._c.call_pages("/audit", list[AuditEntry], params=params, max_items=limit)


class Fleet(_Resource):
    @_op("GET", "/fleet")
    def kpis(self) -> FleetKpis:
        """Latency, crash-free rate, update outcomes, drift and rollout timings over the last 24 hours."""
        return self._c.call("GET", "/fleet", FleetKpis)

    @_op("GET", "/fleet/field-accuracy")
    def field_accuracy(self, *, window_s: float | None = None) -> builtins.list[FieldAccuracyKpi]:
        """Field accuracy per model version × tier from ground-truth feedback over the last ``window_s`` seconds
        (default a day; docs/operations.md, "Field accuracy"); ``accuracy`` is None where no feedback matched."""
        return self._c.call_pages("/fleet/field-accuracy", list[FieldAccuracyKpi], params=_drop_none(window_s=window_s))


class Compat(_Resource):
    @_op("GET", "/compat")
    def matrix(self, *, model: str | None = None) -> builtins.list[CompatCell]:
        return self._c.call_pages("/compat", list[CompatCell], params=_drop_none(model=model))

    @_op("POST", "/compat/clear")
    def clear(
        self, *, tier: str, runtime_version: str, model: str, version: str, reason: str | None = None
    ) -> CompatCleared:
        """Clear a cell: its evidence stays, only what arrives from now on counts."""
        body = _drop_none(tier=tier, runtime_version=runtime_version, model=model, version=version, reason=reason)
        return self._c.call("POST", "/compat/clear", CompatCleared, json=body)


class Enrollment(_Resource):
    @_op("POST", "/enrollment-tokens")
    def create_token(self, tier: str, *, group: str | None = None, expires_s: float = 3600.0) -> EnrollmentToken:
        """A one-time token a device of ``tier`` enrolls with (``edgefleet agent enroll``)."""
        body = _drop_none(tier=tier, group=group, expires_s=expires_s)
        return self._c.call("POST", "/enrollment-tokens", EnrollmentToken, json=body)


class Devices(_Resource):
    @_op("GET", "/devices")
    def list(self) -> builtins.list[Device]:
        return self._c.call_pages("/devices", list[Device])

    @_op("GET", "/devices/keys")
    def keys(self, *, tier: str | None = None, group: str | None = None) -> builtins.list[DeviceKey]:
        """The public keys of the active devices matching the filters (what an encrypted package is built for)."""
        return self._c.call_pages("/devices/keys", list[DeviceKey], params=_drop_none(tier=tier, group=group))

    @_op("GET", "/devices/{device_id}")
    def get(self, device_id: str) -> DeviceDetail:
        return self._c.call("GET", "/devices/{device_id}", DeviceDetail, path_params={"device_id": device_id})

    def _post(self, action: str, device_id: str, **kw: Any) -> Device:
        return self._c.call(
            "POST", f"/devices/{{device_id}}/{action}", Device, path_params={"device_id": device_id}, **kw
        )

    @_op("POST", "/devices/{device_id}/pin")
    def pin(self, device_id: str, version: str, *, model: str | None = None) -> Device:
        """Hold the device on ``version`` (of ``model``, by default the one it serves) whatever rollouts do."""
        return self._post("pin", device_id, json=_drop_none(version=version, model=model))

    @_op("POST", "/devices/{device_id}/unpin")
    def unpin(self, device_id: str) -> Device:
        return self._post("unpin", device_id)

    @_op("POST", "/devices/{device_id}/group")
    def set_group(self, device_id: str, group: str | None) -> Device:
        """Move the device to ``group`` (None: out of any group)."""
        return self._post("group", device_id, json={"group": group})

    @_op("POST", "/devices/{device_id}/revoke")
    def revoke(self, device_id: str) -> Device:
        return self._post("revoke", device_id)

    @_op("POST", "/devices/{device_id}/decommission")
    def decommission(self, device_id: str) -> Device:
        """Retire the device: revoked, kept for the audit, told to wipe itself on its next check-in."""
        return self._post("decommission", device_id)

    @_op("POST", "/devices/{device_id}/rotate-credential")
    def rotate_credential(self, device_id: str) -> Device:
        return self._post("rotate-credential", device_id)

    @_op("POST", "/devices/{device_id}/rotate-key")
    def rotate_key(self, device_id: str) -> Device:
        return self._post("rotate-key", device_id)

    @_op("POST", "/devices/{device_id}/logs/request")
    def request_logs(self, device_id: str, *, since_s: float = 3600.0) -> DeviceLogs:
        """Ask the device for its log lines of the last ``since_s`` seconds (its group must consent:
        ``remote_logs`` in its configuration document); it answers on its next check-in (see :meth:`logs`)."""
        return self._c.call(
            "POST",
            "/devices/{device_id}/logs/request",
            DeviceLogs,
            path_params={"device_id": device_id},
            json={"since_s": since_s},
        )

    @_op("GET", "/devices/{device_id}/logs")
    def logs(self, device_id: str) -> DeviceLogs:
        """The device's latest upload of log lines, and whether a request is still open."""
        return self._c.call("GET", "/devices/{device_id}/logs", DeviceLogs, path_params={"device_id": device_id})

    @_op("GET", "/devices/{device_id}/crashes")
    def crashes(self, device_id: str, *, limit: int = 50) -> DeviceCrashes:
        """The worker crash reports the device uploaded (its group must consent: ``crash_reports``), newest
        first."""
        return self._c.call(
            "GET",
            "/devices/{device_id}/crashes",
            DeviceCrashes,
            path_params={"device_id": device_id},
            params={"limit": limit},
        )

    @_op("GET", "/devices/{device_id}/samples")
    def samples(self, device_id: str, *, limit: int = 50) -> DeviceSamples:
        """Whether the device samples its served inputs and at what rate (its group must consent:
        ``input_sampling``), and the samples it uploaded, newest first (metadata: see :meth:`sample`)."""
        return self._c.call(
            "GET",
            "/devices/{device_id}/samples",
            DeviceSamples,
            path_params={"device_id": device_id},
            params={"limit": limit},
        )

    @_op("GET", "/devices/{device_id}/samples/{sample_id}")
    def sample(self, device_id: str, sample_id: str) -> SampleDownload:
        """One input sample as the device sealed it: ``edgefleet.agent.sampling.open_sample`` opens it with the
        operator's private key (``edgefleet samples pull`` does both)."""
        return self._c.call(
            "GET",
            "/devices/{device_id}/samples/{sample_id}",
            SampleDownload,
            path_params={"device_id": device_id, "sample_id": sample_id},
        )


class Groups(_Resource):
    @_op("GET", "/groups")
    def list(self) -> builtins.list[Group]:
        return self._c.call_pages("/groups", list[Group])

    @_op("PUT", "/groups/{name}")
    def put(
        self,
        name: str,
        *,
        channel: str | None = None,
        config: DeviceConfig | Mapping[str, Any] | None = None,
        pinned_model: str | None = None,
        pinned_version: str | None = None,
        unpin: bool = False,
    ) -> Group:
        """Create or change a group; fields left None stay as they are."""
        cfg = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
        body = _drop_none(channel=channel, config=cfg, pinned_model=pinned_model, pinned_version=pinned_version)
        if unpin:
            body["unpin"] = True
        return self._c.call("PUT", "/groups/{name}", Group, path_params={"name": name}, json=body)

    @_op("POST", "/groups/{name}/rotate-credential")
    def rotate_credentials(self, name: str, *, key: bool = False) -> GroupRotation:
        """Ask every live device of the group to rotate its credential (``key=True``: its X25519 key pair)."""
        return self._c.call(
            "POST",
            "/groups/{name}/rotate-credential",
            GroupRotation,
            path_params={"name": name},
            params={"key": "true" if key else "false"},
        )


class Models(_Resource):
    @_op("POST", "/packages")
    def publish(self, package: Path | str, *, timeout: float | None = None) -> ModelVersion:
        """Upload a ``.efpkg``: the server checks it and publishes it to its TUF repository. Re-publishing the
        identical package is a no-op; another package under the same name and version is a ConflictError."""
        path = Path(package)
        if not path.is_file():
            raise e.UsageError(f"no package at {path}")
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        with path.open("rb") as f:
            return self._c.call(
                "POST",
                "/packages",
                ModelVersion,
                content=f,
                headers={"Content-Type": "application/octet-stream"},
                **extra,
            )

    @_op("GET", "/models")
    def list(self) -> builtins.list[Model]:
        return self._c.call_pages("/models", list[Model])

    @_op("GET", "/models/{name}")
    def get(self, name: str) -> Model:
        return self._c.call("GET", "/models/{name}", Model, path_params={"name": name})

    @_op("GET", "/models/{name}/versions/{version}")
    def version(self, name: str, version: str) -> ModelVersionDetail:
        """One version with its manifest, evidence and release status."""
        return self._c.call(
            "GET",
            "/models/{name}/versions/{version}",
            ModelVersionDetail,
            path_params={"name": name, "version": version},
        )

    @_op("POST", "/models/{name}/versions/{version}/promote")
    def promote(
        self, name: str, version: str, *, to: str | None = None, force: bool = False, reason: str | None = None
    ) -> ModelVersion:
        """One channel forward (dev → canary → stable), or to ``to``. ``force`` (admin, with a ``reason``)
        overrides the release policy."""
        body = _drop_none(to=to, reason=reason)
        if force:
            body["force"] = True
        return self._c.call(
            "POST",
            "/models/{name}/versions/{version}/promote",
            ModelVersion,
            path_params={"name": name, "version": version},
            json=body,
        )

    @_op("PUT", "/models/{name}/versions/{version}/gate")
    def attach_gate(
        self, name: str, version: str, verdict: Mapping[str, Any], *, package_sha256: str | None = None
    ) -> ModelVersionDetail:
        """Attach the verdict ``edgefleet gate --json`` printed; ``package_sha256`` names the package it judged
        when the verdict does not."""
        return self._c.call(
            "PUT",
            "/models/{name}/versions/{version}/gate",
            ModelVersionDetail,
            path_params={"name": name, "version": version},
            json=dict(verdict),
            params=_drop_none(package_sha256=package_sha256),
        )

    @_op("PUT", "/models/{name}/versions/{version}/bench")
    def attach_bench(self, name: str, version: str, bench: Mapping[str, Any]) -> ModelVersionDetail:
        """Attach a ``BENCH.json`` of ``edgefleet bench``; its results feed the compatibility matrix."""
        return self._c.call(
            "PUT",
            "/models/{name}/versions/{version}/bench",
            ModelVersionDetail,
            path_params={"name": name, "version": version},
            json=dict(bench),
        )


def _policy_body(
    require_gate: bool | _Unset | None, require_bench: bool | _Unset | None, reason: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {} if reason is None else {"reason": reason}
    for field, value in (("require_gate", require_gate), ("require_bench", require_bench)):
        if value is not UNSET:
            body[field] = value
    return body


class ReleasePolicy(_Resource):
    """What a version needs before it is promoted or rolled out. In the setters a field left :data:`UNSET` stays
    as it is and ``None`` inherits (a model's from the global policy, the global one from the built-in default)."""

    @_op("GET", "/release-policy")
    def get(self) -> ReleasePolicyDoc:
        return self._c.call("GET", "/release-policy", ReleasePolicyDoc)

    @_op("PUT", "/release-policy")
    def set(
        self,
        *,
        require_gate: bool | _Unset | None = UNSET,
        require_bench: bool | _Unset | None = UNSET,
        reason: str | None = None,
    ) -> ReleasePolicyDoc:
        """Change the global policy (admin)."""
        body = _policy_body(require_gate, require_bench, reason)
        return self._c.call("PUT", "/release-policy", ReleasePolicyDoc, json=body)

    @_op("GET", "/models/{name}/release-policy")
    def get_model(self, name: str) -> ReleasePolicyDoc:
        return self._c.call("GET", "/models/{name}/release-policy", ReleasePolicyDoc, path_params={"name": name})

    @_op("PUT", "/models/{name}/release-policy")
    def set_model(
        self,
        name: str,
        *,
        require_gate: bool | _Unset | None = UNSET,
        require_bench: bool | _Unset | None = UNSET,
        reason: str | None = None,
    ) -> ReleasePolicyDoc:
        """Change a model's override (admin); it may be set before the model's first version is published."""
        body = _policy_body(require_gate, require_bench, reason)
        return self._c.call(
            "PUT", "/models/{name}/release-policy", ReleasePolicyDoc, path_params={"name": name}, json=body
        )

    @_op("DELETE", "/models/{name}/release-policy")
    def clear_model(self, name: str) -> ReleasePolicyDoc:
        """Drop a model's override: it follows the global policy again."""
        return self._c.call("DELETE", "/models/{name}/release-policy", ReleasePolicyDoc, path_params={"name": name})


def _rollout_body(
    model: str | None,
    version: str | None,
    tier: str | None,
    channel: str | None,
    policy: RolloutPolicy | Mapping[str, Any] | None,
    force: bool,
    reason: str | None,
    agent: str | None = None,
) -> dict[str, Any]:
    pol = policy.model_dump(mode="json") if isinstance(policy, BaseModel) else policy
    # the server says what is missing or too much (a model rollout needs model and version, an agent one neither)
    body = _drop_none(model=model, version=version, tier=tier, channel=channel, policy=pol, reason=reason)
    if agent is not None:
        if model is not None or version is not None:
            raise e.UsageError("an agent rollout takes agent=VERSION alone: no model or version")
        body.update(kind="agent", version=agent)
    if force:
        body["force"] = True
    return body


class Rollouts(_Resource):
    @_op("GET", "/rollouts")
    def list(self) -> builtins.list[Rollout]:
        """Every rollout, newest first."""
        return self._c.call_pages("/rollouts", list[Rollout])

    @_op("GET", "/rollouts/{rollout_id}")
    def get(self, rollout_id: str) -> RolloutDetail:
        return self._c.call("GET", "/rollouts/{rollout_id}", RolloutDetail, path_params={"rollout_id": rollout_id})

    @_op("POST", "/rollouts/plan")
    def plan(
        self,
        model: str | None = None,
        version: str | None = None,
        *,
        agent: str | None = None,
        tier: str | None = None,
        channel: str | None = None,
        policy: RolloutPolicy | Mapping[str, Any] | None = None,
    ) -> RolloutPlanPreview:
        """The devices each wave would move on today's fleet (of ``model version``, or of agent version
        ``agent``); starts nothing."""
        body = _rollout_body(model, version, tier, channel, policy, False, None, agent)
        return self._c.call("POST", "/rollouts/plan", RolloutPlanPreview, json=body)

    @_op("POST", "/rollouts")
    def start(
        self,
        model: str | None = None,
        version: str | None = None,
        *,
        agent: str | None = None,
        tier: str | None = None,
        channel: str | None = None,
        policy: RolloutPolicy | Mapping[str, Any] | None = None,
        force: bool = False,
        reason: str | None = None,
    ) -> RolloutStarted:
        """Start a staged rollout of ``model version``, or of the agent bundle of agent version ``agent`` (to
        ``tier`` / devices of ``channel``). ``force`` (admin, with a ``reason``) overrides the release policy of a
        model version."""
        body = _rollout_body(model, version, tier, channel, policy, force, reason, agent)
        return self._c.call("POST", "/rollouts", RolloutStarted, json=body)

    def _action(self, action: str, rollout_id: str, reason: str | None) -> RolloutAction:
        return self._c.call(
            "POST",
            f"/rollouts/{{rollout_id}}/{action}",
            RolloutAction,
            path_params={"rollout_id": rollout_id},
            json=_drop_none(reason=reason),
        )

    @_op("POST", "/rollouts/{rollout_id}/pause")
    def pause(self, rollout_id: str, *, reason: str | None = None) -> RolloutAction:
        return self._action("pause", rollout_id, reason)

    @_op("POST", "/rollouts/{rollout_id}/resume")
    def resume(self, rollout_id: str, *, reason: str | None = None) -> RolloutAction:
        return self._action("resume", rollout_id, reason)

    @_op("POST", "/rollouts/{rollout_id}/abort")
    def abort(self, rollout_id: str, *, reason: str | None = None) -> RolloutAction:
        return self._action("abort", rollout_id, reason)

    @_op("POST", "/rollouts/{rollout_id}/rollback")
    def rollback(self, rollout_id: str, *, reason: str | None = None) -> RolloutAction:
        """Abort and move every device the rollout moved back to the version it served before."""
        return self._action("rollback", rollout_id, reason)
