"""Device key pairs (X25519) that encrypted packages are wrapped for.

The private key is a PKCS#8 PEM file with mode 0600; the public key travels as 64 hex characters (the raw 32
bytes), in ``*.pub`` files, enrollment requests and ``edgefleet package --encrypt-for``.
"""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path
from typing import NamedTuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from edgefleet._fs import atomic_write
from edgefleet.errors import DecryptionError, UsageError

__all__ = [
    "DeviceKeyPair",
    "generate_device_keypair",
    "key_id",
    "load_device_private_key",
    "parse_public_key",
    "public_key_hex",
    "write_private_file",
]

KEY_ID_CHARS = 16


class DeviceKeyPair(NamedTuple):
    private_key_path: Path
    public_key_hex: str

    @property
    def key_id(self) -> str:
        return key_id(self.public_key_hex)


def public_key_hex(key: X25519PrivateKey | X25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def key_id(public_hex: str) -> str:
    """Short id of a public key: the first 16 hex characters of SHA-256 over its raw bytes."""
    return hashlib.sha256(bytes.fromhex(public_hex)).hexdigest()[:KEY_ID_CHARS]


def write_private_file(path: Path, data: bytes) -> None:
    """Write a secret with mode 0600 from the first byte on (never readable by others, whatever the umask)."""
    atomic_write(path, data, mode=0o600, mkdir=True)


def generate_device_keypair(directory: Path, *, name: str = "device", overwrite: bool = False) -> DeviceKeyPair:
    """Write ``{name}.key`` (private, 0600) and ``{name}.pub`` (hex) into ``directory``."""
    directory = Path(directory)
    priv_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    if priv_path.exists() and not overwrite:
        raise UsageError(f"{priv_path} already exists; remove it first or choose another directory")
    key = X25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_private_file(priv_path, pem)
    pub = public_key_hex(key)
    pub_path.write_text(pub + "\n")
    return DeviceKeyPair(priv_path, pub)


def load_device_private_key(path: Path | str) -> X25519PrivateKey:
    """Read a device private key; refuses files that others can read."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"device key {p} does not exist")
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise DecryptionError(f"device key {p} has mode {mode:04o}; it must be private (chmod 600 {p})")
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise DecryptionError(f"{p} is not a PEM private key: {err}")
    if not isinstance(key, X25519PrivateKey):
        raise DecryptionError(f"{p} is not an X25519 key (make one with `edgefleet keys device -o DIR`)")
    return key


def parse_public_key(value: str | Path) -> str:
    """An X25519 public key given as 64 hex characters, or a file holding them (``device.pub``)."""
    text = str(value).strip()
    if not _is_hex_key(text):
        p = Path(text)
        if not p.is_file():
            raise UsageError(f"{text!r} is neither a 64-hex-character X25519 public key nor a file holding one")
        text = p.read_text().strip()
        if not _is_hex_key(text):
            raise UsageError(f"{p} does not hold a 64-hex-character X25519 public key")
    text = text.lower()
    X25519PublicKey.from_public_bytes(bytes.fromhex(text))
    return text


def _is_hex_key(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)
