"""Consented input sampling (docs/operations.md, "Input sampling"): served inputs, a few a minute, sealed on the
device for the operator's X25519 key and uploaded while the device's group consents.

The pieces, from the request to the control plane:

* ``WorkerSampler``, in the inference worker (``worker/sampler.py``): after a request is answered (never before:
  sampling never delays an answer), it keeps a copy of the inputs when its rate limiter admits one — at most
  ``sample_rate_per_min`` a minute, evenly spaced — and ships what it kept to the agent in ``("samples", …)``
  frames: when ``SHIP_BATCH`` are waiting, when the oldest has waited ``SHIP_AFTER_S``, and before every drift
  answer (each telemetry window) or stop. The worker only copies arrays: the sealing is the agent's, so the
  worker stays lean (that module imports the standard library, numpy and the frames, nothing else).
* :func:`keep_samples`, in the agent: :func:`seal` each one (:func:`pack` its tensors and metadata, then the
  package encryption of docs/adr/0003-package-encryption-x25519-hkdf-aes-gcm.md: AES-256-GCM under a random
  content key wrapped for the operator key with an ephemeral X25519 key and HKDF-SHA256, the AAD binding the
  ciphertext to its ``sample_id``) into the :class:`SampleSpool`: bounded on disk, oldest dropped first and counted.
  An :class:`ArrivalCap` holds the worker to the rate too: a worker runs a model that may be hostile.
* The agent uploads the spool (``POST /devices/{id}/samples``) while ``DeviceConfig.input_sampling`` holds — the
  control plane checks it too — and purges it when the group withdraws consent. :func:`open_sample` is the
  operator's side (``edgefleet samples pull``): only the private key opens a sample.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import struct
import threading
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.agent.worker.sampler import MAX_PLAIN_BYTES, SHIP_BATCH

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from edgefleet.protocol import DeviceConfig, InputSample

__all__ = [
    "ArrivalCap",
    "OpenedSample",
    "SampleSpool",
    "keep_samples",
    "npz_bytes",
    "open_sample",
    "pack",
    "sampling_rate",
    "seal",
    "unpack",
]

log = logging.getLogger("edgefleet.agent")

SPOOL_MAX_BYTES = 32 * 1024 * 1024
SPOOL_MAX_FILES = 256
_MAGIC = b"EFS1"
_SUFFIX = ".sample.json"


def sampling_rate(config: DeviceConfig) -> float:
    """Inputs a minute the device samples under ``config``: none unless its group consents and names the key."""
    if not config.input_sampling or config.sample_public_key is None:
        return 0.0
    return float(config.sample_rate_per_min)


# ------------------------------------------------------------------------------------------------ the agent


class ArrivalCap:
    """The agent's check on the worker: at most ``per_min`` samples plus one batch accepted in any minute of
    arrival (a worker that keeps the rate never meets it; batching shifts arrivals by a few seconds at most)."""

    def __init__(self, per_min: float, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self.times: deque[float] = deque()
        self.limit = 0
        self.set_rate(per_min)

    def set_rate(self, per_min: float) -> None:
        self.limit = math.ceil(per_min) + SHIP_BATCH if per_min > 0 else 0

    def admit(self, now: float, n: int) -> int:
        """How many of ``n`` samples arriving now to keep (the first ones)."""
        while self.times and now - self.times[0] >= self.window_s:
            self.times.popleft()
        take = max(0, min(n, self.limit - len(self.times)))
        self.times.extend([now] * take)
        return take


@dataclass(frozen=True)
class OpenedSample:
    """A decrypted sample: what the device served (``tensors``) and its metadata (model, version, time, ids)."""

    meta: dict[str, Any]
    tensors: dict[str, np.ndarray]


def pack(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> bytes:
    """The plaintext a sample seals: ``EFS1``, the metadata's JSON length (4 bytes, big-endian), that JSON, then
    the tensors as an uncompressed ``.npz`` (read back without pickle)."""
    head = json.dumps(dict(meta), sort_keys=True, separators=(",", ":")).encode()
    return _MAGIC + struct.pack(">I", len(head)) + head + npz_bytes(tensors)


def npz_bytes(tensors: Mapping[str, np.ndarray]) -> bytes:
    """``tensors`` as an uncompressed ``.npz`` (what ``numpy.savez`` writes, for any tensor name: savez would take
    one named ``file`` or ``allow_pickle`` for its own argument)."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, value in tensors.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)
    return buf.getvalue()


