"""Model encryption: AES-256-GCM under a random content key, wrapped per recipient with X25519 + HKDF-SHA256.

For each recipient public key ``P``: an ephemeral X25519 key ``e``; ``KEK = HKDF-SHA256(ECDH(e, P), salt =
e_pub || P, info = "edgefleet.efpkg.keywrap.v1")``; ``wrapped = AES-256-GCM(KEK, nonce, content_key, aad =
key_id)``. The model ciphertext's AAD is the plaintext ``model_sha256``, so it is bound to its manifest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgefleet.errors import DecryptionError
from edgefleet.package.keys import key_id, public_key_hex
from edgefleet.package.manifest import EncryptionInfo, Recipient

__all__ = ["decrypt_model", "encrypt_model"]

_INFO = b"edgefleet.efpkg.keywrap.v1"


def _kek(shared: bytes, eph_pub: bytes, recipient_pub: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=eph_pub + recipient_pub, info=_INFO).derive(shared)


def encrypt_model(plaintext: bytes, model_sha256: str, recipients: Sequence[str]) -> tuple[bytes, EncryptionInfo]:
    """Encrypt ``plaintext`` for each X25519 public key (hex) in ``recipients``."""
    content_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(12)
    ciphertext = AESGCM(content_key).encrypt(nonce, plaintext, model_sha256.encode())
    wrapped: list[Recipient] = []
    for pub_hex in dict.fromkeys(recipients):  # de-duplicate, keep order
        recipient_pub = bytes.fromhex(pub_hex)
        eph = X25519PrivateKey.generate()
        eph_pub = bytes.fromhex(public_key_hex(eph))
        kek = _kek(eph.exchange(X25519PublicKey.from_public_bytes(recipient_pub)), eph_pub, recipient_pub)
        kid = key_id(pub_hex)
        wrap_nonce = os.urandom(12)
        wrapped.append(
            Recipient(
                key_id=kid,
                ephemeral_public_key=eph_pub.hex(),
                nonce=wrap_nonce.hex(),
                wrapped_key=AESGCM(kek).encrypt(wrap_nonce, content_key, kid.encode()).hex(),
            )
        )
    return ciphertext, EncryptionInfo(nonce=nonce.hex(), recipients=wrapped)


def decrypt_model(ciphertext: bytes, info: EncryptionInfo, model_sha256: str, key: X25519PrivateKey) -> bytes:
    """Unwrap the content key with the device's private key and decrypt; :class:`DecryptionError` otherwise."""
    pub_hex = public_key_hex(key)
    kid = key_id(pub_hex)
    match = next((r for r in info.recipients if r.key_id == kid), None)
    if match is None:
        raise DecryptionError(
            f"the package is encrypted for key(s) {', '.join(info.key_ids)}, not for this device's key {kid}"
        )
    eph_pub = bytes.fromhex(match.ephemeral_public_key)
    kek = _kek(key.exchange(X25519PublicKey.from_public_bytes(eph_pub)), eph_pub, bytes.fromhex(pub_hex))
    try:
        content_key = AESGCM(kek).decrypt(bytes.fromhex(match.nonce), bytes.fromhex(match.wrapped_key), kid.encode())
        return AESGCM(content_key).decrypt(bytes.fromhex(info.nonce), ciphertext, model_sha256.encode())
    except InvalidTag:
        raise DecryptionError(f"the encrypted model does not decrypt with key {kid}: it was altered or mis-wrapped")
