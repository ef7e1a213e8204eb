"""Input samples: served inputs that devices sample when their group consents (``input_sampling`` in its
configuration document), sealed on the device for the operator's X25519 key (docs/operations.md, "Input
sampling"). The control plane stores ciphertext it cannot read, lists it and hands it out
(``GET /devices/{id}/samples``, ``edgefleet samples pull``); only the private key's holder opens a sample.

A device cannot send samples for a group that has not consented (409): the consent is checked here as well as on
the device. Uploads are idempotent by ``sample_id`` (a lost answer is sent again; it is stored once), and each
device keeps its newest :data:`KEEP_PER_DEVICE` here.
"""

from __future__ import annotations

import base64
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgefleet.controlplane.db import Device, InputSampleRow
from edgefleet.controlplane.devices import get_device
from edgefleet.controlplane.uploads import consenting_device, group_config, newest, store_once
from edgefleet.errors import NotFoundError
from edgefleet.protocol import InputSample, SampleUpload

__all__ = [
    "KEEP_PER_DEVICE",
    "envelope_dict",
    "get_sample",
    "group_config",
    "list_samples",
    "sample_dict",
    "sampling_status",
    "store_samples",
]

KEEP_PER_DEVICE = 100
_WRAP = ("ephemeral_public_key", "wrap_nonce", "wrapped_key", "nonce")


def sampling_status(s: Session, d: Device) -> dict[str, Any]:
    """Whether the device samples its inputs and at what rate (as its group's document says), and what is stored."""
    from edgefleet.package.keys import key_id

    cfg = group_config(s, d)
    on = cfg.input_sampling and cfg.sample_public_key is not None
    count, newest = s.execute(
        select(func.count(InputSampleRow.id), func.max(InputSampleRow.received_at)).where(
            InputSampleRow.device_id == d.id
        )
    ).one()
    last = s.scalars(
        select(InputSampleRow.device_dropped)
        .where(InputSampleRow.device_id == d.id)
        .order_by(InputSampleRow.received_at.desc(), InputSampleRow.id.desc())
        .limit(1)
    ).first()
    return {
        "consent": bool(on),
        "rate_per_min": cfg.sample_rate_per_min if on else None,
        "key_id": key_id(cfg.sample_public_key) if on and cfg.sample_public_key else None,
        "stored": int(count or 0),
        "newest_received_at": newest.isoformat() if newest is not None else None,
        "dropped_on_device": last,
    }


def store_samples(s: Session, device_id: str, upload: SampleUpload) -> tuple[list[str], list[str]]:
    """Keep the samples of a consenting device's upload. Returns (every id it sent that is now stored, the ids
    new with this upload)."""
    d = consenting_device(
        s, device_id, lambda c: c.input_sampling, "input sampling", "input_sampling and sample_public_key"
    )

    def row(x: InputSample) -> InputSampleRow:
        return InputSampleRow(
            device_id=device_id,
            sample_id=x.sample_id,
            group=d.group,
            at=x.at,
            model=x.model,
            version=x.version,
            key_id=x.key_id,
            envelope={k: getattr(x, k) for k in _WRAP},
            ciphertext=base64.b64decode(x.ciphertext),
            device_dropped=upload.dropped,
        )

    items = ((x.sample_id, lambda x=x: row(x)) for x in upload.samples)
    return store_once(s, InputSampleRow, "sample_id", device_id, items, KEEP_PER_DEVICE)


def list_samples(s: Session, device_id: str, limit: int = 50) -> tuple[Device, list[InputSampleRow]]:
    """The device and its newest ``limit`` samples, newest first (by the device's clock)."""
    return newest(s, InputSampleRow, device_id, limit)


def get_sample(s: Session, device_id: str, sample_id: str) -> InputSampleRow:
    get_device(s, device_id)
    row = s.scalars(
        select(InputSampleRow).where(InputSampleRow.device_id == device_id, InputSampleRow.sample_id == sample_id)
    ).first()
    if row is None:
        raise NotFoundError(f"device {device_id} has no input sample {sample_id}")
    return row


def sample_dict(r: InputSampleRow) -> dict[str, Any]:
    return {
        "sample_id": r.sample_id,
        "at": r.at.isoformat(),
        "received_at": r.received_at.isoformat(),
        "model": r.model,
        "version": r.version,
        "key_id": r.key_id,
        "bytes": len(r.ciphertext),
    }


def envelope_dict(r: InputSampleRow) -> dict[str, Any]:
    """The sample as the device sealed it (``protocol.InputSample``), for the key's holder to open."""
    return {
        "sample_id": r.sample_id,
        "at": r.at.isoformat(),
        "model": r.model,
        "version": r.version,
        "key_id": r.key_id,
        **{k: r.envelope[k] for k in _WRAP},
        "ciphertext": base64.b64encode(r.ciphertext).decode(),
    }
