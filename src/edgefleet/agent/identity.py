"""What makes a device itself, on disk, written so that a power cut never leaves half of it.

* ``identity.json`` (mode 0600): device id, credential, tier, repository URL, and the sha256 of the token that
  enrolled it (a refused device re-enrolls only with a different token).
* ``tuf/trusted_root.json``: the TUF root the device trusts, checked at enrollment against the pin its token
  carries (``<secret>.<hex>``, the first 32 or more hex digits of the root's sha256) or against a root file given
  out of band (``edgefleet agent --root``).
* ``device.key`` / ``device.pub``: the current X25519 key pair; ``retired-keys/<key id>.key``: earlier private
  keys, kept while a package the device holds is encrypted to them.
* ``WIPE``: written before a decommission wipe starts, removed when it is done; a wipe cut short is finished at
  the next start.

Every write goes through :func:`edgefleet.agent.durable.atomic_write` (file and directory fsync), so a reader
sees the old or the new file, never a torn one. See docs/adr/0103-device-lifecycle-and-pinned-enrollment.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from edgefleet.agent.durable import atomic_write, crashpoint, durable_rename, fsync_dir
from edgefleet.errors import AgentError, PackageError, VerificationError
from edgefleet.protocol import validation_message

__all__ = [
    "IDENTITY_FILE",
    "TRUSTED_ROOT",
    "WIPE_MARKER",
    "Identity",
    "begin_wipe",
    "check_root",
    "finish_key_rotation",
    "finish_wipe",
    "has_retired_keys",
    "held_keys",
    "key_for_package",
    "load_identity",
    "new_key_pair",
    "package_key_ids",
    "prune_retired_keys",
    "public_key",
    "reset_trust",
    "save_identity",
    "save_trusted_root",
    "token_pin",
    "token_sha256",
    "trusted_root",
    "wipe_pending",
]

IDENTITY_FILE = "identity.json"
TRUSTED_ROOT = Path("tuf") / "trusted_root.json"
WIPE_MARKER = "WIPE"
RETIRED = "retired-keys"
_NEXT = "device.next"  # a key pair made for a rotation the server has not confirmed yet
# the pin is at least 128 bits of the root's sha256: a second root with the same prefix is out of reach
_PIN = re.compile(r"\.([0-9a-f]{32,64})\Z")


class Identity(BaseModel):
    model_config = ConfigDict(extra="ignore")

    device_id: str
    credential: str
    tier: str
    repository_url: str
    token_sha256: str | None = None


def load_identity(data_dir: Path) -> Identity | None:
    """The stored identity, or None when the device is not enrolled. Unreadable: a one-line :class:`AgentError`."""
    path = data_dir / IDENTITY_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise AgentError(f"cannot read {path}: {err.strerror}") from None
    try:
        return Identity.model_validate_json(raw)
    except ValidationError as err:
        raise AgentError(
            f"{path} is unreadable ({validation_message(err, limit=2)}): restore it, or delete it and enroll "
            "again with --token NEW_TOKEN"
        ) from None


def save_identity(data_dir: Path, ident: Identity) -> None:
    atomic_write(data_dir / IDENTITY_FILE, ident.model_dump_json().encode(), "identity", mode=0o600)


def trusted_root(data_dir: Path) -> bytes:
    path = data_dir / TRUSTED_ROOT
    try:
        return path.read_bytes()
    except OSError as err:
        raise AgentError(f"cannot read the trusted TUF root {path}: {err.strerror}; enroll again") from None


def save_trusted_root(data_dir: Path, root: bytes) -> None:
    (data_dir / TRUSTED_ROOT).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(data_dir / TRUSTED_ROOT, root, "trusted_root")


def reset_trust(data_dir: Path) -> None:
    """Forget the TUF metadata cache, so the next refresh starts from ``trusted_root.json`` (a re-enrollment)."""
    shutil.rmtree(data_dir / "tuf" / "metadata", ignore_errors=True)


def token_pin(token: str) -> str | None:
    """The root sha256 prefix a token pins, or None (a token minted before pins existed)."""
    m = _PIN.search(token)
    return m.group(1) if m else None


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_root(root: bytes, *, pin: str | None, pinned_root: bytes | None) -> None:
    """Refuse an enroll answer's root that is not the one the device was told to trust (pure)."""
    digest = hashlib.sha256(root).hexdigest()
    if pinned_root is not None and root != pinned_root:
        raise VerificationError(
            f"the enroll answer's TUF root (sha256 {digest[:16]}…) is not the --root file given (sha256 "
            f"{hashlib.sha256(pinned_root).hexdigest()[:16]}…): refused, nothing stored; is something between "
            "this device and the control plane rewriting answers?"
        )
    if pin is not None and not digest.startswith(pin):
        raise VerificationError(
            f"the enroll answer's TUF root (sha256 {digest[:16]}…) does not match the pin in the enrollment token "
            f"({pin[:16]}…): refused, nothing stored; is something between this device and the control plane "
            "rewriting answers?"
        )


