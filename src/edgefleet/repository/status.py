"""What a repository reports about itself: targets, per-role versions and expiry, and the pure expiry rules."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tuf.api.metadata import TargetFile

__all__ = ["WARN_FRACTION", "RepoStatus", "RoleStatus", "TargetInfo", "due", "expiry_warning", "human_duration"]

# Warn (and let `refresh` re-sign) when less than this fraction of a role's period is left.
WARN_FRACTION = 0.25


def due(expires: datetime, period: timedelta, now: datetime) -> bool:
    """Whether a role should be re-signed now: less than :data:`WARN_FRACTION` of its period is left."""
    return expires - now < period * WARN_FRACTION


def expiry_warning(role: str, expires: datetime, period: timedelta, now: datetime) -> str | None:
    """The line ``repo status`` prints for a role, or ``None`` while it has time left."""
    left = expires - now
    if left <= timedelta(0):
        return f"{role} EXPIRED on {expires:%Y-%m-%d %H:%M} UTC; clients refuse the repository until it is re-signed"
    if not due(expires, period, now):
        return None
    how = "`edgefleet repo refresh`" if role != "root" else "`edgefleet repo refresh` with the root keys"
    return (
        f"{role} expires on {expires:%Y-%m-%d %H:%M} UTC (in {human_duration(left)}, under "
        f"{int(WARN_FRACTION * 100)} % of its {human_duration(period)} period); run {how}"
    )


@dataclass(frozen=True)
class TargetInfo:
    name: str
    length: int
    sha256: str
    custom: dict[str, Any]
    path: str  # URL path under <base>/targets/: "<sha256>.<name>" (consistent snapshots)

    @classmethod
    def from_tuf(cls, tf: TargetFile) -> TargetInfo:
        sha = tf.hashes["sha256"]
        custom = tf.custom if isinstance(tf.custom, dict) else {}
        return cls(name=tf.path, length=tf.length, sha256=sha, custom=custom, path=f"{sha}.{tf.path}")


@dataclass(frozen=True)
class RoleStatus:
    role: str
    version: int
    expires: datetime
    period: timedelta
    keys: int
    threshold: int
    keys_available: int
    warning: str | None = None

    @property
    def remaining(self) -> timedelta:
        return self.expires - datetime.now(UTC)


@dataclass
class RepoStatus:
    path: str  # a folder, or s3://bucket/prefix
    roles: list[RoleStatus]
    targets: int
    consistent_snapshot: bool
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        roles = []
        for r in self.roles:
            d = asdict(r)
            d["expires"] = r.expires.isoformat()
            d["period_s"] = int(r.period.total_seconds())
            del d["period"]
            roles.append(d)
        return {
            "path": self.path,
            "roles": roles,
            "targets": self.targets,
            "consistent_snapshot": self.consistent_snapshot,
            "warnings": self.warnings,
        }


def human_duration(delta: timedelta) -> str:
    s = int(delta.total_seconds())
    if s >= 2 * 86400:
        return f"{s // 86400} d"
    if s >= 2 * 3600:
        return f"{s // 3600} h"
    return f"{max(s, 0) // 60} min"
