"""Storage: SQLAlchemy 2 models and engine setup. SQLite (WAL) by default, PostgreSQL via psycopg 3, same code.

The schema is created and upgraded by Alembic (``migrations/``) on startup; these classes are the one source of
truth that the migrations were generated from.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

__all__ = [
    "ApiToken",
    "AuditEntry",
    "Base",
    "CompatEntry",
    "DashboardSession",
    "Database",
    "Device",
    "DeviceCrash",
    "DeviceGroup",
    "DeviceLog",
    "EnrollmentToken",
    "FieldAccuracyRollup",
    "InputSampleRow",
    "JobLease",
    "ModelVersion",
    "ReleasePolicyRow",
    "ReportBatch",
    "Rollout",
    "RolloutDevice",
    "RolloutTransition",
    "TelemetryRollup",
    "TelemetryRow",
    "UpdateEventRow",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both backends (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}  # noqa: RUF012


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    # None never expires: only the bootstrap or configured admin token (`tokens list` says so)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    # the token a rotation issued in this one's place (the old one lives out its grace period)
    replaced_by: Mapped[int | None] = mapped_column(Integer, default=None)


class DashboardSession(Base):
    """A browser sign-in: the cookie holds a random id, this row its SHA-256 and the API token it acts as, so
    signing out, expiry and revoking the token end it on the server (docs/adr/0102)."""

    __tablename__ = "dashboard_sessions"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_id: Mapped[int] = mapped_column(Integer, ForeignKey("api_tokens.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model", "version", name="uq_model_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    package_sha256: Mapped[str] = mapped_column(String(64))
    model_sha256: Mapped[str] = mapped_column(String(64))
    length: Mapped[int] = mapped_column(BigInteger, default=0)
    channel: Mapped[str] = mapped_column(String(32), default="dev")
    requirements: Mapped[dict[str, Any]] = mapped_column(default=dict)
    lineage: Mapped[dict[str, Any]] = mapped_column(default=dict)
    manifest: Mapped[dict[str, Any]] = mapped_column(default=dict)
    gate: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    bench: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # the package's drift reference (per-feature bin edges and reference counts), kept so the fleet's merged
    # histograms can be scored against it on the server
    drift_reference: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # who attached which gate verdict and bench report, and the package hash each named: the release policy
    # reads it (``registry.release_refusal``), the dashboard shows it as the version's evidence chain
    evidence: Mapped[dict[str, Any] | None] = mapped_column(default=None)


class ReleasePolicyRow(Base):
    """The release policy: the global default (``scope`` ``"*"``) and per-model overrides (``scope`` = the model);
    a None field of an override inherits the global value. Kept in the database, not in process settings, so every
    replica enforces the same policy and each change is audited."""

    __tablename__ = "release_policies"
    scope: Mapped[str] = mapped_column(String(128), primary_key=True)
    require_gate: Mapped[bool | None] = mapped_column(Boolean, default=None)
    require_bench: Mapped[bool | None] = mapped_column(Boolean, default=None)
    updated_by: Mapped[str] = mapped_column(String(128), default="")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeviceGroup(Base):
    __tablename__ = "device_groups"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    channel: Mapped[str] = mapped_column(String(32), default="stable")
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    pinned_model: Mapped[str | None] = mapped_column(String(128), default=None)
    pinned_version: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    tier: Mapped[str] = mapped_column(String(64))
    group: Mapped[str | None] = mapped_column(String(128), default=None)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None] = mapped_column(default=None)
    device_id: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # the TUF root version whose sha256 the token text carries: the enroll answer serves exactly that root
    root_version: Mapped[int | None] = mapped_column(Integer, default=None)


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tier: Mapped[str] = mapped_column(String(64), index=True)
    group: Mapped[str | None] = mapped_column(String(128), default=None, index=True)
    credential_hash: Mapped[str] = mapped_column(String(64), unique=True)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    hardware: Mapped[dict[str, Any]] = mapped_column(default=dict)
    memory_mb: Mapped[int | None] = mapped_column(Integer, default=None)
    chipset: Mapped[str | None] = mapped_column(String(128), default=None)
    runtime: Mapped[str] = mapped_column(String(64), default="onnxruntime")
    runtime_version: Mapped[str] = mapped_column(String(64), default="")
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    public_key: Mapped[str] = mapped_column(String(64), default="")
    enrolled_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime | None] = mapped_column(default=None)
    state: Mapped[str | None] = mapped_column(String(32), default=None)
    state_reason: Mapped[str | None] = mapped_column(Text, default=None)
    served_model: Mapped[str | None] = mapped_column(String(128), default=None)
    served_version: Mapped[str | None] = mapped_column(String(64), default=None)
    served_model_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    desired_model: Mapped[str | None] = mapped_column(String(128), default=None)
    desired_version: Mapped[str | None] = mapped_column(String(64), default=None)
    desired_rollout_id: Mapped[str | None] = mapped_column(String(64), default=None)
    # The agent version an agent rollout gives this device (controlplane/agent_rollout.py): it overrides the group
    # document's ``agent_version`` in the device's desired state; None: the group's document decides.
    desired_agent_version: Mapped[str | None] = mapped_column(String(64), default=None)
    desired_agent_rollout_id: Mapped[str | None] = mapped_column(String(64), default=None)
    # A rollout's shadow phase on this device (``protocol.ShadowOrder`` wire form, controlplane/shadow.py): the
    # candidate it evaluates on mirrored requests, never serving it; None: none.
    desired_shadow: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    # Several models per device (docs/adr/0108-several-models-per-device.md): the additional models beside the
    # first (desired_model) as [{model, version, rollout_id}], the status the agent reported for each
    # (``protocol.ModelStatus`` wire form), and whether its agent declared that it serves additional models
    # (``protocol.SEVERAL_MODELS_HEADER`` on a report): only such a device is moved for a second model.
    desired_models: Mapped[list[Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    reported_models: Mapped[list[Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    several_models: Mapped[bool] = mapped_column(Boolean, default=False)
    pinned_model: Mapped[str | None] = mapped_column(String(128), default=None)
    pinned_version: Mapped[str | None] = mapped_column(String(64), default=None)
    dropped_records: Mapped[int] = mapped_column(Integer, default=0)
    # device clock minus server clock at its last report (seconds): verdicts run on server time, this is shown
    clock_offset_s: Mapped[float | None] = mapped_column(Float, default=None)
    # reports refused as invalid (422/413): counted, the last reason kept for the device page
    invalid_reports: Mapped[int] = mapped_column(Integer, default=0)
    last_invalid_report: Mapped[str | None] = mapped_column(Text, default=None)
    last_invalid_at: Mapped[datetime | None] = mapped_column(default=None)
    # bumped whenever anything in the desired state or the credential changes: replicas sync their check-in
    # caches incrementally from it
    changed_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # lifecycle (docs/adr/0103-device-lifecycle-and-pinned-enrollment.md): a decommissioned record is kept for
    # the audit; the wipe order goes out on its next check-in, after which the credential is refused
    decommissioned_at: Mapped[datetime | None] = mapped_column(default=None)
    wipe_sent_at: Mapped[datetime | None] = mapped_column(default=None)
    credential_rotation_requested_at: Mapped[datetime | None] = mapped_column(default=None)
    # issued but not yet used: the old credential keeps working until the new one is first seen
    pending_credential_hash: Mapped[str | None] = mapped_column(String(64), default=None, unique=True, index=True)
    key_rotation_requested_at: Mapped[datetime | None] = mapped_column(default=None)
    previous_public_key: Mapped[str | None] = mapped_column(String(64), default=None)
    # remote diagnostics: an operator's open request for the log lines since ``logs_since`` (cleared on upload)
    logs_requested_at: Mapped[datetime | None] = mapped_column(default=None)
    logs_since: Mapped[datetime | None] = mapped_column(default=None)
    # the server's clock at the device's latest telemetry window and latest window with a worker crash: the
    # crash-free rate of any period ending now is two counts over these, whatever the retention left of the raw
    # windows (docs/adr/0042-telemetry-rollups-and-retention.md)
    last_window_at: Mapped[datetime | None] = mapped_column(default=None)
    last_crash_at: Mapped[datetime | None] = mapped_column(default=None)


class DeviceLog(Base):
    """One upload of a device's log lines, answering an operator's request (secrets scrubbed on the device)."""

    __tablename__ = "device_logs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id"), index=True)
    requested_at: Mapped[datetime | None] = mapped_column(default=None)
    since: Mapped[datetime]
    uploaded_at: Mapped[datetime] = mapped_column(default=utcnow)
    lines: Mapped[list[Any]] = mapped_column(default=list)
    dropped: Mapped[int] = mapped_column(Integer, default=0)


class DeviceCrash(Base):
    """One worker crash report a device uploaded (its group consenting): ``protocol.CrashReport`` as stored."""

    __tablename__ = "device_crashes"
    __table_args__ = (UniqueConstraint("device_id", "crash_id", name="uq_device_crash"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id"), index=True)
    crash_id: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime]  # the device's clock
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    reason: Mapped[str] = mapped_column(Text, default="")
    exit_code: Mapped[int | None] = mapped_column(Integer, default=None)
    signal: Mapped[str | None] = mapped_column(String(64), default=None)
    fault: Mapped[str] = mapped_column(Text, default="")
    fault_dropped: Mapped[int] = mapped_column(Integer, default=0)
    rss_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    rss_age_s: Mapped[float | None] = mapped_column(Float, default=None)
    uptime_s: Mapped[float | None] = mapped_column(Float, default=None)
    model: Mapped[str | None] = mapped_column(String(128), default=None)
    version: Mapped[str | None] = mapped_column(String(64), default=None)
    model_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    agent_version: Mapped[str | None] = mapped_column(String(64), default=None)
    runtime_version: Mapped[str | None] = mapped_column(String(64), default=None)


class InputSampleRow(Base):
    """One served input a device sampled (its group consenting: ``input_sampling``), encrypted on the device to the
    operator's X25519 key: the server keeps ciphertext it cannot read (``protocol.InputSample`` as stored)."""

    __tablename__ = "input_samples"
    __table_args__ = (UniqueConstraint("device_id", "sample_id", name="uq_input_sample"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id"), index=True)
    sample_id: Mapped[str] = mapped_column(String(64))
    group: Mapped[str | None] = mapped_column(String(128), default=None)  # the device's group at upload
    at: Mapped[datetime]  # the device's clock when the input was served
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    model: Mapped[str | None] = mapped_column(String(128), default=None)
    version: Mapped[str | None] = mapped_column(String(64), default=None)
    key_id: Mapped[str] = mapped_column(String(64))
    envelope: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the key wrap: ephemeral key, nonces
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    # samples the device had dropped (spool full, over the cap) when it sent this one: cumulative, its count
    device_dropped: Mapped[int] = mapped_column(Integer, default=0)


class ReportBatch(Base):
    __tablename__ = "report_batches"
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id"), primary_key=True)
    batch_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # indexed for the retention prune (``retention.prune``), which deletes by it
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class UpdateEventRow(Base):
    __tablename__ = "update_events"
    __table_args__ = (UniqueConstraint("device_id", "event_id", name="uq_event"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id"), index=True)
    event_id: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(128), default=None)
    version: Mapped[str | None] = mapped_column(String(64), default=None)
    rollout_id: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    # on ``verified``: what the attempt downloaded, and the version a delta rebuilt the package from (null: full)
    bytes_downloaded: Mapped[int | None] = mapped_column(BigInteger, default=None)
    delta_from: Mapped[str | None] = mapped_column(String(64), default=None)
    # the server's clock when the event arrived: waves and KPIs are judged on it, never on the device's ``at``
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class TelemetryRow(Base):
    __tablename__ = "telemetry"
    __table_args__ = (UniqueConstraint("device_id", "window_id", name="uq_window"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id"), index=True)
    window_id: Mapped[str] = mapped_column(String(64))
    start: Mapped[datetime]
    end: Mapped[datetime] = mapped_column(index=True)
    model: Mapped[str | None] = mapped_column(String(128), default=None)
    version: Mapped[str | None] = mapped_column(String(64), default=None)
    tier: Mapped[str] = mapped_column(String(64), default="")
    requests: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    worker_crashes: Mapped[int] = mapped_column(Integer, default=0)
    worker_restarts: Mapped[int] = mapped_column(Integer, default=0)
    latency: Mapped[dict[str, Any]] = mapped_column(default=dict)
    drift: Mapped[list[Any]] = mapped_column(default=list)
    max_psi: Mapped[float | None] = mapped_column(Float, default=None)
    cpu_percent: Mapped[float | None] = mapped_column(Float, default=None)
    rss_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # ``protocol.FieldFeedback`` wire form: ground truth reported in this window (None: none came)
    feedback: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # ``protocol.ShadowStats`` wire form: a shadow phase's candidate on this window's mirrored requests
    shadow: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)


class TelemetryRollup(Base):
    """Telemetry windows summed per ``bucket`` (start of a ``rollups.BUCKET_S`` slice of the server's clock) ×
    model × version × tier × ``stripe``: counts, the merged latency sketch and the merged drift bin counts.
    Written in the transaction that stores the windows (``rollups.add_windows``), so a window is counted once;
    ``stripe`` (a hash of the device id) spreads concurrent reports over a few rows instead of one hot row."""

    __tablename__ = "telemetry_rollups"
    bucket: Mapped[datetime] = mapped_column(primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    tier: Mapped[str] = mapped_column(String(64), primary_key=True)
    stripe: Mapped[int] = mapped_column(Integer, primary_key=True)
    windows: Mapped[int] = mapped_column(BigInteger, default=0)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    worker_crashes: Mapped[int] = mapped_column(BigInteger, default=0)
    # ``SketchData`` wire form of the merged sketch, and {feature: {bins: merged counts}}
    latency: Mapped[dict[str, Any]] = mapped_column(default=dict)
    drift: Mapped[dict[str, Any]] = mapped_column(default=dict)


class FieldAccuracyRollup(Base):
    """Ground-truth feedback summed like ``TelemetryRollup`` (bucket × model × version × tier × stripe): matched,
    correct and unmatched counts and the merged confusion counts ``{predicted: {label: count}}``
    (``field_accuracy.add_windows``, in the transaction that stores the windows)."""

    __tablename__ = "field_accuracy_rollups"
    bucket: Mapped[datetime] = mapped_column(primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    tier: Mapped[str] = mapped_column(String(64), primary_key=True)
    stripe: Mapped[int] = mapped_column(Integer, primary_key=True)
    matched: Mapped[int] = mapped_column(BigInteger, default=0)
    correct: Mapped[int] = mapped_column(BigInteger, default=0)
    unmatched: Mapped[int] = mapped_column(BigInteger, default=0)
    confusion: Mapped[dict[str, Any]] = mapped_column(default=dict)


class JobLease(Base):
    """Who runs a periodic job (the retention prune) until when: one replica at a time, taken over when it lapses."""

    __tablename__ = "job_leases"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), default="")
    until: Mapped[datetime] = mapped_column(default=utcnow)
    last_run_at: Mapped[datetime | None] = mapped_column(default=None)
    last_result: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Rollout(Base):
    __tablename__ = "rollouts"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    # "model": a model version; "agent": the agent bundle (``model`` is then "edgefleet-agent")
    kind: Mapped[str] = mapped_column(String(16), default="model")
    tier: Mapped[str | None] = mapped_column(String(64), default=None)
    channel: Mapped[str | None] = mapped_column(String(32), default=None)
    policy: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default="running", index=True)
    wave: Mapped[int] = mapped_column(Integer, default=0)
    wave_started_at: Mapped[datetime] = mapped_column(default=utcnow)
    reason: Mapped[str] = mapped_column(Text, default="")
    seq: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    halted_at: Mapped[datetime | None] = mapped_column(default=None)
    failed_wave_started_at: Mapped[datetime | None] = mapped_column(default=None)
    rolled_back_at: Mapped[datetime | None] = mapped_column(default=None)
    completed_at: Mapped[datetime | None] = mapped_column(default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_until: Mapped[datetime | None] = mapped_column(default=None)
    # the last error of this rollout's own step (each rollout steps on its own; one failing never stalls others)
    step_error: Mapped[str | None] = mapped_column(Text, default=None)
    # the shadow phase (controlplane/shadow.py): None (none yet, or no phase), running, passed, failed
    shadow_state: Mapped[str | None] = mapped_column(String(16), default=None)
    shadow_started_at: Mapped[datetime | None] = mapped_column(default=None)


class RolloutDevice(Base):
    __tablename__ = "rollout_devices"
    rollout_id: Mapped[str] = mapped_column(String(64), ForeignKey("rollouts.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id"), primary_key=True)
    wave: Mapped[int] = mapped_column(Integer)
    previous_model: Mapped[str | None] = mapped_column(String(128), default=None)
    previous_version: Mapped[str | None] = mapped_column(String(64), default=None)
    moved_at: Mapped[datetime] = mapped_column(default=utcnow)
    reverted: Mapped[bool] = mapped_column(Boolean, default=False)


class RolloutTransition(Base):
    """Every state change of a rollout, once: ``(rollout_id, seq)`` is unique, so two reconcilers cannot both
    record the same transition even if a lease were lost."""

    __tablename__ = "rollout_transitions"
    __table_args__ = (UniqueConstraint("rollout_id", "seq", name="uq_transition"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(String(64), ForeignKey("rollouts.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    from_state: Mapped[str] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    wave: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(default=utcnow)


class CompatEntry(Base):
    __tablename__ = "compat"
    tier: Mapped[str] = mapped_column(String(64), primary_key=True)
    runtime_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    evidence: Mapped[list[Any]] = mapped_column(default=list)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    """Append-only: the migration adds triggers that refuse UPDATE and DELETE on both backends."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers proceed during the reconciler's writes; busy_timeout rides out short write locks.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (SQLAlchemy would otherwise pick psycopg2)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


CONNECT_TIMEOUT_S = 5


class Database:
    """Engine + session factory. ``is_sqlite`` tells the reconciler it runs as the single writer."""

    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
        else:
            kwargs["pool_pre_ping"] = True
            # a database that does not answer fails a request in seconds (503, and /health/ready says so) instead
            # of holding it, and a worker thread, for the kernel's TCP timeout
            kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def ping(self) -> None:
        """One round trip to the database; raises what the driver raises when it cannot."""
        with self.engine.connect() as c:
            c.execute(text("SELECT 1"))

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One unit of work: committed on success, rolled back on any exception."""
        with self.sessions() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def migrate(self) -> None:
        from edgefleet.controlplane.migrations import upgrade

        upgrade(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()
