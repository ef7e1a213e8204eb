"""The check-in wire format: the only seam between the device agent and the control plane.

* ``POST /api/v1/enroll`` — :class:`EnrollRequest` → :class:`EnrollResponse`.
* ``GET /api/v1/devices/{id}/desired`` — ``Authorization: Bearer <credential>``, ``If-None-Match``;
  200 :class:`DesiredState` with an ``ETag``, or 304.
* ``POST /api/v1/devices/{id}/credential`` — authenticated, no body → :class:`CredentialResponse`: a new
  credential; the old one keeps working until the new one is first used (asked for by ``rotate_credential``).
* ``POST /api/v1/devices/{id}/key`` — :class:`KeyRotation` → :class:`KeyRotation`: the device's new X25519
  public key (asked for by ``rotate_key``).
* ``POST /api/v1/devices/{id}/crashes`` — :class:`CrashUpload` → :class:`CrashUploadResponse`: the device's
  worker crash reports (only for a group that consents, ``DeviceConfig.crash_reports``; 409 otherwise). Idempotent
  by ``crash_id``; a body over :data:`MAX_CRASH_UPLOAD_BYTES` is 413, one these models refuse 422; nothing stored.
* ``POST /api/v1/devices/{id}/samples`` — :class:`SampleUpload` → :class:`SampleUploadResponse`: served inputs the
  device sampled, each encrypted there to the operator's key (only for a group that consents,
  ``DeviceConfig.input_sampling``; 409 otherwise). Idempotent by ``sample_id``; over
  :data:`MAX_SAMPLE_UPLOAD_BYTES` is 413, one these models refuse 422; nothing stored.
* ``POST /api/v1/devices/{id}/report`` — :class:`Report` → :class:`ReportResponse`. Idempotent by ``batch_id``:
  the server stores each batch once and answers with the ids it has, so a lost answer or a restart mid-upload
  never duplicates or drops data. A body over :data:`MAX_REPORT_BYTES` is refused with 413, a report these
  models refuse with 422 naming the fields; either way nothing of it is stored.

A version the agent rolled back is not retried until the desired state names a new rollout.

Every bound here is what the fleet's storage and arithmetic can take, so that no device, however broken or
hostile, can poison fleet data: strings fit their columns and carry no NUL, counts fit 32-bit columns, numbers
are finite, and timestamps are timezone-aware and never more than :data:`MAX_CLOCK_AHEAD` past the clock of
whoever validates (the server's, for reports).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edgefleet.telemetry.drift import DriftSummary
from edgefleet.telemetry.sketch import SketchData

__all__ = [
    "API_PREFIX",
    "MAX_CLOCK_AHEAD",
    "MAX_CONFUSION_CELLS",
    "MAX_COUNT",
    "MAX_CRASH_REPORTS",
    "MAX_CRASH_UPLOAD_BYTES",
    "MAX_FAULT_CHARS",
    "MAX_LOG_LINES",
    "MAX_REPORT_BYTES",
    "MAX_SAMPLES_PER_UPLOAD",
    "MAX_SAMPLE_BYTES",
    "MAX_SAMPLE_RATE_PER_MIN",
    "MAX_SAMPLE_UPLOAD_BYTES",
    "AgentState",
    "CrashReport",
    "CrashUpload",
    "CrashUploadResponse",
    "CredentialResponse",
    "DesiredState",
    "DeviceConfig",
    "EnrollRequest",
    "EnrollResponse",
    "EventKind",
    "FieldFeedback",
    "Hardware",
    "InputSample",
    "KeyRotation",
    "LogUpload",
    "MaintenanceWindow",
    "RemoteRouting",
    "Report",
    "ReportResponse",
    "SampleUpload",
    "SampleUploadResponse",
    "ServedModel",
    "ShadowOrder",
    "ShadowStats",
    "TelemetryWindow",
    "UpdateEvent",
    "parse_window",
    "target_name",
    "validation_message",
]

API_PREFIX = "/api/v1"
MAX_REPORT_BYTES = 4 * 1024 * 1024
MAX_CLOCK_AHEAD = timedelta(days=1)
# Request, error and record counts land in INTEGER columns, 32-bit on PostgreSQL: a window of a minute or so
# never comes near, and a larger value would fail the insert instead of being refused.
MAX_COUNT = 2**31 - 1
MAX_WORKER_EVENTS = 1_000_000
MAX_CPU_PERCENT = 100.0 * 4096  # every core of the largest Hardware.cpu_count busy
MAX_RSS_BYTES = 2**50
_AHEAD_H = MAX_CLOCK_AHEAD.total_seconds() / 3600
_PLAIN = re.compile(r"[A-Za-z0-9_\-\[\]]{1,64}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # where a device without a real-time clock starts counting


def target_name(name: str, version: str) -> str:
    """The TUF target name of a package."""
    return f"{name}-{version}.efpkg"


def validation_message(exc: ValidationError, *, limit: int = 5) -> str:
    """One line naming each refused field, e.g. ``telemetry.0.latency.keys: 3 counts for 2 keys ...``."""
    errs = exc.errors(include_url=False, include_input=False, include_context=False)
    parts = []
    for err in errs[:limit]:
        loc = ".".join(_loc_part(p) for p in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg'].removeprefix('Value error, ')[:300]}")
    if len(errs) > limit:
        parts.append(f"and {len(errs) - limit} more")
    return "; ".join(parts)


def _loc_part(p: int | str) -> str:
    # a location can be a key the sender chose: quoted and cut short, so the message stays one short line
    if isinstance(p, int) or _PLAIN.fullmatch(p):
        return str(p)
    return ascii(p[:40])


def _storable(v: str) -> str:
    # PostgreSQL text cannot hold NUL, and a lone surrogate cannot be encoded: either would fail the insert.
    if "\x00" in v:
        raise ValueError("must not contain NUL characters")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return v


def _clock_reading(v: datetime) -> datetime:
    try:
        v = v.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range") from None
    if v < _EPOCH:
        raise ValueError("is before 1970")
    # datetime.now at each call, nothing cached or injectable: the bound is the validator's real clock
    if v > datetime.now(UTC) + MAX_CLOCK_AHEAD:
        raise ValueError(f"is more than {_AHEAD_H:g} h ahead of the server's clock (is the device's clock wrong?)")
    return v


Id = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(_storable)]
Str64 = Annotated[str, StringConstraints(max_length=64), AfterValidator(_storable)]
Str128 = Annotated[str, StringConstraints(max_length=128), AfterValidator(_storable)]
Str2000 = Annotated[str, StringConstraints(max_length=2000), AfterValidator(_storable)]
Timestamp = Annotated[AwareDatetime, AfterValidator(_clock_reading)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Hardware(_Wire):
    """What the device is, as it reports at enrollment; the control plane refuses hardware that contradicts the
    token's tier (another architecture, or missing instruction-set features) unless ``emulates`` names the tier."""

    arch: Str64
    cpu_count: int = Field(ge=1, le=4096)
    memory_mb: int = Field(ge=1, le=MAX_COUNT)
    chipset: Str128 | None = None
    cpu_model: Str128 | None = None
    isa_features: list[Str64] | None = Field(
        None, max_length=256, description="CPU flags of interest from /proc/cpuinfo; null: not reported"
    )
    emulates: Str64 | None = Field(
        None,
        description="the tier this agent emulates on other hardware (`edgefleet agent --emulate-tier`, the "
        "simulator): enrollment then needs a token of that tier, the device is labelled emulated, and its "
        "reports never make a compatibility cell verified",
    )
    runtimes: dict[Str64, Str64] | None = Field(
        None,
        max_length=16,
        description="the runtimes the agent can load a model in, name → version (onnxruntime, litert, openvino); "
        "null: onnxruntime alone, at runtime_version",
    )
    execution_providers: list[Str64] | None = Field(
        None, max_length=32, description="the onnxruntime execution providers this device has; null: not reported"
    )


