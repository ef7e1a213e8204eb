"""Typed settings, one object per process, fed by CLI flags, ``EDGEFLEET_*`` variables and the Python API."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    host: str = "127.0.0.1"
    port: int = 8700
    admin_token: str | None = Field(None, description="bootstrap admin API token (else one is generated)")
    reconcile_interval_s: float = Field(5.0, gt=0)
    lastseen_flush_s: float = Field(2.0, gt=0)
    overdue_after_s: float = Field(300.0, gt=0)
    metadata_refresh_s: float = Field(3600.0, gt=0)
    public_url: str | None = Field(None, description="base URL devices use to reach this server")


class AgentSettings(BaseSettings):
    """The device agent (``edgefleet agent``)."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_AGENT_", extra="ignore")

    server: str | None = None
    token: str | None = None
    data_dir: Path = Path("edgefleet-agent")
    host: str = "127.0.0.1"
    port: int = 8081
    checkin_interval_s: float = Field(30.0, gt=0)
    telemetry_interval_s: float = Field(60.0, gt=0)
    buffer_max_records: int = Field(10_000, gt=0)
    tier: str | None = None
    chipset: str | None = None
    memory_mb: int | None = None
    # One thread per call by default: at batch 1 a second onnxruntime thread mostly adds wake-ups or busy-waiting
    # on a device whose other core runs the application; tier profiles state the same number for bench/optimize.
    intra_op_threads: int = Field(1, ge=1)
    queue_size: int = Field(64, gt=0)
