"""The model package ``.efpkg``: manifest, model (optionally encrypted), golden vectors, drift
reference and ML-BOM in one reproducible tar, content-addressed by its SHA-256.

Building is imported on first use (PEP 562): a device opens and checks packages but never builds one, and the
builder's ML-BOM library (cyclonedx, the ``tools`` extra) is not installed there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgefleet.package.compat import check_requirements
from edgefleet.package.keys import (
    DeviceKeyPair,
    generate_device_keypair,
    key_id,
    load_device_private_key,
    parse_public_key,
    public_key_hex,
)
from edgefleet.package.manifest import (
    EncryptionInfo,
    GoldenTolerance,
    IOSchema,
    Lineage,
    Manifest,
    Recipient,
    Requirements,
    manifest_json_schema,
    parse_manifest,
)
from edgefleet.package.reader import OpenedPackage, open_package

if TYPE_CHECKING:
    from edgefleet.package.build import build_package, source_date_epoch

__all__ = [
    "DeviceKeyPair",
    "EncryptionInfo",
    "GoldenTolerance",
    "IOSchema",
    "Lineage",
    "Manifest",
    "OpenedPackage",
    "Recipient",
    "Requirements",
    "build_package",
    "check_requirements",
    "generate_device_keypair",
    "key_id",
    "load_device_private_key",
    "manifest_json_schema",
    "open_package",
    "parse_manifest",
    "parse_public_key",
    "public_key_hex",
    "source_date_epoch",
]


def __getattr__(name: str) -> Any:
    if name in ("build_package", "source_date_epoch"):
        from edgefleet.package import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
