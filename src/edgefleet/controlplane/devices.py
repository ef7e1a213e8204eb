"""Devices: enrollment tokens (one-time, expiring; the tier is fixed by the token), enrollment, inventory, overdue
detection, pinning per device or group, revocation, device groups with their configuration document, and
the desired state each device is served. Also what the server learns about a device's reports beyond their data:
its clock's offset from the server's, and the reports it refused as invalid.

The lifecycle beyond revocation (docs/adr/0103-device-lifecycle-and-pinned-enrollment.md): an enrollment token
pins the TUF root the device accepts; decommission (revoked, plus a wipe order delivered on the next check-in);
credential rotation (the old credential works until the new one is first used); device-key rotation. Every
change bumps ``changed_at``, which the check-in caches follow."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast

from sqlalchemy import func, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from edgefleet.bench.tiers import TierProfile, default_tiers, emulation_reason
from edgefleet.controlplane.credentials import hash_secret, new_secret
from edgefleet.controlplane.db import Device, DeviceGroup, DeviceLog, EnrollmentToken, ModelVersion, utcnow
from edgefleet.errors import AuthError, ConflictError, NotFoundError
from edgefleet.protocol import (
    DesiredState,
    DeviceConfig,
    EnrollRequest,
    Hardware,
    LogUpload,
    ModelAssignment,
    ShadowOrder,
)

__all__ = [
    "CLOCK_SKEW_S",
    "Enrolled",
    "create_enrollment_token",
    "decommission",
    "desired_state",
    "device_dict",
    "enroll",
    "etag_of",
    "get_device",
    "hardware_conflict",
    "issue_credential",
    "list_devices",
    "mark_wiped",
    "pin",
    "promote_credential",
    "record_invalid_report",
    "request_rotation",
    "revoke",
    "set_group",
    "set_public_key",
    "upsert_group",
]

# A device clock further off than this is flagged: its own timestamps are then not worth reading.
CLOCK_SKEW_S = 60.0
_MAX_REASON = 500


# hex digits of the root's sha256 a token carries: 128 bits, out of reach of a second-preimage search
PIN_HEX = 32


def create_enrollment_token(
    s: Session,
    *,
    tier: str,
    group: str | None = None,
    expires_s: float = 3600.0,
    root: tuple[int, bytes] | None = None,
) -> tuple[str, EnrollmentToken]:
    """A one-time token. With ``root`` (version, bytes) the token text ends in ``.<first 32 hex of its sha256>``:
    the agent accepts only that root in the enroll answer, and the answer carries exactly that version."""
    if group is not None and s.get(DeviceGroup, group) is None:
        raise NotFoundError(f"no device group {group}: create it with PUT /api/v1/groups/{group}")
    token = new_secret("eft")
    if root is not None:
        token += "." + hashlib.sha256(root[1]).hexdigest()[:PIN_HEX]
    row = EnrollmentToken(
        token_hash=hash_secret(token),
        tier=tier,
        group=group,
        expires_at=utcnow() + timedelta(seconds=expires_s),
        root_version=root[0] if root is not None else None,
    )
    s.add(row)
    s.flush()
    return token, row


def hardware_conflict(tier: str, hw: Hardware, profiles: Mapping[str, TierProfile]) -> str | None:
    """Why a device with hardware ``hw`` cannot enroll on ``tier``, or None. Pure.

    An agent that declares it emulates the tier is taken at its word (and labelled so); one that does not must be
    the tier's hardware. A tier without a profile here (a token from before tiers were checked) has nothing to
    contradict."""
    if hw.emulates is not None:
        if hw.emulates != tier:
            return f"the agent emulates tier {hw.emulates} but its token is for tier {tier}"
        return None
    profile = profiles.get(tier)
    if profile is None:
        return None
    why = emulation_reason(profile, hw.arch, hw.isa_features)
    if why is None:
        return None
    return (
        f"hardware contradicts the token's tier: {why}; use a token for this device's own tier, or start an "
        f"emulating agent with --emulate-tier {tier}"
    )


class Enrolled(NamedTuple):
    device: Device
    credential: str  # shown once, stored hashed
    root_version: int | None  # the TUF root version the token pinned; None: serve the current root


def enroll(s: Session, req: EnrollRequest, tiers: Mapping[str, TierProfile] | None = None) -> Enrolled:
    """Spend a one-time token; returns the new device, its credential and the root version the token pinned.
    ``tiers``: the profiles the hardware is checked against (default: the shipped tiers). A re-enrollment (a
    revoked or wiped device with a new token) is a new device: the old record stays for the audit."""
    # Lock the token row so two concurrent enrollments cannot both spend it (a no-op on SQLite, which
    # serialises writers anyway).
    tok = s.scalar(
        select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_secret(req.token)).with_for_update()
    )
    now = utcnow()
    if tok is None:
        raise AuthError("unknown enrollment token: ask an operator for `edgefleet devices token --tier T`")
    if tok.used_at is not None:
        raise AuthError("this enrollment token was already used: tokens are one-time")
    if tok.expires_at <= now:
        raise AuthError("this enrollment token has expired: ask an operator for a new one")
    conflict = hardware_conflict(tok.tier, req.hardware, default_tiers() if tiers is None else tiers)
    if conflict is not None:
        # the token stays unspent: it is still good for a device of its tier
        raise ConflictError(conflict)
    device_id = "dev-" + secrets.token_hex(8)
    credential = new_secret("efd")
    dev = Device(
        id=device_id,
        tier=tok.tier,
        group=tok.group,
        credential_hash=hash_secret(credential),
        hardware=req.hardware.model_dump(mode="json"),
        memory_mb=req.hardware.memory_mb,
        chipset=req.hardware.chipset,
        runtime=req.runtime,
        runtime_version=req.runtime_version,
        agent_version=req.agent_version,
        public_key=req.public_key,
        last_seen=now,
        changed_at=now,
    )
    s.add(dev)
    tok.used_at = now
    tok.device_id = device_id
    s.flush()
    return Enrolled(dev, credential, tok.root_version)


def get_device(s: Session, device_id: str) -> Device:
    d = s.get(Device, device_id)
    if d is None:
        raise NotFoundError(f"no device {device_id}: `edgefleet devices list` shows the fleet")
    return d


def device_dict(d: Device, *, overdue_after_s: float, now: datetime | None = None) -> dict[str, Any]:
    now = now or utcnow()
    overdue = d.revoked_at is None and (d.last_seen is None or (now - d.last_seen).total_seconds() > overdue_after_s)
    lifecycle = {
        "decommissioned": d.decommissioned_at is not None,
        "decommissioned_at": d.decommissioned_at.isoformat() if d.decommissioned_at else None,
        "wipe_sent_at": d.wipe_sent_at.isoformat() if d.wipe_sent_at else None,
        "public_key": d.public_key,
        "previous_public_key": d.previous_public_key,
        "credential_rotation_pending": d.credential_rotation_requested_at is not None,
        "key_rotation_pending": d.key_rotation_requested_at is not None,
    }
    return {
        "device_id": d.id,
        "tier": d.tier,
        "group": d.group,
        "runtime": d.runtime,
        "runtime_version": d.runtime_version,
        "agent_version": d.agent_version,
        "chipset": d.chipset,
        "memory_mb": d.memory_mb,
        "hardware": d.hardware,
        "state": d.state,
        "state_reason": d.state_reason,
        "served": {"model": d.served_model, "version": d.served_version, "model_sha256": d.served_model_sha256},
        "desired": {"model": d.desired_model, "version": d.desired_version, "rollout_id": d.desired_rollout_id},
        # set while an agent rollout holds the device (None: its group's document names the agent version)
        "desired_agent": {"version": d.desired_agent_version, "rollout_id": d.desired_agent_rollout_id}
        if d.desired_agent_version
        else None,
        "models": additional_models(d),
        "several_models": bool(d.several_models),
        "pinned": {"model": d.pinned_model, "version": d.pinned_version} if d.pinned_version else None,
        "enrolled_at": d.enrolled_at.isoformat(),
        "last_seen": d.last_seen.isoformat() if d.last_seen else None,
        "overdue": overdue,
        "revoked": d.revoked_at is not None,
        "dropped_records": d.dropped_records,
        "clock_offset_s": d.clock_offset_s,
        "clock_skewed": d.clock_offset_s is not None and abs(d.clock_offset_s) > CLOCK_SKEW_S,
        "invalid_reports": d.invalid_reports or 0,
        "last_invalid_report": d.last_invalid_report,
        "last_invalid_at": d.last_invalid_at.isoformat() if d.last_invalid_at else None,
        **lifecycle,
    }


def record_invalid_report(s: Session, device_id: str, reason: str, now: datetime | None = None) -> None:
    """Count a refused report and keep its one-line reason. One UPDATE: replicas refusing at once all count."""
    s.execute(
        update(Device)
        .where(Device.id == device_id)
        .values(
            invalid_reports=func.coalesce(Device.invalid_reports, 0) + 1,
            last_invalid_report=reason[:_MAX_REASON],
            last_invalid_at=now or utcnow(),
        )
    )


def list_devices(s: Session) -> list[Device]:
    return list(s.scalars(select(Device).order_by(Device.enrolled_at)))


def _check_version(s: Session, model: str, version: str) -> None:
    if s.scalar(select(ModelVersion.id).where(ModelVersion.model == model, ModelVersion.version == version)) is None:
        raise NotFoundError(f"no version {version} of model {model}")


def pin(s: Session, device_id: str, model: str | None, version: str | None) -> Device:
    """Pin (model and version given) or unpin (both None). A pin overrides every rollout."""
    d = get_device(s, device_id)
    if version is not None:
        model = model or d.served_model or d.desired_model
        if model is None:
            raise ConflictError(f"device {device_id} runs no model yet: name the model to pin")
        _check_version(s, model, version)
    d.pinned_model, d.pinned_version = (model, version) if version is not None else (None, None)
    d.changed_at = utcnow()
    return d


def revoke(s: Session, device_id: str) -> Device:
    d = get_device(s, device_id)
    if d.revoked_at is None:
        d.revoked_at = utcnow()
        d.changed_at = d.revoked_at
    return d


def decommission(s: Session, device_id: str) -> Device:
    """Retire a device for good. It counts as revoked from now on (out of rollouts and active counts: both read
    ``revoked_at``), its record stays for the audit, and its next check-in carries the wipe order, after which
    its credential is refused."""
    d = get_device(s, device_id)
    now = utcnow()
    if d.decommissioned_at is None:
        d.decommissioned_at = now
        d.revoked_at = d.revoked_at or now
        d.credential_rotation_requested_at = d.key_rotation_requested_at = None
        d.pending_credential_hash = None
        d.changed_at = now
    return d


def mark_wiped(s: Session, device_id: str) -> bool:
    """Record that the wipe order went out (once: a concurrent check-in on another replica loses the race)."""
    now = utcnow()
    res = s.execute(
        update(Device)
        .where(Device.id == device_id, Device.decommissioned_at.is_not(None), Device.wipe_sent_at.is_(None))
        .values(wipe_sent_at=now, changed_at=now)
    )
    return bool(cast(CursorResult[Any], res).rowcount)


def _live(s: Session, device_id: str) -> Device:
    d = get_device(s, device_id)
    if d.decommissioned_at is not None:
        raise ConflictError(f"device {device_id} is decommissioned")
    if d.revoked_at is not None:
        raise ConflictError(f"device {device_id} is revoked: it must enroll again with a new token")
    return d


def request_rotation(
    s: Session, *, device_id: str | None = None, group: str | None = None, key: bool = False
) -> list[Device]:
    """Ask one device, or every live device of a group, to rotate its credential (``key`` False) or its X25519
    key pair (``key`` True); the order rides on the desired state until the device does it."""
    now = utcnow()
    if device_id is not None:
        targets = [_live(s, device_id)]
    else:
        if group is None or s.get(DeviceGroup, group) is None:
            raise NotFoundError(f"no device group {group}")
        targets = list(s.scalars(select(Device).where(Device.group == group, Device.revoked_at.is_(None))))
    for d in targets:
        if key:
            d.key_rotation_requested_at = d.key_rotation_requested_at or now
        else:
            d.credential_rotation_requested_at = d.credential_rotation_requested_at or now
        d.changed_at = now
    return targets


def issue_credential(s: Session, device_id: str) -> str:
    """A new credential for an authenticated device, kept pending: the current one works until this one is
    first used. Asked again (a lost answer), the earlier pending one is replaced."""
    d = _live(s, device_id)
    credential = new_secret("efd")
    d.pending_credential_hash = hash_secret(credential)
    d.changed_at = utcnow()
    return credential


def promote_credential(s: Session, device_id: str, cred_hash: str) -> bool:
    """The pending credential was used: it becomes the only one. False when it was not (or no longer) pending."""
    now = utcnow()
    res = s.execute(
        update(Device)
        .where(Device.id == device_id, Device.pending_credential_hash == cred_hash)
        .values(
            credential_hash=cred_hash,
            pending_credential_hash=None,
            credential_rotation_requested_at=None,
            changed_at=now,
        )
    )
    return bool(cast(CursorResult[Any], res).rowcount)


def set_public_key(s: Session, device_id: str, public_key: str) -> Device:
    """The device's new X25519 public key; the previous one is kept on the record (packages built for it still
    open on the device, which keeps the private key while it needs it)."""
    d = _live(s, device_id)
    if public_key != d.public_key:
        d.previous_public_key, d.public_key = d.public_key, public_key
    d.key_rotation_requested_at = None
    d.changed_at = utcnow()
    return d


def request_logs(s: Session, device_id: str, since: datetime) -> Device:
    """Ask a device for its log lines since ``since``: the order goes out with its next desired state. Only for a
    device whose group consents (its configuration document's ``remote_logs``): operators do not read what a
    group has not agreed to show."""
    d = _live(s, device_id)
    group = s.get(DeviceGroup, d.group) if d.group else None
    if group is None or not DeviceConfig.model_validate(group.config or {}).remote_logs:
        where = f"group {d.group}" if d.group else "no group"
        raise ConflictError(
            f"device {device_id} is in {where}, which has not consented to remote logs: set remote_logs in the "
            "group's configuration document (PUT /api/v1/groups/NAME) to allow it"
        )
    now = utcnow()
    d.logs_requested_at, d.logs_since, d.changed_at = now, since, now
    return d


def store_logs(s: Session, device_id: str, upload: LogUpload) -> DeviceLog:
    """Keep a device's answer to the open request it names; a device cannot send log lines nobody asked for."""
    d = _live(s, device_id)
    if d.logs_requested_at is None or d.logs_since is None or _instant(d.logs_since) != _instant(upload.since):
        raise ConflictError(f"device {device_id} has no open request for log lines since {upload.since.isoformat()}")
    row = DeviceLog(
        device_id=device_id,
        requested_at=d.logs_requested_at,
        since=upload.since,
        lines=list(upload.lines),
        dropped=upload.dropped,
    )
    s.add(row)
    d.logs_requested_at = d.logs_since = None
    d.changed_at = utcnow()
    return row


def latest_logs(s: Session, device_id: str) -> tuple[Device, DeviceLog | None]:
    d = get_device(s, device_id)
    row = s.scalars(
        select(DeviceLog).where(DeviceLog.device_id == device_id).order_by(DeviceLog.id.desc()).limit(1)
    ).first()
    return d, row


def _instant(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def upsert_group(
    s: Session,
    name: str,
    *,
    channel: str | None = None,
    config: dict[str, Any] | None = None,
    pinned_model: str | None = None,
    pinned_version: str | None = None,
    unpin: bool = False,
) -> DeviceGroup:
    g = s.get(DeviceGroup, name)
    if g is None:
        g = DeviceGroup(name=name, channel=channel or "stable", config={})
        s.add(g)
    elif channel is not None:
        g.channel = channel
    if config is not None:
        # The document is versioned: every change bumps its version, which devices see in the desired state.
        doc = DeviceConfig.model_validate({**config, "version": int(g.config.get("version", 0)) + 1})
        g.config = doc.model_dump(mode="json")
    if unpin:
        g.pinned_model = g.pinned_version = None
    elif pinned_version is not None:
        if pinned_model is None:
            raise ConflictError("name the model to pin the group to")
        _check_version(s, pinned_model, pinned_version)
        g.pinned_model, g.pinned_version = pinned_model, pinned_version
    s.flush()
    s.execute(update(Device).where(Device.group == name).values(changed_at=utcnow()))
    return g


def set_group(s: Session, device_id: str, group: str | None) -> Device:
    d = get_device(s, device_id)
    if group is not None and s.get(DeviceGroup, group) is None:
        raise NotFoundError(f"no device group {group}")
    d.group = group
    d.changed_at = utcnow()
    return d


def desired_state(
    d: Device,
    group: DeviceGroup | None,
    versions: dict[tuple[str, str], ModelVersion],
    *,
    repository_url: str | None = None,
) -> DesiredState:
    """What the device should run: a device pin, else a group pin, else what rollouts set; ``repository_url``
    (the server's ``--repository-url``) where devices fetch it."""
    pinned = True
    model: str | None
    version: str | None
    if d.pinned_version:
        model, version = d.pinned_model, d.pinned_version
    elif group is not None and group.pinned_version:
        model, version = group.pinned_model, group.pinned_version
    else:
        pinned = False
        model, version = d.desired_model, d.desired_version
    mv = versions.get((model, version)) if model and version else None
    config = DeviceConfig.model_validate(group.config) if group is not None and group.config else DeviceConfig()
    if d.desired_agent_version:
        # an agent rollout holds this device (controlplane/agent_rollout.py): its version, not the group's
        config = config.model_copy(update={"agent_version": d.desired_agent_version})
    return DesiredState(
        device_id=d.id,
        model=model,
        version=version if mv is not None else None,
        target=mv.target if mv is not None else None,
        package_sha256=mv.package_sha256 if mv is not None else None,
        rollout_id=None if pinned else d.desired_rollout_id,
        pinned=pinned,
        config=config,
        rotate_credential=d.credential_rotation_requested_at is not None,
        rotate_key=d.key_rotation_requested_at is not None,
        send_logs_since=_instant(d.logs_since) if d.logs_requested_at is not None and d.logs_since else None,
        wipe=d.decommissioned_at is not None,
        repository_url=repository_url,
        shadow=_shadow_order(d.desired_shadow),
        models=assignments(d.desired_models, versions, first=model),
    )


def additional_models(d: Device) -> list[dict[str, Any]]:
    """The models ``d`` runs beside its first one: each assignment with the status the agent reported for it, and
    any model still reported but no longer assigned; in name order."""
    out: dict[str, dict[str, Any]] = {}
    for x in d.desired_models or ():
        if isinstance(x, dict) and isinstance(x.get("model"), str):
            out[x["model"]] = {
                "model": x["model"],
                "desired_version": x.get("version"),
                "rollout_id": x.get("rollout_id"),
                "state": None,
                "served_version": None,
                "reason": None,
            }
    for x in d.reported_models or ():
        if isinstance(x, dict) and isinstance(x.get("model"), str):
            row = out.setdefault(x["model"], {"model": x["model"], "desired_version": None, "rollout_id": None})
            row.update(state=x.get("state"), served_version=x.get("version"), reason=x.get("reason"))
    return [out[k] for k in sorted(out)]


def assignments(
    doc: list[Any] | None, versions: dict[tuple[str, str], ModelVersion], *, first: str | None
) -> list[ModelAssignment]:
    """The device's additional models as the reconciler stored them (``[{model, version, rollout_id}]``), each
    with its registered target; one whose version is not registered (deleted since) or that names the first model
    is left out."""
    out: list[ModelAssignment] = []
    for x in doc or ():
        if not isinstance(x, dict) or x.get("model") == first:
            continue
        mv = versions.get((x.get("model"), x.get("version")))  # type: ignore[arg-type]
        if mv is None:
            continue
        out.append(
            ModelAssignment(
                model=mv.model,
                version=mv.version,
                target=mv.target,
                package_sha256=mv.package_sha256,
                rollout_id=x.get("rollout_id"),
            )
        )
    return out


def _shadow_order(doc: dict[str, Any] | None) -> ShadowOrder | None:
    """The device's shadow order as the reconciler stored it; one that no longer parses is left out."""
    if not doc:
        return None
    try:
        return ShadowOrder.model_validate(doc)
    except ValueError:
        return None


# absent unless set: agents that predate them refuse unknown fields
_LIFECYCLE = ("rotate_credential", "rotate_key", "wipe", "send_logs_since", "repository_url", "shadow", "models")
_DELIVERY_UNSET: dict[str, object] = {
    "download_rate_bps": None,
    "download_stagger_s": 0.0,
    "maintenance_windows": [],
    "timezone": None,
    "remote_logs": False,
    "crash_reports": False,
    "input_sampling": False,
    "sample_rate_per_min": 1.0,
    "sample_public_key": None,
    "routing": None,
    "agent_version": None,
}


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def render(ds: DesiredState) -> bytes:
    doc = ds.model_dump(mode="json")
    for k in _LIFECYCLE:  # absent unless set: agents older than these fields refuse unknown ones
        if not doc[k]:
            del doc[k]
    for k, unset in _DELIVERY_UNSET.items():  # the same for the delivery controls of the config document
        if doc["config"].get(k) == unset:
            del doc["config"][k]
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def public_keys(s: Session, tier: str | None = None, group: str | None = None) -> list[dict[str, Any]]:
    """The X25519 public keys of the active devices (neither revoked nor decommissioned) of ``tier`` and/or
    ``group``, to encrypt a package for: each device's current key only (``previous_public_key``, a key being
    rotated out, is not listed)."""
    from edgefleet.package.keys import key_id

    q = select(Device).where(Device.revoked_at.is_(None), Device.decommissioned_at.is_(None), Device.public_key != "")
    if tier is not None:
        q = q.where(Device.tier == tier)
    if group is not None:
        q = q.where(Device.group == group)
    return [
        {
            "device_id": d.id,
            "tier": d.tier,
            "group": d.group,
            "public_key": d.public_key,
            "key_id": key_id(d.public_key),
        }
        for d in s.scalars(q.order_by(Device.enrolled_at, Device.id))
    ]
