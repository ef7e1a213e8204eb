"""The check-in wire format: the only seam between the device agent and the control plane.

* ``POST /api/v1/enroll`` — :class:`EnrollRequest` → :class:`EnrollResponse`.
* ``GET /api/v1/devices/{id}/desired`` — ``Authorization: Bearer <credential>``, ``If-None-Match``;
  200 :class:`DesiredState` with an ``ETag``, or 304.
* ``POST /api/v1/devices/{id}/report`` — :class:`Report` → :class:`ReportResponse`. Idempotent by ``batch_id``:
  the server stores each batch once and answers with the ids it has, so a lost answer or a restart mid-upload
  never duplicates or drops data.

A version the agent rolled back is not retried until the desired state names a new rollout.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from edgefleet.telemetry.drift import DriftSummary
from edgefleet.telemetry.sketch import SketchData

__all__ = [
    "API_PREFIX",
    "AgentState",
    "DesiredState",
    "DeviceConfig",
    "EnrollRequest",
    "EnrollResponse",
    "EventKind",
    "Hardware",
    "Report",
    "ReportResponse",
    "ServedModel",
    "TelemetryWindow",
    "UpdateEvent",
    "target_name",
]

API_PREFIX = "/api/v1"


def target_name(name: str, version: str) -> str:
    """The TUF target name of a package."""
    return f"{name}-{version}.efpkg"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hardware(_Wire):
    arch: str = Field(max_length=64)
    cpu_count: int = Field(ge=1, le=4096)
    memory_mb: int = Field(ge=1)
    chipset: str | None = Field(None, max_length=128)


class EnrollRequest(_Wire):
    token: str = Field(min_length=8, max_length=256, description="one-time enrollment token")
    hardware: Hardware
    runtime: str = Field("onnxruntime", max_length=64)
    runtime_version: str = Field(max_length=64)
    agent_version: str = Field(max_length=64)
    public_key: str = Field(
        min_length=64, max_length=64, pattern="^[0-9a-f]{64}$", description="X25519 public key, raw bytes as hex"
    )


class EnrollResponse(_Wire):
    device_id: str
    credential: str = Field(description="shown once; the agent stores it with mode 0600")
    tier: str
    root_json: str = Field(description="the TUF root.json the device trusts from now on")
    repository_url: str = Field(description="base URL of the TUF repository (metadata/ and targets/ below it)")


class DeviceConfig(_Wire):
    """Configuration that ships apart from models, versioned per device group.

    ``version`` 0 means no group has a document: the agent then keeps its own interval settings (CLI flags)."""

    version: int = Field(0, ge=0)
    checkin_interval_s: float = Field(30.0, gt=0)
    telemetry_interval_s: float = Field(60.0, gt=0)
    probation_requests: int = Field(50, ge=0, description="probation ends after this many inferences ...")
    probation_seconds: float = Field(60.0, ge=0, description="... or this many seconds, whichever comes first")
    crash_loop_crashes: int = Field(3, ge=1, description="K worker crashes ...")
    crash_loop_window_s: float = Field(60.0, gt=0, description="... within W seconds roll back")
    max_error_rate: float = Field(0.05, ge=0, le=1)
    p95_budget_ms: float | None = Field(None, gt=0, description="probation p95 budget; else the manifest's")
    flags: dict[str, bool | int | float | str] = Field(default_factory=dict)


class DesiredState(_Wire):
    device_id: str
    model: str | None = None
    version: str | None = None
    target: str | None = Field(None, description="TUF target name, {name}-{version}.efpkg")
    package_sha256: str | None = None
    rollout_id: str | None = None
    pinned: bool = False
    config: DeviceConfig = Field(default_factory=DeviceConfig)


class AgentState(StrEnum):
    idle = "idle"
    downloading = "downloading"
    verifying = "verifying"
    staged = "staged"
    health_check = "health_check"
    probation = "probation"
    committed = "committed"
    rolled_back = "rolled_back"


class EventKind(StrEnum):
    download_started = "download_started"
    verified = "verified"
    refused = "refused"
    staged = "staged"
    health_check_passed = "health_check_passed"
    health_check_failed = "health_check_failed"
    switched = "switched"
    committed = "committed"
    rolled_back = "rolled_back"
    worker_crashed = "worker_crashed"


class UpdateEvent(_Wire):
    event_id: str = Field(max_length=64)
    at: datetime
    kind: EventKind
    model: str | None = None
    version: str | None = None
    rollout_id: str | None = None
    reason: str | None = Field(None, max_length=2000)


class ServedModel(_Wire):
    model: str | None = None
    version: str | None = None
    model_sha256: str | None = None
    package_sha256: str | None = None


class TelemetryWindow(_Wire):
    window_id: str = Field(max_length=64)
    start: datetime
    end: datetime
    model: str | None = None
    version: str | None = None
    model_sha256: str | None = None
    requests: int = Field(0, ge=0)
    errors: dict[str, int] = Field(default_factory=dict, description="error counts by outcome")
    latency: SketchData = Field(default_factory=SketchData)
    worker_restarts: int = Field(0, ge=0)
    worker_crashes: int = Field(0, ge=0)
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    drift: list[DriftSummary] = Field(default_factory=list)


class Report(_Wire):
    batch_id: str = Field(min_length=1, max_length=64)
    state: AgentState
    state_reason: str | None = Field(None, max_length=2000)
    served: ServedModel = Field(default_factory=ServedModel)
    agent_version: str | None = None
    runtime_version: str | None = None
    events: list[UpdateEvent] = Field(default_factory=list, max_length=10_000)
    telemetry: list[TelemetryWindow] = Field(default_factory=list, max_length=10_000)
    dropped_records: int = Field(0, ge=0, description="telemetry records dropped at the buffer cap, cumulative")


class ReportResponse(_Wire):
    accepted_batch_ids: list[str]