PublicKeyHex = Annotated[
    str,
    Field(min_length=64, max_length=64, pattern="^[0-9a-f]{64}$", description="X25519 public key, raw bytes as hex"),
]


class EnrollRequest(_Wire):
    token: str = Field(
        min_length=8,
        max_length=256,
        description="one-time enrollment token; `<secret>.<hex>` pins the sha256 of the TUF root the answer carries",
    )
    hardware: Hardware
    runtime: Str64 = "onnxruntime"
    runtime_version: Str64
    agent_version: Str64
    public_key: PublicKeyHex
    previous_device_id: Id | None = Field(
        None, description="re-enrollment: the id this device had before (recorded in the audit log only)"
    )


class EnrollResponse(_Wire):
    device_id: Id
    credential: str = Field(max_length=256, description="shown once; the agent stores it with mode 0600")
    tier: Str64
    root_json: str = Field(
        max_length=1024 * 1024,
        description="the TUF root.json the device trusts from now on: exactly the version its token pinned (the "
        "TUF client walks forward from it), else the repository's current root",
    )
    repository_url: str = Field(
        max_length=2048, description="base URL of the TUF repository (metadata/ and targets/ below it)"
    )


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^\s*(\S+)\s+(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True)
class MaintenanceWindow:
    """A weekly window in the device's local time: it opens at ``start`` (minutes after midnight) on each of
    ``days`` (0 = Monday) and lasts ``minutes`` (past midnight when it ends at or before it starts)."""

    days: frozenset[int]
    start: int
    minutes: int


