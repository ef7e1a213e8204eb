"""The compatibility matrix: tier × runtime version × model version → verified / suspect / failed / untested, with
evidence.

Evidence comes from bench results attached to a version (``compat`` entries of BENCH.json) and from devices:
a ``committed`` event (health check and probation passed on real hardware) verifies; a ``rolled_back`` or
``health_check_failed`` event fails. A device's event is evidence only for work it was given — the version and
rollout of its desired state (a rollout that moved it, or a pin) — so a device cannot report its way into a
verdict on a version nobody sent it, and an update abandoned because the desired state moved on is no evidence.

A cell turns ``failed`` on a failing bench result or on failures from at least ``min_devices`` distinct devices
(the rollout policy's ``compat_fail_devices``, default 2); failures from fewer make it ``suspect``, which is shown
but blocks nothing: one device's flaky storage must not shut a tier out. A failed cell stays failed until an
operator clears it (:func:`clear`), which keeps the evidence and counts only what arrives afterwards.

The runtime axis: a package runs on onnxruntime, LiteRT or OpenVINO (its ``requirements.runtime``), and a device
reports the runtimes it has (``Hardware.runtimes``, updated by its reports). A cell's runtime column is the bare
version for onnxruntime — as every cell was before other runtimes — and ``"<runtime> <version>"`` for the others
(:func:`runtime_axis`), so one column never mixes two runtimes and no stored cell changes meaning.

The agent axis: a device's evidence carries the agent version it ran (``agent_version``, as the device last
reported it), and each cell lists its status under each of those agents (``agents``), so an operator reads "digits
2.0.0 verified on tier x with onnxruntime 1.32.0 under agent 0.1.0". The cell's own status, the one that blocks a
rollout, stays over all of its evidence: a failure seen under one agent is not forgotten because devices update
their agent (an operator clears it). No package states a minimum agent version, so none is checked.

Only the tier's own hardware verifies. Evidence from a host that merely emulates the tier — a bench result
``emulated``, a device enrolled with ``--emulate-tier`` — makes a cell ``emulated`` at best; its failures count
as any other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.controlplane.db import CompatEntry, Device, DeviceGroup, ModelVersion, Rollout, RolloutDevice, utcnow
from edgefleet.controlplane.rollout import is_cancellation
from edgefleet.errors import NotFoundError
from edgefleet.package.compat import check_requirements
from edgefleet.package.manifest import Manifest

__all__ = [
    "FAIL_DEVICES",
    "add_evidence",
    "agents_of",
    "assigned",
    "cell_status",
    "clear",
    "device_problems",
    "device_runtimes",
    "failed_cells",
    "matrix",
    "record",
    "record_bench",
    "runtime_axis",
]

MAX_EVIDENCE = 20
FAIL_DEVICES = 2  # the stored status's threshold; a rollout recomputes with its own policy's
ORT = "onnxruntime"


def runtime_axis(runtime: str, version: str) -> str:
    """The matrix's runtime column for ``runtime`` at ``version``."""
    return version if runtime == ORT else f"{runtime} {version}"


def _axis_runtime(label: str) -> str:
    name, sep, _ = label.partition(" ")
    return name if sep else ORT


def device_runtimes(d: Device) -> dict[str, str]:
    """What the device can load, name → version: what it reported, else (older agents) onnxruntime alone."""
    reported = (d.hardware or {}).get("runtimes")
    out = {str(k): str(v) for k, v in reported.items()} if isinstance(reported, dict) else {}
    if d.runtime_version:
        out[ORT] = d.runtime_version
    return out


def _version_runtime(mv: ModelVersion | None) -> str:
    req = (mv.manifest or {}).get("requirements") if mv is not None and isinstance(mv.manifest, dict) else None
    return str(req.get("runtime") or ORT) if isinstance(req, dict) else ORT


def _failing(e: dict[str, Any]) -> bool:
    if _clear_marker(e):
        return False
    if isinstance(e.get("ok"), bool):
        return not e["ok"]
    if e.get("source") == "bench":
        return e.get("result") not in ("verified", "emulated")
    return e.get("source") == "device" and e.get("event") != "committed"


def _clear_marker(e: dict[str, Any]) -> bool:
    return e.get("source") == "operator" and e.get("event") == "cleared"


def _live(evidence: Sequence[dict[str, Any]]) -> Sequence[dict[str, Any]]:
    """The evidence since the last operator clear."""
    for i in range(len(evidence) - 1, -1, -1):
        if _clear_marker(evidence[i]):
            return evidence[i + 1 :]
    return evidence


def _emulated(e: dict[str, Any]) -> bool:
    return bool(e.get("emulated")) or (e.get("source") == "bench" and e.get("result") == "emulated")


