"""Open a ``.efpkg``: read it defensively, validate the manifest, check every member against it, decrypt."""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import ValidationError

from edgefleet.config import RuntimeSettings
from edgefleet.data import CallData
from edgefleet.errors import DecryptionError, PackageError, UsageError
from edgefleet.package import golden as _golden
from edgefleet.package._tar import read_members
from edgefleet.package.crypto import decrypt_model
from edgefleet.package.keys import load_device_private_key
from edgefleet.package.manifest import Manifest, parse_manifest
from edgefleet.runtime import Model
from edgefleet.telemetry.drift import DriftReference

__all__ = ["OpenedPackage", "open_package"]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class OpenedPackage:
    """A package read into memory and checked: every member matches the hash its manifest records.

    An encrypted model is decrypted at open when a device key is given (so a wrong key fails early), otherwise
    lazily on first access of :attr:`model_bytes` (``inspect`` works without a key).
    """

    def __init__(self, path: Path, members: dict[str, bytes], device_key: X25519PrivateKey | None) -> None:
        self.path = path
        self.package_sha256 = _sha256_file(path)
        if "manifest.json" not in members:
            raise PackageError(f"{path} is not a valid .efpkg: it has no manifest.json")
        self.manifest: Manifest = parse_manifest(members["manifest.json"])
        m = self.manifest
        for required in (m.model_member, "golden.npz", "bom.cdx.json"):
            if required not in members:
                raise PackageError(f"{path} is not a valid .efpkg: it lacks {required}")
        for member, data in members.items():
            if member == "manifest.json":
                continue
            want = m.files.get(member)
            if want is None:
                raise PackageError(f"{path}: member {member} is not listed in the manifest")
            if hashlib.sha256(data).hexdigest() != want:
                raise PackageError(f"{path}: member {member} is corrupt (its SHA-256 differs from the manifest)")
        self.members = {k: len(v) for k, v in members.items()}
        self._model_blob = members[m.model_member]
        self._device_key = device_key
        self.model_sha256 = m.model_sha256
        self.golden_inputs: CallData
        self.golden_outputs: dict[str, np.ndarray]
        self.golden_inputs, self.golden_outputs = _golden.read_golden(members["golden.npz"])
        self.reference: DriftReference | None = None
        if "reference.json" in members:
            try:
                self.reference = DriftReference.model_validate_json(members["reference.json"])
            except ValidationError as err:
                raise PackageError(f"{path}: reference.json breaks its schema: {err.errors()[0]['msg']}")
        try:
            self.bom: dict[str, Any] = json.loads(members["bom.cdx.json"])
        except ValueError as err:
            raise PackageError(f"{path}: bom.cdx.json is not JSON: {err}")
        if m.encryption is None:
            if hashlib.sha256(self._model_blob).hexdigest() != m.model_sha256:
                raise PackageError(f"{path}: {m.model_member} does not match the manifest's model_sha256")
        elif device_key is not None:
            _ = self.model_bytes

    @property
    def encrypted(self) -> bool:
        return self.manifest.encryption is not None

    @cached_property
    def model_bytes(self) -> bytes:
        """The plaintext model bytes; raises :class:`DecryptionError` for an encrypted package without its key."""
        info = self.manifest.encryption
        if info is None:
            return self._model_blob
        if self._device_key is None:
            raise DecryptionError(
                f"{self.path.name} is encrypted (for key(s) {', '.join(info.key_ids)}); give the device key"
            )
        plain = decrypt_model(self._model_blob, info, self.model_sha256, self._device_key)
        if hashlib.sha256(plain).hexdigest() != self.model_sha256:  # pragma: no cover - GCM already authenticates
            raise DecryptionError(f"{self.path.name}: the decrypted model does not match model_sha256")
        return plain

    def load(self, settings: RuntimeSettings | None = None) -> Model:
        """The model in the manifest's runtime (onnxruntime on the first of its execution providers this device
        has), with the manifest's I/O schema and pre/post-processing applied."""
        m = self.manifest
        return Model(
            self.model_bytes,
            settings=settings,
            inputs=m.io.inputs,
            outputs=m.io.outputs,
            preprocessing=m.preprocessing,
            postprocessing=m.postprocessing,
            manifest=m,
            runtime=m.requirements.runtime,
            model_format=m.model_format,
            providers=m.requirements.execution_providers,
        )

    def verify_golden(self, model: Model | None = None) -> None:
        """Run the golden inputs; :class:`GoldenMismatchError` unless every output is within tolerance."""
        _golden.verify(model or self.load(), self.golden_inputs, self.golden_outputs, self.manifest.golden)

    def __repr__(self) -> str:
        return f"OpenedPackage({self.manifest.target_name}, sha256={self.package_sha256[:12]})"


def open_package(path: Path | str, *, device_key: Path | str | X25519PrivateKey | None = None) -> OpenedPackage:
    """Open and check a package. Raises :class:`PackageError` (corrupt), :class:`ManifestError` (schema),
    :class:`DecryptionError` (not encrypted for ``device_key``)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"package {p} does not exist")
    key = load_device_private_key(device_key) if isinstance(device_key, str | Path) else device_key
    return OpenedPackage(p, read_members(p), key)