def parse_window(text: str) -> MaintenanceWindow:
    """``"DAYS HH:MM-HH:MM"``, DAYS being ``daily``, a day (``Sat``), a range (``Mon-Fri``) or a list (``Sat,Sun``);
    ``22:00-02:00`` runs past midnight into the next day. Raises ValueError with what is wrong."""
    m = _WINDOW.match(text)
    if m is None:
        raise ValueError(f"maintenance window {text!r}: write DAYS HH:MM-HH:MM, e.g. 'Mon-Fri 02:00-04:00'")
    days_text, h1, m1, h2, m2 = m.groups()
    start, end = int(h1) * 60 + int(m1), int(h2) * 60 + int(m2)
    if int(h1) > 23 or int(m1) > 59 or int(h2) > 24 or int(m2) > 59 or end > 24 * 60:
        raise ValueError(f"maintenance window {text!r}: a time is not HH:MM within a day")
    days: set[int] = set()
    for part in days_text.lower().split(","):
        if part == "daily":
            days.update(range(7))
        elif "-" in part and all(p in _DAYS for p in part.split("-", 1)):
            a, b = (_DAYS.index(p) for p in part.split("-", 1))
            days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
        elif part in _DAYS:
            days.add(_DAYS.index(part))
        else:
            raise ValueError(f"maintenance window {text!r}: {part!r} is not daily, a day (Mon … Sun) or a range")
    return MaintenanceWindow(frozenset(days), start, (end - start) % (24 * 60) or 24 * 60)


def _windows(v: list[str]) -> list[str]:
    for w in v:
        parse_window(w)
    return v


def _timezone(v: str | None) -> str | None:
    if v is not None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {v!r} is not an IANA time zone name (e.g. Europe/Berlin)") from None
    return v


def _remote_url(v: str | None) -> str | None:
    if v is not None and not re.match(r"^https?://[^/\s]+(/\S*)?$", v):
        raise ValueError("must be an http:// or https:// URL of an OIP v2 server")
    return v.rstrip("/") if v else v


class RemoteRouting(_Wire):
    """Hybrid edge/cloud routing (docs/agent.md, "Hybrid edge/cloud routing"; ADR 0105): a remote OIP v2 endpoint
    for the served model and when requests go there instead of to the local worker."""

    remote_url: Annotated[str | None, AfterValidator(_remote_url)] = Field(
        None, max_length=2048, description="base URL of a remote OIP v2 server (…/v2/models/{model}/infer)"
    )
    remote_model: Str128 | None = Field(None, description="the model's name there; default: the local model's")
    policy: str = Field(
        "local",
        pattern="^(local|fallback|confidence)$",
        description="local: never remote; fallback: when the local worker is down, overloaded or rolling back; "
        "confidence: also when the local top-1 probability is under the package's remote_below",
    )
    timeout_s: float = Field(2.0, gt=0, le=60, description="a remote call that takes longer is given up")
    budget_per_minute: int = Field(60, ge=0, le=100_000, description="remote calls at most, per sliding minute")
    queue_depth: int | None = Field(
        None, gt=0, description="fallback when this many requests wait locally; default: the agent's queue size"
    )