def unpack(plain: bytes, *, max_bytes: int = 4 * MAX_PLAIN_BYTES) -> OpenedSample:
    """:func:`pack` undone; ValueError for bytes it did not make, or tensors that would unpack past ``max_bytes``
    (a device, even one that holds the key's public half only, must not make the operator's machine allocate
    without bound)."""
    import zipfile

    if plain[:4] != _MAGIC or len(plain) < 8:
        raise ValueError("not a sealed input sample")
    (n,) = struct.unpack(">I", plain[4:8])
    meta = json.loads(plain[8 : 8 + n])
    if not isinstance(meta, dict):
        raise ValueError("the sample's metadata is not an object")
    body = io.BytesIO(plain[8 + n :])
    with zipfile.ZipFile(body) as z:
        claimed = sum(i.file_size for i in z.infolist())
    if claimed > max_bytes:
        raise ValueError(f"its tensors would unpack to {claimed} bytes, over {max_bytes}")
    body.seek(0)
    with np.load(body, allow_pickle=False) as npz:
        tensors = {name: npz[name] for name in npz.files}
    return OpenedSample(meta, tensors)


def _aad(sample_id: str) -> str:
    return f"edgefleet.sample.v1:{sample_id}"


def seal(
    tensors: Mapping[str, np.ndarray],
    public_key: str,
    *,
    at: datetime,
    device_id: str | None,
    model: str | None,
    version: str | None,
    sample_id: str | None = None,
) -> InputSample:
    """``tensors`` sealed for ``public_key`` (X25519, hex) as the wire's :class:`~edgefleet.protocol.InputSample`;
    the metadata is inside the ciphertext too, so the operator reads it as the device wrote it."""
    from edgefleet.package.crypto import encrypt_model
    from edgefleet.protocol import InputSample

    sid = sample_id or uuid.uuid4().hex
    meta = {"sample_id": sid, "device_id": device_id, "model": model, "version": version, "at": at.isoformat()}
    # encrypt_model is the package encryption: its "model_sha256" argument is the AAD, here the sample's id
    ciphertext, info = encrypt_model(pack(tensors, meta), _aad(sid), [public_key])
    r = info.recipients[0]
    return InputSample(
        sample_id=sid,
        at=at,
        model=model[:128] if model else None,
        version=version[:64] if version else None,
        key_id=r.key_id,
        ephemeral_public_key=r.ephemeral_public_key,
        wrap_nonce=r.nonce,
        wrapped_key=r.wrapped_key,
        nonce=info.nonce,
        ciphertext=base64.b64encode(ciphertext).decode(),
    )


def open_sample(sample: InputSample, key: X25519PrivateKey) -> OpenedSample:
    """Decrypt ``sample`` with the operator's private key; :class:`~edgefleet.errors.DecryptionError` (one line)
    for another key, or a sample altered since the device sealed it."""
    from edgefleet.errors import DecryptionError
    from edgefleet.package.crypto import decrypt_model
    from edgefleet.package.keys import key_id, public_key_hex
    from edgefleet.package.manifest import EncryptionInfo, Recipient

    mine = key_id(public_key_hex(key))
    if sample.key_id != mine:
        raise DecryptionError(
            f"sample {sample.sample_id} is encrypted to key {sample.key_id}, not to this key ({mine}): use the "
            "private key whose public key the group's sample_public_key names"
        )
    info = EncryptionInfo(
        nonce=sample.nonce,
        recipients=[
            Recipient(
                key_id=sample.key_id,
                ephemeral_public_key=sample.ephemeral_public_key,
                nonce=sample.wrap_nonce,
                wrapped_key=sample.wrapped_key,
            )
        ],
    )
    try:
        plain = decrypt_model(base64.b64decode(sample.ciphertext), info, _aad(sample.sample_id), key)
    except DecryptionError:
        raise DecryptionError(
            f"sample {sample.sample_id} does not decrypt with key {mine}: it was altered after the device sealed it"
        ) from None
    try:
        opened = unpack(plain)
    except (ValueError, OSError) as err:
        raise DecryptionError(f"sample {sample.sample_id} decrypts, but not to a sample: {err}") from None
    if opened.meta.get("sample_id") != sample.sample_id:
        raise DecryptionError(f"sample {sample.sample_id} holds the sealed content of another sample")
    return opened


