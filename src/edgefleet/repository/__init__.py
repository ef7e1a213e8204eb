"""The TUF-signed model repository: the signing side (``repo.py``, ``tuf.api.metadata``) and the verified client
(``client.py``, ``tuf.ngclient``)."""

from edgefleet.repository.client import (
    DirectoryFetcher,
    HttpxFetcher,
    TufClient,
    default_metadata_dir,
    fetch_package,
)
from edgefleet.repository.repo import (
    DEFAULT_EXPIRY,
    ROLES,
    Repository,
    RepoStatus,
    RoleStatus,
    TargetInfo,
    default_root_keys_dir,
    root_key_files,
)

__all__ = [
    "DEFAULT_EXPIRY",
    "ROLES",
    "DirectoryFetcher",
    "HttpxFetcher",
    "RepoStatus",
    "Repository",
    "RoleStatus",
    "TargetInfo",
    "TufClient",
    "default_metadata_dir",
    "default_root_keys_dir",
    "fetch_package",
    "root_key_files",
]