MAX_SAMPLE_RATE_PER_MIN = 600.0  # input sampling: one a tenth of a second, at most


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
    remote_logs: bool = Field(False, description="the group consents to operators reading its devices' log lines")
    crash_reports: bool = Field(
        False, description="the group consents to its devices uploading their worker crash reports"
    )
    # Delivery controls. Left out of the rendered document when unset (see controlplane/devices.py ``render``):
    # agents that predate them refuse unknown fields.
    download_rate_bps: int | None = Field(None, gt=0, description="cap on a package download's bytes per second")
    download_stagger_s: float = Field(
        0.0, ge=0, description="a new download starts within this many seconds, spread over the fleet by device"
    )
    maintenance_windows: Annotated[list[Str128], AfterValidator(_windows)] = Field(
        default_factory=list,
        max_length=32,
        description="switch to a new version only inside one of these ('Mon-Fri 02:00-04:00'); none: any time",
    )
    timezone: Annotated[Str64 | None, AfterValidator(_timezone)] = Field(
        None, description="the IANA time zone the windows are in (default UTC)"
    )
    flags: dict[Str128, bool | int | float | Str2000] = Field(default_factory=dict, max_length=256)
    # Input sampling (docs/operations.md, "Input sampling"): left out of the rendered document when unset, as the
    # delivery controls are.
    input_sampling: bool = Field(
        False,
        description="the group consents to its devices sampling served inputs, encrypted on the device to "
        "sample_public_key, and uploading them",
    )
    sample_rate_per_min: float = Field(
        1.0, gt=0, le=MAX_SAMPLE_RATE_PER_MIN, description="at most this many inputs sampled a minute, per device"
    )
    sample_public_key: PublicKeyHex | None = Field(
        None, description="the operator's X25519 public key the samples are encrypted to (`edgefleet samples keygen`)"
    )
    routing: RemoteRouting | None = Field(None, description="hybrid edge/cloud routing; none: always local")
    # The agent's own version (docs/operations.md, "Updating the agent"): left out of the rendered document when unset.
    agent_version: Str64 | None = Field(
        None,
        description="the edgefleet agent version this group's devices should run: each installs that agent bundle "
        "beside its own environment and falls back by itself if it does not come up",
    )

    @model_validator(mode="after")
    def _sampling_has_a_key(self) -> DeviceConfig:
        if self.input_sampling and self.sample_public_key is None:
            raise ValueError(
                "input_sampling needs sample_public_key: the X25519 public key the samples are encrypted to "
                "(make a pair with `edgefleet samples keygen`)"
            )
        return self


class ShadowOrder(_Wire):
    """A rollout's shadow phase on this device (docs/adr/0107-shadow-evaluation.md): install the candidate in the
    idle slot, run it in a second, low-priority worker on copies of served requests (at most ``rate_per_s`` a
    second and ``cpu_share`` of one core), and report how often it agrees with the served model. Never served."""

    rollout_id: Id
    model: Str128
    version: Str64
    target: str = Field(max_length=256, description="TUF target name, {name}-{version}.efpkg")
    package_sha256: Str64 | None = None
    rate_per_s: float = Field(20.0, gt=0, le=10_000, description="mirrored requests a second, at most")
    cpu_share: float = Field(0.25, gt=0, le=1, description="the candidate's compute, at most this share of one core")


# Additional models one device may be assigned beside its first one (docs/adr/0108-several-models-per-device.md).
MAX_MODELS = 16
# The request header by which an agent's report declares that it serves additional models (value "1"): a header,
# not a field, because servers that predate it refuse unknown fields and ignore unknown headers. The server moves a
# device for a second model only once it has seen it.
SEVERAL_MODELS_HEADER = "x-edgefleet-several-models"


class ModelAssignment(_Wire):
    """One additional model the device should run beside its first one (the desired state's top-level model): its
    own slots, worker, probation and rollback on the device, served over OIP under its own name."""

    model: Str128
    version: Str64
    target: str = Field(max_length=256, description="TUF target name, {name}-{version}.efpkg")
    package_sha256: Str64 | None = None
    rollout_id: Str64 | None = None
    pinned: bool = False


