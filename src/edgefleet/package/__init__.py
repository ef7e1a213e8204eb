"""The model package ``.efpkg``: manifest, model (optionally encrypted), golden vectors, drift
reference and ML-BOM in one reproducible tar, content-addressed by its SHA-256."""

from edgefleet.package.build import build_package, source_date_epoch
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