# ------------------------------------------------------------------------------------------------ keys


def public_key(data_dir: Path) -> str:
    return (data_dir / "device.pub").read_text().strip()


def new_key_pair(data_dir: Path) -> str:
    """Make the key pair of a rotation beside the current one (``device.next.*``); returns its public key. A pair
    left by an earlier attempt is reused: the server may have recorded it already."""
    from edgefleet.package import generate_device_keypair

    if (data_dir / f"{_NEXT}.key").exists() and (data_dir / f"{_NEXT}.pub").exists():
        return (data_dir / f"{_NEXT}.pub").read_text().strip()
    return generate_device_keypair(data_dir, name=_NEXT, overwrite=True).public_key_hex


def finish_key_rotation(data_dir: Path) -> None:
    """The server has the new public key: retire the current private key (kept while a package needs it) and
    make the new pair current. Each step is a rename, so a cut at any point leaves every key on disk; a pair
    still named ``device.next`` at the next start is finished here again (:func:`held_keys` reads it meanwhile)."""
    from edgefleet.package.keys import key_id

    nxt_key, nxt_pub = data_dir / f"{_NEXT}.key", data_dir / f"{_NEXT}.pub"
    if not nxt_key.exists():
        return
    cur = data_dir / "device.key"
    if cur.exists():
        retired = data_dir / RETIRED
        retired.mkdir(exist_ok=True, mode=0o700)
        durable_rename(cur, retired / f"{key_id(public_key(data_dir))}.key", "key_retire")
    durable_rename(nxt_pub, data_dir / "device.pub", "key_pub")
    durable_rename(nxt_key, cur, "key_current")


def held_keys(data_dir: Path) -> dict[str, Path]:
    """Every private key on the device by key id: the current, a rotation's next, the retired ones."""
    from edgefleet.package.keys import key_id, load_device_private_key, public_key_hex

    paths = [data_dir / "device.key", data_dir / f"{_NEXT}.key", *sorted((data_dir / RETIRED).glob("*.key"))]
    out: dict[str, Path] = {}
    for p in paths:
        if p.exists():
            try:
                out.setdefault(key_id(public_key_hex(load_device_private_key(p))), p)
            except (PackageError, ValueError, OSError):
                continue  # a damaged key decrypts nothing; the current one is reported when it is used
    return out


def package_key_ids(path: Path) -> list[str]:
    """The key ids an encrypted package is wrapped for ([] when it is not encrypted or cannot be read)."""
    from edgefleet.package import open_package

    try:
        enc = open_package(path).manifest.encryption
    except (PackageError, OSError, ValueError):
        return []
    return list(enc.key_ids) if enc is not None else []


def has_retired_keys(data_dir: Path) -> bool:
    return any((data_dir / RETIRED).glob("*.key")) or (data_dir / f"{_NEXT}.key").exists()


def key_for_package(data_dir: Path, path: Path) -> Path | None:
    """The private key that opens ``path``: one the package is wrapped for, else the current key (whose
    failure then names the ids), else None. With one key only, the package is not read."""
    wanted = package_key_ids(path) if has_retired_keys(data_dir) else []
    if wanted:
        held = held_keys(data_dir)
        for kid in wanted:
            if kid in held:
                return held[kid]
    cur = data_dir / "device.key"
    return cur if cur.exists() else None


def prune_retired_keys(data_dir: Path, needed: set[str]) -> list[str]:
    """Delete retired keys whose id no held package needs; returns the ids deleted."""
    from edgefleet.package.keys import key_id, load_device_private_key, public_key_hex

    gone = []
    for p in sorted((data_dir / RETIRED).glob("*.key")):
        try:
            kid = key_id(public_key_hex(load_device_private_key(p)))
        except (PackageError, ValueError, OSError):
            kid = p.stem
        if kid not in needed:
            p.unlink()
            gone.append(kid)
    if gone:
        fsync_dir(data_dir / RETIRED)
    return gone


# ------------------------------------------------------------------------------------------------ wipe


def wipe_pending(data_dir: Path) -> bool:
    return (data_dir / WIPE_MARKER).exists()


def begin_wipe(data_dir: Path) -> None:
    """Record, durably, that this device must be wiped: from here on it is wiped even if the power goes."""
    atomic_write(data_dir / WIPE_MARKER, b"decommissioned: wipe identity, keys and packages\n", "wipe")


def finish_wipe(data_dir: Path) -> None:
    """Delete everything in the data folder (identity first, so a cut leaves no usable credential), then the
    marker. Idempotent."""
    for name in (IDENTITY_FILE, "device.key", f"{_NEXT}.key"):
        (data_dir / name).unlink(missing_ok=True)
    fsync_dir(data_dir)
    crashpoint("wipe.after_identity")
    for p in sorted(data_dir.iterdir()):
        if p.name == WIPE_MARKER:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    fsync_dir(data_dir)
    os.unlink(data_dir / WIPE_MARKER)
    fsync_dir(data_dir)