class DesiredState(_Wire):
    device_id: Id
    model: Str128 | None = None
    version: Str64 | None = None
    target: str | None = Field(None, max_length=256, description="TUF target name, {name}-{version}.efpkg")
    package_sha256: Str64 | None = None
    rollout_id: Str64 | None = None
    pinned: bool = False
    config: DeviceConfig = Field(default_factory=DeviceConfig)
    shadow: ShadowOrder | None = Field(
        None, description="a rollout's shadow phase: evaluate this candidate on mirrored requests, never serve it"
    )
    models: list[ModelAssignment] = Field(
        default_factory=list,
        max_length=MAX_MODELS,
        description="additional models beside the first (top-level) one; left out of the body when empty",
    )
    # Lifecycle orders. The server leaves them out of the body unless set, so agents that predate them (the wire
    # forbids unknown fields) are not broken by a server that knows them.
    rotate_credential: bool = Field(False, description="get a new credential: POST /devices/{id}/credential")
    rotate_key: bool = Field(False, description="make a new X25519 key pair and send it: POST /devices/{id}/key")
    wipe: bool = Field(
        False, description="decommissioned: delete identity, credential, keys and packages, then stop for good"
    )
    send_logs_since: AwareDatetime | None = Field(
        None, description="an operator asked for the log lines since then: POST /devices/{id}/logs (remote_logs)"
    )
    repository_url: str | None = Field(
        None,
        max_length=2048,
        description="base URL of the TUF repository when the server names one (object storage, a CDN): it "
        "replaces the one the enrollment answer gave, so moving the repository reaches every device",
    )

    @field_validator("models")
    @classmethod
    def _additional(cls, v: list[ModelAssignment], info: ValidationInfo) -> list[ModelAssignment]:
        names = [m.model for m in v]
        if len(set(names)) != len(names):
            raise ValueError("names a model twice")
        first = info.data.get("model")
        if first is not None and first in names:
            raise ValueError(f"names {first}, the first model, again")
        return v


class CredentialResponse(_Wire):
    credential: str = Field(max_length=256, description="shown once; replaces the current one from its first use")


class KeyRotation(_Wire):
    public_key: PublicKeyHex


MAX_LOG_LINES = 2000


class LogUpload(_Wire):
    """The agent's recent log lines, as an operator asked for them (``DesiredState.send_logs_since``), with the
    device's secrets scrubbed; the newest :data:`MAX_LOG_LINES` when there were more (``dropped`` says how many)."""

    since: AwareDatetime = Field(description="the order this answers: the desired state's send_logs_since")
    lines: list[Str2000] = Field(default_factory=list, max_length=MAX_LOG_LINES)
    dropped: Count = 0


MAX_CRASH_REPORTS = 20  # per upload, and what a device keeps
MAX_FAULT_CHARS = 16 * 1024  # the tail of a worker's faulthandler traceback
MAX_CRASH_UPLOAD_BYTES = 2 * 1024 * 1024  # MAX_CRASH_REPORTS full tracebacks, even at 4 bytes a character


class CrashReport(_Wire):
    """One unexpected end of the inference worker, as the agent saw it: how it ended, the Python traceback
    faulthandler wrote on a fatal signal (none for SIGKILL, which cannot be caught), the worker's last sampled
    RSS and the model it served. No inputs or outputs: nothing of what the model was asked."""

    crash_id: Id
    at: Timestamp = Field(description="the device's clock when the agent saw the worker end")
    reason: Str2000 = Field(description="the supervisor's account, as in the worker_crashed event")
    exit_code: int | None = Field(None, ge=-255, le=255, description="negative: ended by that signal")
    signal: Str64 | None = Field(None, description="the signal's name when a signal ended it (SIGSEGV, ...)")
    fault: Annotated[str, StringConstraints(max_length=MAX_FAULT_CHARS), AfterValidator(_storable)] = Field(
        "", description="faulthandler's traceback (its tail), the device's secrets scrubbed"
    )
    fault_dropped: Count = Field(0, description="characters cut from the head of the traceback")
    rss_bytes: int | None = Field(None, ge=0, le=MAX_RSS_BYTES, description="the worker's last sampled RSS")
    rss_age_s: float | None = Field(None, ge=0, le=86400 * 366, description="how long before the end it was sampled")
    uptime_s: float | None = Field(None, ge=0, le=86400 * 366 * 10, description="how long that worker had run")
    model: Str128 | None = None
    version: Str64 | None = None
    model_sha256: Str64 | None = None
    agent_version: Str64 | None = None
    runtime_version: Str64 | None = None


