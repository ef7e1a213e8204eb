"""The compatibility matrix: tier × runtime version × model version → verified / failed / untested, with evidence.

Evidence comes from bench results attached to a version (``compat`` entries of BENCH.json) and from devices:
a ``committed`` event (health check and probation passed on real hardware) verifies; a ``rolled_back`` or
``health_check_failed`` event fails. A failure wins over earlier verifications for that cell, so a rollout never
targets the combination again until someone investigates.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.controlplane.db import CompatEntry, Device, ModelVersion, utcnow
from edgefleet.package.compat import check_requirements
from edgefleet.package.manifest import Manifest

__all__ = ["device_problems", "failed_cells", "matrix", "record", "record_bench"]

MAX_EVIDENCE = 20


def record(
    s: Session, *, tier: str, runtime_version: str, model: str, version: str, ok: bool, evidence: dict[str, Any]
) -> None:
    row = s.get(CompatEntry, (tier, runtime_version, model, version))
    status = "verified" if ok else "failed"
    if row is None:
        s.add(
            CompatEntry(
                tier=tier,
                runtime_version=runtime_version,
                model=model,
                version=version,
                status=status,
                evidence=[evidence],
            )
        )
        return
    if row.status != "failed":
        row.status = status
    row.evidence = [*row.evidence, evidence][-MAX_EVIDENCE:]
    row.updated_at = utcnow()


def record_bench(s: Session, model: str, version: str, bench: dict[str, Any]) -> int:
    """Read ``compat`` entries from a bench report (top level or per result); returns how many were recorded."""
    entries: list[dict[str, Any]] = list(bench.get("compat") or [])
    for r in bench.get("results") or []:
        if isinstance(r, dict) and isinstance(r.get("compat"), dict):
            entries.append(r["compat"])
    n = 0
    for c in entries:
        if not isinstance(c, dict) or not c.get("tier") or not c.get("runtime_version"):
            continue
        record(
            s,
            tier=str(c["tier"]),
            runtime_version=str(c["runtime_version"]),
            model=model,
            version=version,
            ok=c.get("result") == "verified",
            evidence={"source": "bench", **c},
        )
        n += 1
    return n


def failed_cells(s: Session, model: str, version: str) -> set[tuple[str, str]]:
    rows = s.execute(
        select(CompatEntry.tier, CompatEntry.runtime_version).where(
            CompatEntry.model == model, CompatEntry.version == version, CompatEntry.status == "failed"
        )
    )
    return {(t, r) for t, r in rows}


def device_problems(
    manifest: Manifest | None, failed: set[tuple[str, str]], *, tier: str, runtime_version: str, memory_mb: int | None
) -> list[str]:
    """Why a device cannot take this version: the package's requirements, then the matrix's failures."""
    out: list[str] = []
    if manifest is not None:
        out.extend(check_requirements(manifest, tier=tier, runtime_version=runtime_version or "0", memory_mb=memory_mb))
    if (tier, runtime_version) in failed:
        out.append(f"compatibility matrix: failed on tier {tier} with runtime {runtime_version}")
    return out


def matrix(s: Session, versions: Iterable[ModelVersion] | None = None) -> list[dict[str, Any]]:
    """Every cell of tier × runtime version (as seen on devices and in evidence) × model version."""
    entries = {(e.tier, e.runtime_version, e.model, e.version): e for e in s.scalars(select(CompatEntry))}
    combos = {(t, r) for t, r in s.execute(select(Device.tier, Device.runtime_version).distinct())}
    combos |= {(k[0], k[1]) for k in entries}
    vs = list(versions) if versions is not None else list(s.scalars(select(ModelVersion)))
    out = []
    for mv in sorted(vs, key=lambda v: (v.model, v.created_at)):
        for tier, rt in sorted(combos):
            e = entries.get((tier, rt, mv.model, mv.version))
            out.append(
                {
                    "tier": tier,
                    "runtime_version": rt,
                    "model": mv.model,
                    "version": mv.version,
                    "status": e.status if e else "untested",
                    "evidence": e.evidence if e else [],
                }
            )
    return out
