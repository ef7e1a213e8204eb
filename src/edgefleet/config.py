"""Typed settings, one object per process, fed by CLI flags, ``EDGEFLEET_*`` variables and the Python API."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MQTT_PORT = 1883
# Raw telemetry windows and update events are what a rollout's waves are judged on (per device, since the wave
# began): they must outlive the longest bake, so no retention below a day is accepted (docs/controlplane.md).
RETENTION_FLOOR_S = 86_400.0


class MqttBroker(NamedTuple):
    host: str
    port: int
    username: str | None
    password: str | None


def mqtt_broker(url: str) -> MqttBroker:
    """The broker of an ``mqtt://[user[:password]@]host[:port]`` URL (check-in nudges, docs/agent.md); a
    ValueError names the expected form."""
    u = urlsplit(url)
    try:
        port = MQTT_PORT if u.port is None else u.port
    except ValueError:
        port = 0
    if u.scheme != "mqtt" or not u.hostname or not port or u.path not in ("", "/") or u.query or u.fragment:
        # the URL itself is not echoed: it may carry a password
        raise ValueError("not a broker URL: give mqtt://HOST[:PORT] (mqtt://USER:PASSWORD@HOST:PORT)")
    user = unquote(u.username) if u.username else None
    return MqttBroker(u.hostname, port, user, unquote(u.password) if u.password is not None else None)


def _valid_mqtt(url: str | None) -> str | None:
    if url is not None:
        mqtt_broker(url)
    return url


class RuntimeSettings(BaseSettings):
    """How the runtime layer creates onnxruntime sessions."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_RUNTIME_", extra="forbid")

    intra_op_threads: int = Field(0, ge=0, description="0 lets onnxruntime choose")
    inter_op_threads: int = Field(1, ge=0)
    graph_optimization: str = Field("all", pattern="^(disable|basic|extended|all)$")
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])