class CrashUpload(_Wire):
    reports: list[CrashReport] = Field(min_length=1, max_length=MAX_CRASH_REPORTS)


class CrashUploadResponse(_Wire):
    accepted_crash_ids: list[Id] = Field(
        max_length=MAX_CRASH_REPORTS, description="stored now or before: the device may forget them"
    )


MAX_SAMPLE_BYTES = 1024 * 1024  # one sample's plaintext (its tensors); a larger input is never sampled
MAX_SAMPLES_PER_UPLOAD = 16
# a body's bytes: the agent fills an upload up to it (base64 inflates by 4/3: five of the largest samples fit)
MAX_SAMPLE_UPLOAD_BYTES = 8 * 1024 * 1024
_B64 = r"^[A-Za-z0-9+/]*={0,2}$"


class InputSample(_Wire):
    """One served input, sealed on the device for the operator: its tensors (and this metadata again) encrypted
    with AES-256-GCM under a random content key, the key wrapped for the operator's X25519 key with an ephemeral
    key and HKDF-SHA256 (docs/adr/0003-package-encryption-x25519-hkdf-aes-gcm.md). The AAD binds the ciphertext to
    ``sample_id``. The clear fields let the control plane list and prune; only the key's holder reads the input."""

    sample_id: Id
    at: Timestamp = Field(description="the device's clock when the input was served")
    model: Str128 | None = None
    version: Str64 | None = None
    key_id: str = Field(pattern="^[0-9a-f]{16}$", description="the operator key's id it is encrypted to")
    ephemeral_public_key: str = Field(pattern="^[0-9a-f]{64}$")
    wrap_nonce: str = Field(pattern="^[0-9a-f]{24}$")
    wrapped_key: str = Field(pattern="^[0-9a-f]{96}$", description="the content key, AES-256-GCM with its tag")
    nonce: str = Field(pattern="^[0-9a-f]{24}$")
    ciphertext: str = Field(
        max_length=4 * (MAX_SAMPLE_BYTES + 4096 + 2) // 3, pattern=_B64, description="base64 of the sealed tensors"
    )


class SampleUpload(_Wire):
    samples: list[InputSample] = Field(min_length=1, max_length=MAX_SAMPLES_PER_UPLOAD)
    dropped: Count = Field(0, description="samples this device has dropped so far (spool full): cumulative")


class SampleUploadResponse(_Wire):
    accepted_sample_ids: list[Id] = Field(
        max_length=MAX_SAMPLES_PER_UPLOAD, description="stored now or before: the device may forget them"
    )


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
    cancelled = "cancelled"  # an update abandoned because the desired state moved on: not a failure


class UpdateEvent(_Wire):
    event_id: Id
    at: Timestamp = Field(description="the device's clock; the server judges on its own receive time")
    kind: EventKind
    model: Str128 | None = None
    version: Str64 | None = None
    rollout_id: Str64 | None = None
    reason: Str2000 | None = None
    # On ``verified``: what this attempt downloaded (null when it downloaded nothing: the package was staged
    # already, or an agent that does not count) and, when a delta rebuilt the package, the version it started from.
    bytes_downloaded: int | None = Field(None, ge=0, le=1 << 53, description="bytes this update attempt downloaded")
    delta_from: Str64 | None = Field(None, description="the installed version a delta rebuilt the package from")


class ServedModel(_Wire):
    model: Str128 | None = None
    version: Str64 | None = None
    model_sha256: Str64 | None = None
    package_sha256: Str64 | None = None


