"""What a simulated fleet looks like, as pure data: durations, the tier mix, the fault spec, and the plan that
gives every simulated device its tier, its kind (full or lightweight) and its faults. No I/O here.

Tier mix: ``x86-avx2=3,arm-a53-small=1`` (weights, split by largest remainder) — default: the shipped tiers,
equally. Faults: comma-separated ``kind[=value][@who]``, ``who`` being ``N`` devices, ``P%`` of the fleet, or a tier
name (default ``@1``)::

    flaky=0.3@10%     drop 30 % of the device's HTTP requests        (link: lightweight agents)
    cut=20s@2         the link is down for 20 s, from 3 s into the run (link)
    slow=500ms@5%     each request waits 500 ms first                (link)
    clock-skew=2h@1   the device's clock runs 2 h ahead (-2h: behind) (link: timestamps it sends)
    memory=128@arm-a72  the device has 128 MB (``--memory-mb``)      (process)
    crash=3.0.0@rk3308  model version 3.0.0 crashes the worker on these devices ("chipset" fault)
    disk-full@1       writes beyond a few KB fail (RLIMIT_FSIZE)     (full agents only)
    power-loss@1      kill -9 of the agent in the middle of an update, then a restart (full agents only)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from edgefleet import durations
from edgefleet.bench.tiers import TierProfile, default_tiers
from edgefleet.errors import UsageError

__all__ = [
    "FAULT_KINDS",
    "DevicePlan",
    "Fault",
    "parse_duration",
    "parse_faults",
    "parse_tiers",
    "plan_fleet",
]

LINK_KINDS = frozenset({"flaky", "cut", "slow", "clock-skew"})
PROCESS_ONLY = frozenset({"disk-full", "power-loss"})
FAULT_KINDS = ("flaky", "cut", "slow", "clock-skew", "memory", "crash", "disk-full", "power-loss")


def parse_duration(text: str, flag: str | None = None) -> float:
    """``90``, ``90s``, ``500ms``, ``10m``, ``1h30m``, ``-2h`` → seconds (:mod:`edgefleet.durations`; negative: a
    clock running behind)."""
    return durations.parse_duration(text, flag=flag, allow_negative=True)


def parse_tiers(spec: str | None, total: int, known: dict[str, TierProfile] | None = None) -> dict[str, int]:
    """Device counts per tier summing to ``total``. Weights, not counts: ``a=3,b=1`` with 8 devices → 6 and 2."""
    tiers = known or default_tiers()
    if total < 1:
        raise UsageError("--devices must be at least 1")
    weights: dict[str, float] = {}
    if not spec:
        weights = dict.fromkeys(tiers, 1.0)
    else:
        for part in spec.split(","):
            name, _, w = part.strip().partition("=")
            if name not in tiers:
                raise UsageError(f"unknown tier {name!r} in --tiers; known: {', '.join(tiers)}")
            try:
                weights[name] = float(w) if w else 1.0
            except ValueError:
                raise UsageError(f"--tiers: weight of {name} must be a number, not {w!r}")
            if weights[name] < 0 or math.isnan(weights[name]):
                raise UsageError(f"--tiers: weight of {name} must be >= 0")
    s = sum(weights.values())
    if s <= 0:
        raise UsageError("--tiers: the weights add up to 0")
    exact = {k: total * w / s for k, w in weights.items()}
    counts = {k: int(v) for k, v in exact.items()}
    # largest remainder, ties by the order given, so the split is deterministic
    for k in sorted(exact, key=lambda k: -(exact[k] - counts[k]))[: total - sum(counts.values())]:
        counts[k] += 1
    return {k: v for k, v in counts.items() if v}


@dataclass(frozen=True)
class Fault:
    kind: str
    value: str | None = None
    who: str = "1"

    @property
    def seconds(self) -> float:
        return parse_duration(self.value or "0")

    def describe(self) -> str:
        return f"{self.kind}{'=' + self.value if self.value else ''}@{self.who}"


_DEFAULTS = {"flaky": "0.2", "cut": "10s", "slow": "500ms", "clock-skew": "1h"}


def parse_faults(spec: str | None) -> list[Fault]:
    out: list[Fault] = []
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        head, _, who = part.partition("@")
        kind, _, value = head.partition("=")
        kind = kind.strip()
        if kind not in FAULT_KINDS:
            raise UsageError(f"unknown fault {kind!r} in --faults; known: {', '.join(FAULT_KINDS)}")
        v = value.strip() or _DEFAULTS.get(kind)
        if kind in ("memory", "crash") and not v:
            raise UsageError(f"fault {kind} needs a value: memory=MB or crash=VERSION")
        if kind == "flaky":
            try:
                p = float(v or "")
            except ValueError:
                raise UsageError(f"flaky={v}: give the fraction of requests to drop, e.g. flaky=0.2")
            if not 0 <= p <= 1:
                raise UsageError(f"flaky={v}: the fraction must be in [0, 1]")
        elif kind in ("cut", "slow", "clock-skew"):
            parse_duration(v or "", f"--faults {kind}")
        elif kind == "memory" and not (v or "").isdigit():
            raise UsageError(f"memory={v}: give the device memory in MB, e.g. memory=128")
        who = who.strip() or "1"
        if not re.fullmatch(r"\d+%?|[A-Za-z0-9_.-]+", who):
            raise UsageError(f"fault {kind}: '@{who}' is not a count, a percentage or a tier/chipset name")
        out.append(Fault(kind, v, who))
    return out


@dataclass
class DevicePlan:
    index: int
    tier: TierProfile
    full: bool
    faults: list[Fault] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"sim-{self.index:04d}-{self.tier.name}"

    @property
    def memory_mb(self) -> int:
        for f in self.faults:
            if f.kind == "memory" and f.value:
                return int(f.value)
        return self.tier.memory_mb

    def fault(self, kind: str) -> Fault | None:
        return next((f for f in self.faults if f.kind == kind), None)


def plan_fleet(
    counts: dict[str, int],
    *,
    full: int,
    faults: list[Fault] = (),  # type: ignore[assignment]
    full_tiers: tuple[str, ...] = (),
    known: dict[str, TierProfile] | None = None,
) -> list[DevicePlan]:
    """Devices interleaved by tier; ``full`` of them are full agents, first every device of ``full_tiers``,
    then one per tier in turn. A fault's ``@who`` picks devices in index order (full agents first for the
    process-only kinds, which a lightweight agent cannot suffer)."""
    tiers = known or default_tiers()
    order: list[str] = []
    left = dict(counts)
    while any(left.values()):
        for t in counts:
            if left[t]:
                order.append(t)
                left[t] -= 1
    plans = [DevicePlan(i, tiers[t], False) for i, t in enumerate(order)]
    want = min(full, len(plans))
    for p in plans:
        if want and p.tier.name in full_tiers:
            p.full, want = True, want - 1
    for p in plans:
        if want and not p.full:
            p.full, want = True, want - 1
    for f in faults:
        pool = plans
        if f.kind in LINK_KINDS and any(not p.full for p in plans):
            pool = [p for p in plans if not p.full]  # link faults are injected in the lightweight agents' transport
        if f.kind in PROCESS_ONLY:
            pool = [p for p in plans if p.full]
            if not pool:
                raise UsageError(f"fault {f.kind} needs full agents: raise --full")
        if f.who.endswith("%"):
            n = math.ceil(len(pool) * float(f.who[:-1]) / 100.0)
            chosen = pool[:n]
        elif f.who.isdigit():
            chosen = pool[: int(f.who)]
        else:
            chosen = [p for p in pool if f.who in (p.tier.name, p.tier.chipset)]
            if not chosen:
                raise UsageError(f"fault {f.describe()}: no device of tier or chipset {f.who!r} in this fleet")
        for p in chosen:
            p.faults.append(f)
    return plans