class ServerSettings(BaseSettings):
    """The control plane (``edgefleet server``)."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", extra="ignore")

    db: str = Field("sqlite:///edgefleet.db", description="SQLAlchemy URL; sqlite or postgresql+psycopg")
    repo: Path = Field(Path("tuf-repo"), description="TUF repository folder the server signs and serves")
    repo_s3: str | None = Field(
        None,
        pattern="^s3://[^/]+",
        description="s3://BUCKET[/PREFIX]: sign the repository into object storage instead of the `repo` folder "
        "(`repo = s3://...` lands here); needs repo_keys",
    )
    repo_keys: Path | None = Field(None, description="folder of the online signing keys [<repo>/keys]")
    repo_deltas: int = Field(
        3, ge=0, le=100, description="each upload also publishes deltas from this many previous versions (0: none)"
    )
    repository_url: str | None = Field(
        None,
        pattern="^https?://",
        description="base URL devices fetch the repository from (a CDN, the bucket's public endpoint) "
        "[<public_url>/tuf]",
    )
    host: str = "127.0.0.1"
    port: int = 8700
    admin_token: str | None = Field(None, description="bootstrap admin API token (else one is generated)")
    reconcile_interval_s: float = Field(5.0, gt=0)
    lastseen_flush_s: float = Field(2.0, gt=0)
    overdue_after_s: float = Field(300.0, gt=0)
    metadata_refresh_s: float = Field(3600.0, gt=0)
    public_url: str | None = Field(None, description="base URL devices use to reach this server")
    tls_cert: Path | None = Field(None, description="PEM certificate (chain) to serve https with; needs tls_key")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    forwarded_allow_ips: str | None = Field(
        None, description="proxy addresses whose X-Forwarded-* headers are trusted (comma-separated, or *)"
    )
    repo_passphrase: str | None = Field(None, description="passphrase of the online signing keys, if encrypted")
    session_max_age_s: float = Field(12 * 3600.0, gt=0, description="a dashboard sign-in ends this long after it began")
    session_idle_s: float = Field(3600.0, gt=0, description="a dashboard sign-in ends after this long unused")
    token_expires_s: float = Field(90 * 86400.0, gt=0, description="default lifetime of a new API token")
    cookie_secure: bool = Field(False, description="mark the sign-in cookie Secure even when the request is http")
    max_package_mb: float = Field(2048.0, gt=0, description="largest package upload accepted (413 above)")
    mqtt: str | None = Field(None, description="mqtt://[USER:PASSWORD@]HOST[:PORT]: publish check-in nudges there")
    nudge_rate: float = Field(
        4000.0,
        gt=0,
        description="check-ins per second a tier's nudge may bring on: its devices spread theirs over tier size / "
        "this many seconds",
    )
    telemetry_retention_s: float = Field(
        14 * 86_400.0, description="raw telemetry windows and report batches are deleted this long after arrival"
    )
    events_retention_s: float = Field(14 * 86_400.0, description="update events are deleted this long after arrival")
    rollup_retention_s: float = Field(
        400 * 86_400.0, description="5-minute telemetry rollups (what the KPIs read) are kept this long"
    )
    prune_interval_s: float = Field(3600.0, gt=0, description="how often one replica runs the retention prune")

    _check_mqtt = field_validator("mqtt")(_valid_mqtt)

    @field_validator("telemetry_retention_s", "events_retention_s", "rollup_retention_s")
    @classmethod
    def _retention_floor(cls, v: float) -> float:
        if not v >= RETENTION_FLOOR_S:
            raise ValueError(
                f"{v:g} s is shorter than {RETENTION_FLOOR_S:g} s (a day): rollouts judge their waves on the raw "
                "windows and events of each device, which must outlive the longest bake"
            )
        return v

    @model_validator(mode="before")
    @classmethod
    def _repo_in_object_storage(cls, data: Any) -> Any:
        # `--repo s3://...` or EDGEFLEET_REPO=s3://...: a Path would fold the "//" and name a local folder "s3:"
        if isinstance(data, dict) and str(data.get("repo", "")).startswith("s3://"):
            data = dict(data)
            data.setdefault("repo_s3", data.pop("repo"))
        return data


class AgentSettings(BaseSettings):
    """The device agent (``edgefleet agent``): the one source of its settings. Each field reads
    ``EDGEFLEET_AGENT_<FIELD>``; ``server`` also reads ``EDGEFLEET_SERVER`` (the CLI-wide name) and ``tier``
    ``EDGEFLEET_AGENT_EMULATE_TIER`` (its flag's name). The CLI passes only the flags given, so a flag beats a
    variable and a variable beats the default."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_AGENT_", extra="ignore", populate_by_name=True)

    # the agent-specific variable first: it wins over the CLI-wide one when both are set
    server: str | None = Field(None, validation_alias=AliasChoices("EDGEFLEET_AGENT_SERVER", "EDGEFLEET_SERVER"))
    token: str | None = None
    root: Path | None = Field(
        None, description="a TUF root.json given out of band: enrollment accepts only an answer carrying it"
    )
    ca_file: Path | None = Field(None, description="trust only this CA for the control plane and repository")
    insecure_http: bool = Field(False, description="allow http:// to a non-loopback control plane")
    data_dir: Path = Path("edgefleet-agent")
    host: str = "127.0.0.1"
    port: int = 8081
    uds: Path | None = Field(None, description="also serve the local inference API on this Unix socket path")
    checkin_interval_s: float = Field(30.0, ge=0.05)
    mqtt: str | None = Field(None, description="mqtt://[USER:PASSWORD@]HOST[:PORT]: check in at once when nudged")
    telemetry_interval_s: float = Field(60.0, ge=0.05)
    buffer_max_records: int = Field(10_000, gt=0)
    tier: str | None = Field(
        None,
        validation_alias=AliasChoices("EDGEFLEET_AGENT_EMULATE_TIER", "EDGEFLEET_AGENT_TIER"),
        description="the tier this machine only emulates (--emulate-tier)",
    )
    chipset: str | None = None
    memory_mb: int | None = Field(None, ge=16, description="emulated device memory: the worker is killed above it")
    # One thread per call by default: at batch 1 a second onnxruntime thread mostly adds wake-ups or busy-waiting
    # on a device whose other core runs the application; tier profiles state the same number for bench/optimize.
    intra_op_threads: int = Field(1, ge=1)
    queue_size: int = Field(64, gt=0)
    routing: dict[str, Any] | None = Field(
        None,
        description="hybrid edge/cloud routing as JSON, the fields of protocol.RemoteRouting (docs/agent.md); the "
        "group's config document wins when it names one",
    )
    # The local inference API's limits (docs/agent.md, "Limits of the local API"): the agent and a worker serving
    # the port apply the same ones (agent/httpserver.py HTTPLimits).
    http_max_url_bytes: int = Field(8 * 1024, ge=256, description="longer URLs are answered 414")
    http_max_header_bytes: int = Field(64 * 1024, ge=1024, description="larger header blocks are answered 431")
    http_header_timeout_s: float = Field(10.0, gt=0, description="a request head must arrive within this (408)")
    http_body_timeout_s: float = Field(30.0, gt=0, description="a request body must arrive within this (408)")
    http_keepalive_timeout_s: float = Field(30.0, gt=0, description="an idle connection is closed after this")
    http_max_connections: int = Field(256, ge=1, description="connections beyond this get a 503 and are closed")
    http_max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="cap of a binary tensor body")
    http_max_json_bytes: int | None = Field(None, ge=1024, description="JSON body cap; None: device memory / 64")
    http_max_tensor_bytes: int | None = Field(
        None, ge=1024, description="decoded inputs of one request; None: device memory / 8"
    )

    _check_mqtt = field_validator("mqtt")(_valid_mqtt)
