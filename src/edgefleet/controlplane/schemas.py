"""The response bodies of the operator API (``/api/v1``), as pydantic models: the OpenAPI document's schemas and
what the Python SDK (:mod:`edgefleet.sdk`) returns.

The routes build plain dicts (the dashboard renders the same dicts); FastAPI validates each against its route's
model here and serializes only the keys the dict had (``response_model_exclude_unset``), so a body is exactly what
it was before these models existed. Every model forbids unknown keys: a key a route starts returning without its
model saying so fails the tests, instead of vanishing from the body or from the schema. Timestamps stay the ISO
strings the routes write (a ``datetime`` field would re-format them). Stored documents a client sends in (a gate
verdict, a bench report, a manifest, evidence records) are free-form objects.

This module imports pydantic and the wire protocol only: the SDK uses it without FastAPI or SQLAlchemy.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgefleet.protocol import DesiredState

__all__ = [
    "ApiToken",
    "ApiTokenCreated",
    "ApiTokenRevoked",
    "ApiTokenRotated",
    "AuditEntry",
    "CompatAgent",
    "CompatCell",
    "CompatCleared",
    "CrashReportOut",
    "Device",
    "DeviceCrashes",
    "DeviceDetail",
    "DeviceKey",
    "DeviceSamples",
    "EnrollmentToken",
    "FleetKpis",
    "Group",
    "GroupRotation",
    "InputSampleOut",
    "Model",
    "ModelVersion",
    "ModelVersionDetail",
    "ReleasePolicyDoc",
    "Rollout",
    "RolloutAction",
    "RolloutDetail",
    "RolloutPlanPreview",
    "RolloutStarted",
    "SampleDownload",
    "SampleEnvelope",
    "SamplingStatus",
    "WhoAmI",
]


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------------------ tokens


class WhoAmI(_Out):
    name: str
    role: str | None


class ApiToken(_Out):
    id: int
    name: str
    role: str
    created_at: str
    expires_at: str | None
    never_expires: bool
    status: Literal["active", "expired", "revoked"]
    revoked: bool
    replaced_by: int | None = Field(description="the token that replaced this one, once rotated")


class ApiTokenCreated(ApiToken):
    token: str = Field(description="the secret: shown once, only its hash is stored")


class ApiTokenRotated(ApiTokenCreated):
    replaces: int
    old_valid_until: str


class ApiTokenRevoked(_Out):
    id: int
    revoked: bool


class AuditEntry(_Out):
    id: int
    at: str
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


# ------------------------------------------------------------------------------------------------ fleet KPIs


class FleetDevices(_Out):
    total: int
    active: int
    revoked: int
    overdue: int
    overdue_ids: list[str]


class LatencyKpi(_Out):
    model: str
    version: str
    tier: str
    p95_ms: float | None
    requests: int
    error_rate: float | None


class DriftKpi(_Out):
    model: str
    version: str
    feature: str
    psi: float | None = Field(description="None below the minimum sample")
    n: int
    status: str = Field(description="ok, alert, or 'not enough data'")


class DriftAlert(_Out):
    model: str
    version: str
    feature: str
    psi: float | None


class Confusion(_Out):
    predicted: str
    label: str
    count: int


class FieldAccuracyKpi(_Out):
    model: str
    version: str
    tier: str
    matched: int = Field(description="feedback matched to a served request's prediction")
    correct: int
    unmatched: int = Field(description="feedback for an unknown or expired request id (answered 404 on the device)")
    accuracy: float | None = Field(description="correct / matched; None without matched feedback")
    confusions: list[Confusion] = Field(description="the most frequent wrong (predicted, label) pairs")


class RolloutKpi(_Out):
    rollout_id: str
    model: str
    version: str
    state: str
    wave: int
    devices_moved: int
    time_to_halt_s: float | None
    time_to_rollback_s: float | None
    devices_restored: int
    step_error: str | None


class FleetKpis(_Out):
    at: str
    devices: FleetDevices
    latency: list[LatencyKpi]
    crash_free_rate: float | None
    update_success_rate: float | None
    updates: dict[str, int] = Field(description="update outcome → count over the window")
    fragmentation: dict[str, int] = Field(description="tier → distinct model versions served")
    fragmentation_index: int
    drift: list[DriftKpi]
    drift_alerts: list[DriftAlert]
    rollouts: list[RolloutKpi]
    field_accuracy: list[FieldAccuracyKpi] = Field(
        default_factory=list, description="ground truth reported by applications, per model × version × tier"
    )


# ------------------------------------------------------------------------------------------------ compat


class CompatAgent(_Out):
    agent_version: str = Field(description="the agent the devices ran; empty: evidence from before agents reported it")
    status: str
    devices: int = Field(description="distinct devices whose evidence came under this agent")


class CompatCell(_Out):
    tier: str
    runtime: str = "onnxruntime"  # onnxruntime, litert or openvino: the runtime the version's package runs on
    runtime_version: str
    model: str
    version: str
    status: str
    failing_devices: list[str]
    agents: list[CompatAgent] = Field(
        default_factory=list, description="the cell's status under each agent version its device evidence came from"
    )
    evidence: list[dict[str, Any]]


class CompatCleared(CompatCell):
    previous_status: str


# ------------------------------------------------------------------------------------------------ devices


class EnrollmentToken(_Out):
    token: str = Field(description="the one-time enrollment token: shown once")
    tier: str
    group: str | None
    expires_at: str
    root_version: int | None = Field(description="the TUF root version the token pins")


class ServedModel(_Out):
    model: str | None
    version: str | None
    model_sha256: str | None


class DesiredModel(_Out):
    model: str | None
    version: str | None
    rollout_id: str | None


class DesiredAgent(_Out):
    version: str = Field(description="the agent version an agent rollout gives the device, over its group's")
    rollout_id: str | None


class Pin(_Out):
    model: str | None
    version: str


class AdditionalModel(_Out):
    """A model the device runs beside its first one (docs/controlplane.md, "Several models")."""

    model: str
    desired_version: str | None = Field(description="the version assigned; none: no longer assigned, still reported")
    rollout_id: str | None
    state: str | None = Field(description="the agent's update state for this model; none: not reported yet")
    served_version: str | None
    reason: str | None


class Device(_Out):
    device_id: str
    tier: str
    group: str | None
    runtime: str
    runtime_version: str
    agent_version: str
    chipset: str | None
    memory_mb: int | None
    hardware: dict[str, Any]
    state: str | None
    state_reason: str | None
    served: ServedModel
    desired: DesiredModel
    desired_agent: DesiredAgent | None = None
    models: list[AdditionalModel] = Field(
        default_factory=list, description="the models it runs beside its first one (served, desired)"
    )
    several_models: bool = Field(False, description="its agent serves additional models beside the first")
    pinned: Pin | None
    enrolled_at: str
    last_seen: str | None
    overdue: bool
    revoked: bool
    dropped_records: int
    clock_offset_s: float | None
    clock_skewed: bool
    invalid_reports: int
    last_invalid_report: str | None
    last_invalid_at: str | None
    decommissioned: bool
    decommissioned_at: str | None
    wipe_sent_at: str | None
    public_key: str
    previous_public_key: str | None
    credential_rotation_pending: bool
    key_rotation_pending: bool


class DeviceDetail(Device):
    desired_state: DesiredState | None = Field(
        None, description="what the device is told on its next check-in (absent until this server has rendered it)"
    )


class LogsUpload(_Out):
    requested_at: str | None
    since: str
    uploaded_at: str
    lines: list[str] = Field(description="the device's log lines, oldest first, its secrets scrubbed on the device")
    dropped: int = Field(description="older lines left out: the device keeps and sends at most 2000")


class DeviceLogs(_Out):
    device_id: str
    requested_at: str | None = Field(description="the open request, if any: the device answers on its next check-in")
    pending: bool
    upload: LogsUpload | None = Field(description="the latest answer (none yet: null)")


class CrashReportOut(_Out):
    crash_id: str
    at: str = Field(description="the device's clock when its agent saw the worker end")
    received_at: str
    reason: str
    exit_code: int | None = Field(description="the worker's exit status; negative: the signal that ended it")
    signal: str | None
    fault: str = Field(description="the Python traceback faulthandler wrote (its tail); empty for SIGKILL")
    fault_dropped: int = Field(description="characters cut from the head of the traceback")
    rss_bytes: int | None = Field(description="the worker's last sampled RSS, rss_age_s before it ended")
    rss_age_s: float | None
    uptime_s: float | None
    model: str | None
    version: str | None
    model_sha256: str | None
    agent_version: str | None
    runtime_version: str | None


class DeviceCrashes(_Out):
    device_id: str
    consent: bool = Field(description="whether the device's group consents to crash reports (crash_reports)")
    crashes: list[CrashReportOut] = Field(description="newest first (by the device's clock)")


class SamplingStatus(_Out):
    consent: bool = Field(
        description="whether the device's group consents to input sampling (input_sampling, with sample_public_key)"
    )
    rate_per_min: float | None = Field(description="at most this many inputs sampled a minute; null: sampling off")
    key_id: str | None = Field(description="the id of the operator key the samples are encrypted to; null: off")
    stored: int = Field(description="samples of this device the control plane keeps")
    newest_received_at: str | None
    dropped_on_device: int | None = Field(
        description="samples the device dropped (its spool full), as of its latest upload; null: none uploaded"
    )


class InputSampleOut(_Out):
    sample_id: str
    at: str = Field(description="the device's clock when the input was served")
    received_at: str
    model: str | None
    version: str | None
    key_id: str = Field(description="the operator key it is encrypted to")
    bytes: int = Field(description="ciphertext bytes")


class DeviceSamples(_Out):
    device_id: str
    sampling: SamplingStatus
    samples: list[InputSampleOut] = Field(description="newest first (by the device's clock); encrypted, see pull")


class SampleEnvelope(_Out):
    """``protocol.InputSample`` as the device sealed it: only the private key of ``key_id`` opens it."""

    sample_id: str
    at: str
    model: str | None
    version: str | None
    key_id: str
    ephemeral_public_key: str
    wrap_nonce: str
    wrapped_key: str
    nonce: str
    ciphertext: str = Field(description="base64")


class SampleDownload(_Out):
    device_id: str
    received_at: str
    sample: SampleEnvelope


class DeviceKey(_Out):
    device_id: str
    tier: str
    group: str | None
    public_key: str
    key_id: str


class GroupRotation(_Out):
    group: str
    key: bool
    devices: list[str] = Field(description="the devices asked to rotate")


class Group(_Out):
    name: str
    channel: str | None
    config: dict[str, Any] | None
    pinned: Pin | None


# ------------------------------------------------------------------------------------------------ registry


class ModelVersion(_Out):
    model: str
    version: str
    channel: str
    target: str
    package_sha256: str
    model_sha256: str
    length: int
    requirements: dict[str, Any]
    lineage: dict[str, Any]
    gate: Any = Field(description="the attached gate verdict's outcome, if any")
    created_at: str
    drift_features: list[str] | None


class PolicyValues(_Out):
    require_gate: bool
    require_bench: bool


class PolicySource(_Out):
    require_gate: str = Field(description="default, global or model")
    require_bench: str


class ReleaseOverride(_Out):
    at: str
    actor: str
    overrode: str | None
    reason: str | None


class ReleaseStatus(_Out):
    allowed: bool
    refusal: str | None
    policy: PolicyValues
    policy_source: PolicySource
    package_sha256: str
    gate: dict[str, Any] | None
    gate_bound: dict[str, Any] | None
    gate_matches_package: bool
    bench: dict[str, Any] | None
    overrides: list[ReleaseOverride]


class ModelVersionDetail(_Out):
    model: str
    version: str
    channel: str
    target: str
    package_sha256: str
    model_sha256: str
    length: int
    requirements: dict[str, Any]
    lineage: dict[str, Any]
    gate: dict[str, Any] | None = Field(description="the attached gate verdict, whole")
    created_at: str
    evidence: dict[str, Any] | None
    drift_features: list[str] | None
    bench: dict[str, Any] | None = Field(description="the attached bench report, whole")
    manifest: dict[str, Any]
    release: ReleaseStatus


class Model(_Out):
    model: str
    versions: list[ModelVersion]
    channels: dict[str, str] = Field(description="channel → the newest version in it")


class PolicyOverride(_Out):
    require_gate: bool | None
    require_bench: bool | None
    updated_by: str
    updated_at: str


class ReleasePolicyDoc(_Out):
    model_config = ConfigDict(populate_by_name=True)

    model: str | None
    effective: PolicyValues
    source: PolicySource
    default: PolicyValues
    global_: PolicyOverride | None = Field(alias="global")
    models: dict[str, PolicyOverride]


# ------------------------------------------------------------------------------------------------ rollouts


class Rollout(_Out):
    rollout_id: str
    kind: str = Field("model", description="model: a model version; agent: the agent bundle (model edgefleet-agent)")
    model: str
    version: str
    tier: str | None
    channel: str | None
    state: str
    wave: int
    # echoed from the stored policy document, whatever it holds: a rollout whose policy no longer parses must
    # still be shown (with its step_error), not answered with a 500
    waves: Any = Field(description="the wave percentages of the rollout's policy")
    reason: str | None
    created_at: str
    created_by: str
    wave_started_at: str
    blocked: str | None
    step_error: str | None


class RolloutDeviceEntry(_Out):
    device_id: str
    wave: int
    previous_version: str | None
    reverted: bool


class RolloutTransition(_Out):
    model_config = ConfigDict(populate_by_name=True)

    seq: int
    from_: str = Field(alias="from")
    to: str
    wave: int
    reason: str
    actor: str
    at: str


class ShadowHalf(_Out):
    compared: int
    agreed: int


class ShadowTier(_Out):
    tier: str
    devices: int
    compared: int = Field(description="mirrored requests the candidate ran, its errors included")
    agreed: int
    agreement: float | None = Field(description="agreed / compared; None before the first comparison")
    errors: int
    dropped: int = Field(description="mirrored requests not run: the candidate busy or over its CPU share")
    p95_ms: float | None = Field(description="the candidate's compute p95 on the mirrored requests")
    halves: list[ShadowHalf] = Field(description="the earlier and the later half of the phase, by server time")


class RolloutShadow(_Out):
    state: str = Field(description="running, passed (the canary started) or failed (the rollout halted)")
    started_at: str | None
    tiers: list[ShadowTier]


class RolloutDetail(Rollout):
    policy: dict[str, Any]
    devices: list[RolloutDeviceEntry]
    transitions: list[RolloutTransition]
    shadow: RolloutShadow | None = Field(None, description="the shadow phase before the canary, if the policy has one")


class PlanWave(_Out):
    wave: int
    percent: float
    devices: list[str]


class Plan(_Out):
    waves: list[PlanWave]
    devices: int
    already_on_version: list[str]
    excluded: dict[str, str] = Field(description="device → why it is never targeted")
    blocked: str | None


class RolloutStarted(Rollout):
    plan: Plan
    warning: str | None


class ReleaseVerdict(_Out):
    allowed: bool
    refusal: str | None


class RolloutPlanPreview(_Out):
    kind: str = "model"
    model: str
    version: str
    tier: str | None
    channel: str | None
    waves: list[PlanWave]
    devices: int
    already_on_version: list[str]
    excluded: dict[str, str] = Field(description="device → why it is never targeted")
    blocked: str | None
    release: ReleaseVerdict


class RolloutAction(_Out):
    rollout_id: str
    state: str
    reason: str | None