# Distinct (predicted, label) pairs one window's confusion summary may name; agent/feedback.py bounds its counts
# to the same number (it cannot import this module in the lean worker). Feedback past it still counts in
# ``matched`` and ``correct``.
MAX_CONFUSION_CELLS = 1024


class ConfusionCell(_Wire):
    predicted: Str64
    label: Str64
    count: Count


class FieldFeedback(_Wire):
    """Ground truth an application reported for requests this window's version answered
    (``POST /v2/models/{m}/feedback``, docs/operations.md "Field accuracy"): counts only, never inputs."""

    matched: Count = Field(0, description="feedback matched to a remembered prediction")
    correct: Count = Field(0, description="of those, feedback whose label is the predicted top-1 class")
    unmatched: Count = Field(0, description="feedback for an unknown or expired request id (answered 404)")
    confusion: list[ConfusionCell] = Field(default_factory=list, max_length=MAX_CONFUSION_CELLS)

    @field_validator("correct")
    @classmethod
    def _within_matched(cls, v: int, info: ValidationInfo) -> int:
        matched = info.data.get("matched")
        if matched is not None and v > matched:
            raise ValueError(f"is {v}, more than the {matched} matched")
        return v

    @field_validator("confusion")
    @classmethod
    def _adds_up(cls, v: list[ConfusionCell], info: ValidationInfo) -> list[ConfusionCell]:
        matched, correct = info.data.get("matched"), info.data.get("correct")
        if len({(c.predicted, c.label) for c in v}) != len(v):
            raise ValueError("names a (predicted, label) pair twice")
        right = sum(c.count for c in v if c.predicted == c.label)
        wrong = sum(c.count for c in v if c.predicted != c.label)
        if correct is not None and right > correct:
            raise ValueError(f"counts {right} correct, more than the window's {correct}")
        if matched is not None and correct is not None and wrong > matched - correct:
            raise ValueError(f"counts {wrong} wrong, more than the window's {matched - correct}")
        return v


class ShadowStats(_Wire):
    """One window of a shadow phase: how the candidate did on the requests mirrored to it (counts and a latency
    sketch, never inputs). ``compared`` counts every mirrored request the candidate ran, its errors included."""

    rollout_id: Id
    model: Str128 | None = None
    version: Str64 | None = None
    metric: Str64 = Field("top1", description="what agreement means: top1 (same top class) or cosine (>= 0.99)")
    compared: Count = 0
    agreed: Count = Field(0, description="of those, answers that agree with the served model's")
    errors: Count = Field(0, description="of those, requests the candidate failed (counted as disagreements)")
    dropped: Count = Field(0, description="mirrored requests not run: the candidate busy or over its CPU share")
    latency: SketchData = Field(default_factory=SketchData, description="the candidate's compute latencies")

    @field_validator("agreed", "errors")
    @classmethod
    def _within_compared(cls, v: int, info: ValidationInfo) -> int:
        compared = info.data.get("compared")
        if compared is not None and v > compared:
            raise ValueError(f"is {v}, more than the {compared} compared")
        return v

    @field_validator("latency")
    @classmethod
    def _counted(cls, v: SketchData, info: ValidationInfo) -> SketchData:
        compared = info.data.get("compared")
        if compared is not None and v.count > compared:
            raise ValueError(f"holds {v.count:g} latencies, more than the {compared} compared")
        return v