def cell_status(evidence: Sequence[dict[str, Any]], *, min_devices: int = FAIL_DEVICES) -> str:
    """``failed`` (a failing bench result, or failures from ``min_devices`` distinct devices), ``suspect`` (device
    failures from fewer), ``verified`` (evidence from the tier's own hardware, none failing), ``emulated`` (only
    evidence from hosts emulating the tier, none failing) or ``untested`` — over the evidence since the last
    clear."""
    live = _live(evidence)
    if any(e.get("source") != "device" and _failing(e) for e in live):
        return "failed"  # a bench run on the hardware is the operator's own measurement: no quorum needed
    failing = {str(e.get("device_id")) for e in live if e.get("source") == "device" and _failing(e)}
    if len(failing) >= min_devices:
        return "failed"
    if failing:
        return "suspect"
    if not live:
        return "untested"
    return "emulated" if all(_emulated(e) for e in live) else "verified"


def add_evidence(evidence: Sequence[dict[str, Any]], new: dict[str, Any], *, cap: int = MAX_EVIDENCE) -> list[Any]:
    """Append, then keep the list within ``cap`` by dropping the oldest verifications first: the failures (the
    latest per device) and the clear markers decide the status and must outlive any run of successes."""
    out = [*evidence, new]
    if _failing(new) and new.get("source") == "device":
        # one device failing again is still one device: keep its latest failure only
        out = [
            e
            for e in out[:-1]
            if not (e.get("source") == "device" and _failing(e) and e.get("device_id") == new.get("device_id"))
        ] + [new]
    while len(out) > cap:
        # emulated successes go first: a run of them must not push out the one verification from real hardware
        kept = [i for i, e in enumerate(out) if not _failing(e) and not _clear_marker(e)]
        drop = next((i for i in kept if _emulated(out[i])), kept[0] if kept else 0)
        del out[drop]
    return out


_ANY_ROLLOUT = "*"


def assigned(s: Session, device_id: str, model: str, version: str, rollout_id: str | None) -> bool:
    """Whether the device was given this version to run: by the rollout ``rollout_id`` (which must be of this
    version and must have moved the device); for an event without one (``None``), by a pin — its own or its
    group's; for ``"*"`` (the caller does not know the event's rollout), by a pin or any rollout of this version
    that moved it."""
    if rollout_id is not None and rollout_id != _ANY_ROLLOUT:
        r = s.get(Rollout, rollout_id)
        return (
            r is not None
            and (r.model, r.version) == (model, version)
            and s.get(RolloutDevice, (rollout_id, device_id)) is not None
        )
    d = s.get(Device, device_id)
    if d is None:
        return False
    if (d.pinned_model, d.pinned_version) == (model, version):
        return True
    g = s.get(DeviceGroup, d.group) if d.group else None
    if g is not None and (g.pinned_model, g.pinned_version) == (model, version):
        return True
    if rollout_id is None:
        return False
    moved = s.scalar(
        select(RolloutDevice.rollout_id)
        .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
        .where(RolloutDevice.device_id == device_id, Rollout.model == model, Rollout.version == version)
        .limit(1)
    )
    return moved is not None


def record(
    s: Session, *, tier: str, runtime_version: str, model: str, version: str, ok: bool, evidence: dict[str, Any]
) -> bool:
    """Add evidence to a cell; returns False when it is no evidence (a device event for work it was not given, or
    an update abandoned because the desired state moved on)."""
    if evidence.get("source") == "device":
        if is_cancellation(str(evidence.get("event")), evidence.get("reason")):
            return False
        # a caller that names the event's rollout (None included) gets the strict check; one that does not know
        # it gets the version check alone
        rollout_id = evidence.get("rollout_id", _ANY_ROLLOUT)
        if not assigned(s, str(evidence.get("device_id")), model, version, rollout_id):
            return False
        d = s.get(Device, str(evidence.get("device_id")))
        if d is not None and (d.hardware or {}).get("emulates"):
            evidence = {**evidence, "emulated": True}
        if d is not None:
            # the cell of the runtime the package ran on, at the version this device has of it
            mv = s.scalar(select(ModelVersion).where(ModelVersion.model == model, ModelVersion.version == version))
            runtime = _version_runtime(mv)
            if runtime != ORT:
                runtime_version = runtime_axis(runtime, device_runtimes(d).get(runtime, "unknown"))
    row = s.get(CompatEntry, (tier, runtime_version, model, version))
    if row is None:
        row = CompatEntry(tier=tier, runtime_version=runtime_version, model=model, version=version, evidence=[])
        s.add(row)
    row.evidence = add_evidence(row.evidence or [], {**evidence, "ok": ok})
    row.status = cell_status(row.evidence)
    row.updated_at = utcnow()
    return True


def clear(s: Session, *, tier: str, runtime_version: str, model: str, version: str, actor: str) -> dict[str, Any]:
    """An operator's word that the cell's failures are dealt with: only evidence from now on counts."""
    row = s.get(CompatEntry, (tier, runtime_version, model, version))
    if row is None:
        raise NotFoundError(
            f"no compatibility evidence for {model} {version} on tier {tier} with runtime {runtime_version}: "
            "`GET /api/v1/compat` lists the cells"
        )
    before = row.status
    marker = {"source": "operator", "event": "cleared", "actor": actor, "at": utcnow().isoformat()}
    row.evidence = add_evidence(row.evidence or [], marker)
    row.status = cell_status(row.evidence)
    row.updated_at = utcnow()
    return {**_cell(row), "previous_status": before}


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
            runtime_version=runtime_axis(str(c.get("runtime") or ORT), str(c["runtime_version"])),
            model=model,
            version=version,
            ok=c.get("result") in ("verified", "emulated"),
            evidence={"source": "bench", **c},
        )
        n += 1
    return n