class SampleSpool:
    """The sealed samples waiting for upload: ``<folder>/<capture time ns>-<id>.sample.json``, at most
    ``max_files`` and ``max_bytes`` (the oldest deleted first when a new one comes; ``dropped`` counts them, kept
    in ``<folder>/dropped`` across restarts). Safe to add to from a thread while the event loop uploads."""

    def __init__(self, folder: Path, *, max_bytes: int = SPOOL_MAX_BYTES, max_files: int = SPOOL_MAX_FILES) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.max_files = max_files
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.dropped = int((folder / "dropped").read_text())
        except (OSError, ValueError):
            self.dropped = 0

    def _files(self) -> list[Path]:
        return sorted(self.folder.glob(f"*{_SUFFIX}"))

    def __len__(self) -> int:
        return len(self._files())

    def add(self, sample: InputSample) -> int:
        """Keep ``sample``; returns how many older ones were dropped to make room."""
        from edgefleet._fs import atomic_write

        stamp = f"{int(sample.at.timestamp() * 1e9):020d}"
        with self._lock:
            atomic_write(self.folder / f"{stamp}-{sample.sample_id}{_SUFFIX}", sample.model_dump_json().encode())
            files = self._files()
            sizes = [f.stat().st_size for f in files]
            total, cut = sum(sizes), 0
            while cut < len(files) - 1 and (len(files) - cut > self.max_files or total > self.max_bytes):
                total -= sizes[cut]
                cut += 1
            for f in files[:cut]:
                f.unlink(missing_ok=True)
            if cut:
                self._count(cut)
        if cut:
            log.warning("dropped %d older input sample(s): the device keeps at most %d", cut, self.max_files)
        return cut

    def count_dropped(self, n: int) -> None:
        """Samples lost before they reached the spool (over the cap, unsealable): counted with the rest."""
        if n > 0:
            with self._lock:
                self._count(n)

    def _count(self, n: int) -> None:
        from edgefleet._fs import atomic_write

        self.dropped += n
        atomic_write(self.folder / "dropped", str(self.dropped).encode())

    def pending(self, limit: int, max_bytes: int) -> list[InputSample]:
        """The oldest samples, at most ``limit`` and (beyond the first) ``max_bytes`` of JSON together; a file the
        protocol refuses is deleted (it would never be taken) and counted as dropped."""
        from edgefleet.protocol import InputSample

        out: list[InputSample] = []
        used = 0
        for f in self._files():
            if len(out) >= limit:
                break
            try:
                data = f.read_bytes()
                sample = InputSample.model_validate_json(data)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as err:
                log.warning("deleting unreadable input sample %s: %s", f.name, " ".join(str(err).split())[:300])
                f.unlink(missing_ok=True)
                self.count_dropped(1)
                continue
            if out and used + len(data) > max_bytes:
                break
            used += len(data)
            out.append(sample)
        return out

    def forget(self, sample_ids: Iterable[str]) -> int:
        """Delete the samples the control plane acknowledged; returns how many."""
        ids = set(sample_ids)
        gone = [f for f in self._files() if f.name.removesuffix(_SUFFIX).split("-", 1)[-1] in ids]
        for f in gone:
            f.unlink(missing_ok=True)
        return len(gone)

    def purge(self) -> int:
        """Delete every sample (consent withdrawn: what was sampled under it never leaves); returns how many."""
        files = self._files()
        for f in files:
            f.unlink(missing_ok=True)
        return len(files)


def keep_samples(
    spool: SampleSpool,
    batch: list[tuple[float, dict[str, np.ndarray]]],
    public_key: str,
    *,
    device_id: str | None,
    model: str | None,
    version: str | None,
) -> int:
    """Seal each ``(unix time, tensors)`` the worker sampled and add it to ``spool`` (run in a thread: the
    encryption and the writes stay off the event loop). Returns how many were kept."""
    from edgefleet.protocol import MAX_SAMPLE_BYTES

    kept = 0
    for at, tensors in batch:
        try:
            if sum(a.nbytes for a in tensors.values()) > MAX_SAMPLE_BYTES:
                raise ValueError(f"its tensors are over {MAX_SAMPLE_BYTES} bytes")
            when = datetime.fromtimestamp(at, UTC)
            spool.add(seal(tensors, public_key, at=when, device_id=device_id, model=model, version=version))
            kept += 1
        except Exception as err:  # one sample that cannot be kept must not lose the others
            spool.count_dropped(1)
            log.warning("an input sample could not be kept: %s: %s", type(err).__name__, str(err)[:300])
    return kept
