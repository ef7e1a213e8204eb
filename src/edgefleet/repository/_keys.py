"""Signing keys of the repository: ed25519 via securesystemslib's CryptoSigner, PEM files with mode 0600.

Files are ``keys/<role>-<keyid>.pem`` (PKCS#8, encrypted with the passphrase when one is given). Root keys may
live elsewhere (offline): the repository looks in its ``keys_dir``.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey

from edgefleet.errors import RepositoryError
from edgefleet.package.keys import write_private_file

__all__ = ["generate", "key_path", "load_signer", "save_signer"]


def generate() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


def key_path(keys_dir: Path, role: str, keyid: str) -> Path:
    return keys_dir / f"{role}-{keyid}.pem"


def save_signer(keys_dir: Path, role: str, signer: CryptoSigner, passphrase: str | None) -> Path:
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # CryptoSigner only exports unencrypted PEM; re-serialize it with the passphrase.
    private = serialization.load_pem_private_key(signer.private_bytes, password=None)
    if not isinstance(private, Ed25519PrivateKey):  # pragma: no cover - we only generate ed25519
        raise RepositoryError("only ed25519 signing keys are supported")
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else serialization.NoEncryption()
    )
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    path = key_path(keys_dir, role, signer.public_key.keyid)
    write_private_file(path, pem)
    return path


def load_signer(keys_dir: Path, role: str, public: SSlibKey, passphrase: str | None) -> CryptoSigner | None:
    """The signer for ``public`` if its private key file is in ``keys_dir``; ``None`` when absent."""
    how = (
        "--ask-root-passphrase or EDGEFLEET_ROOT_PASSPHRASE"
        if role == "root"
        else "--ask-passphrase or EDGEFLEET_REPO_PASSPHRASE"
    )
    path = key_path(keys_dir, role, public.keyid)
    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        private = serialization.load_pem_private_key(data, password=passphrase.encode() if passphrase else None)
    except TypeError:
        if passphrase:
            raise RepositoryError(f"{path} is not encrypted but a passphrase was given: give none for it")
        raise RepositoryError(f"{path} is encrypted: give its passphrase ({how})")
    except ValueError:
        raise RepositoryError(f"cannot decrypt {path}: wrong passphrase or not a PEM private key")
    try:
        return CryptoSigner(private, public)
    except Exception as err:
        raise RepositoryError(f"{path} does not hold the {role} key {public.keyid[:12]}: {err}")