class TelemetryWindow(_Wire):
    window_id: Id
    start: Timestamp
    end: Timestamp
    model: Str128 | None = None
    version: Str64 | None = None
    model_sha256: Str64 | None = None
    requests: Count = 0
    errors: dict[Str64, Count] = Field(default_factory=dict, max_length=64, description="error counts by outcome")
    latency: SketchData = Field(default_factory=SketchData, description="latencies of the requests that succeeded")
    worker_restarts: int = Field(0, ge=0, le=MAX_WORKER_EVENTS)
    worker_crashes: int = Field(0, ge=0, le=MAX_WORKER_EVENTS)
    cpu_percent: float | None = Field(None, ge=0, le=MAX_CPU_PERCENT)
    rss_bytes: int | None = Field(None, ge=0, le=MAX_RSS_BYTES)
    drift: list[DriftSummary] = Field(default_factory=list, max_length=4096)
    remote_requests: Count = Field(0, description="requests answered by the remote endpoint (hybrid routing)")
    remote_unsent: Count = Field(
        0, description="requests routing wanted remote but could not send: unreachable, timed out, budget spent"
    )
    feedback: FieldFeedback | None = Field(None, description="ground truth reported for this window's requests")
    shadow: ShadowStats | None = Field(
        None, description="the shadow phase's candidate on this window's mirrored requests"
    )

    # Cross-field checks sit on the later field (pydantic validates in declaration order), so the error names it.
    @field_validator("end")
    @classmethod
    def _after_start(cls, v: datetime, info: ValidationInfo) -> datetime:
        start = info.data.get("start")
        if start is not None and v < start:
            raise ValueError(f"is before start ({start.isoformat()})")
        return v

    @field_validator("errors")
    @classmethod
    def _within_requests(cls, v: dict[str, int], info: ValidationInfo) -> dict[str, int]:
        requests = info.data.get("requests")
        if requests is not None and sum(v.values()) > requests:
            raise ValueError(f"add up to {sum(v.values())}, more than the window's {requests} requests")
        return v

    @field_validator("latency")
    @classmethod
    def _counted_requests(cls, v: SketchData, info: ValidationInfo) -> SketchData:
        requests = info.data.get("requests")
        if requests is not None and v.count > requests:
            raise ValueError(f"holds {v.count:g} latencies, more than the window's {requests} requests")
        return v


class ModelStatus(_Wire):
    """Where the device stands with one additional model: its own update state, the version it serves and why."""

    model: Str128
    state: AgentState
    version: Str64 | None = Field(None, description="the version this model's worker serves; none: not serving")
    reason: Str2000 | None = None


class Report(_Wire):
    batch_id: Id
    state: AgentState
    state_reason: Str2000 | None = None
    served: ServedModel = Field(default_factory=ServedModel)
    agent_version: Str64 | None = None
    runtime_version: Str64 | None = None
    runtimes: dict[Str64, Str64] | None = Field(
        None, max_length=16, description="as Hardware.runtimes, when they changed since enrollment (an upgrade)"
    )
    events: list[UpdateEvent] = Field(default_factory=list, max_length=10_000)
    telemetry: list[TelemetryWindow] = Field(default_factory=list, max_length=10_000)
    dropped_records: Count = Field(0, description="telemetry records dropped at the buffer cap, cumulative")
    sent_at: Timestamp | None = Field(None, description="the agent's clock when it sent this batch")
    models: list[ModelStatus] = Field(
        default_factory=list,
        max_length=MAX_MODELS,
        description="each additional model's status; left out of the body when empty (servers that predate it)",
    )

    @field_validator("models")
    @classmethod
    def _distinct_models(cls, v: list[ModelStatus]) -> list[ModelStatus]:
        names = [m.model for m in v]
        if len(set(names)) != len(names):
            raise ValueError("names a model twice")
        return v


class ReportResponse(_Wire):
    accepted_batch_ids: list[Id] = Field(max_length=10_000)


# A tier nudge (MQTT, docs/controlplane.md "Nudges over MQTT") may carry how long its devices spread their
# check-ins over: the server sizes it to the devices it wakes and the check-ins per second it absorbs. Anyone the
# broker lets publish can send one, so a device takes at most this long, and the default for anything unreadable.
MAX_NUDGE_SPREAD_S = 60.0


def nudge_payload(spread_s: float) -> bytes:
    """The body of a tier nudge that asks its devices to spread their check-ins over ``spread_s`` seconds."""
    return json.dumps({"spread_s": round(min(max(spread_s, 0.0), MAX_NUDGE_SPREAD_S), 3)}).encode()


def nudge_spread(payload: bytes, default: float) -> float:
    """The spread a tier nudge asks for: ``default`` for an empty body (an older server) or one that is not
    :func:`nudge_payload`'s, never more than :data:`MAX_NUDGE_SPREAD_S`."""
    if not payload or len(payload) > 256:
        return default
    try:
        value = json.loads(payload).get("spread_s")
    except (ValueError, AttributeError):
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return default
    return min(float(value), MAX_NUDGE_SPREAD_S)