def failed_cells(s: Session, model: str, version: str, *, min_devices: int = FAIL_DEVICES) -> set[tuple[str, str]]:
    """(tier, runtime version) cells that block the version, judged with ``min_devices`` distinct failing
    devices."""
    rows = s.execute(
        select(CompatEntry.tier, CompatEntry.runtime_version, CompatEntry.evidence).where(
            CompatEntry.model == model, CompatEntry.version == version, CompatEntry.status.in_(("failed", "suspect"))
        )
    )
    return {(t, r) for t, r, ev in rows if cell_status(ev or [], min_devices=min_devices) == "failed"}


def device_problems(
    manifest: Manifest | None,
    failed: set[tuple[str, str]],
    *,
    tier: str,
    runtime_version: str,
    memory_mb: int | None,
    runtimes: Mapping[str, str] | None = None,
) -> list[str]:
    """Why a device cannot take this version: the package's requirements (``runtimes``: what the device has,
    :func:`device_runtimes`; ``None``: onnxruntime ``runtime_version`` alone), then the matrix's failures."""
    out: list[str] = []
    axis = runtime_version
    if manifest is not None:
        have = dict(runtimes) if runtimes is not None else {ORT: runtime_version or "0"}
        have[ORT] = have.get(ORT) or "0"
        out.extend(
            check_requirements(
                manifest, tier=tier, runtime_version=runtime_version or "0", memory_mb=memory_mb, runtimes=have
            )
        )
        runtime = manifest.requirements.runtime
        if runtime != ORT:
            axis = runtime_axis(runtime, have.get(runtime, "unknown"))
    if (tier, axis) in failed:
        out.append(f"compatibility matrix: failed on tier {tier} with runtime {axis}")
    return out


def agents_of(evidence: Sequence[dict[str, Any]], *, min_devices: int = FAIL_DEVICES) -> list[dict[str, Any]]:
    """The cell's status under each agent version its live device evidence came from (``""``: evidence recorded
    before devices' agent versions were kept), oldest agent version first by name. Pure."""
    by_agent: dict[str, list[dict[str, Any]]] = {}
    for x in _live(evidence):
        if x.get("source") == "device":
            by_agent.setdefault(str(x.get("agent_version") or ""), []).append(x)
    return [
        {
            "agent_version": agent,
            "status": cell_status(ev, min_devices=min_devices),
            "devices": len({str(x.get("device_id")) for x in ev}),
        }
        for agent, ev in sorted(by_agent.items())
    ]


def _cell(e: CompatEntry) -> dict[str, Any]:
    live = _live(e.evidence or [])
    return {
        "tier": e.tier,
        "runtime": _axis_runtime(e.runtime_version),
        "runtime_version": e.runtime_version,
        "model": e.model,
        "version": e.version,
        "status": e.status,
        "failing_devices": sorted(
            {str(x.get("device_id")) for x in live if x.get("source") == "device" and _failing(x)}
        ),
        "agents": agents_of(e.evidence or []),
        "evidence": e.evidence,
    }


def matrix(s: Session, versions: Iterable[ModelVersion] | None = None) -> list[dict[str, Any]]:
    """Every cell of tier × runtime version (as seen on devices and in evidence) × model version; a version's
    cells are those of the runtime its package runs on."""
    entries = {(e.tier, e.runtime_version, e.model, e.version): e for e in s.scalars(select(CompatEntry))}
    combos = {(t, r) for t, r in s.execute(select(Device.tier, Device.runtime_version).distinct())}
    for tier, hardware in s.execute(select(Device.tier, Device.hardware)):
        reported = (hardware or {}).get("runtimes")
        if isinstance(reported, dict):
            combos |= {(tier, runtime_axis(str(k), str(v))) for k, v in reported.items() if k != ORT}
    combos |= {(k[0], k[1]) for k in entries}
    vs = list(versions) if versions is not None else list(s.scalars(select(ModelVersion)))
    out = []
    for mv in sorted(vs, key=lambda v: (v.model, v.created_at)):
        runtime = _version_runtime(mv)
        for tier, rt in sorted(combos):
            e = entries.get((tier, rt, mv.model, mv.version))
            if e is not None:
                out.append(_cell(e))
            elif _axis_runtime(rt) == runtime:
                out.append(
                    {
                        "tier": tier,
                        "runtime": runtime,
                        "runtime_version": rt,
                        "model": mv.model,
                        "version": mv.version,
                        "status": "untested",
                        "failing_devices": [],
                        "agents": [],
                        "evidence": [],
                    }
                )
    return out
