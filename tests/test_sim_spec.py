"""The simulator's pure parts: durations, the tier mix, the fault spec and the fleet plan."""

from __future__ import annotations

import json

import pytest

from edgefleet.errors import UsageError
from edgefleet.sim.demo import canary_percent
from edgefleet.sim.link import skew_report
from edgefleet.sim.spec import parse_duration, parse_faults, parse_tiers, plan_fleet


def test_durations() -> None:
    assert parse_duration("500ms") == 0.5
    assert parse_duration("10m") == 600
    assert parse_duration("-2h") == -7200
    assert parse_duration("90") == 90
    with pytest.raises(UsageError, match="500 ms"):
        parse_duration("500 ms x")


def test_tier_weights_split_by_largest_remainder() -> None:
    assert parse_tiers("x86-avx2=3,arm-a53-small=1", 8) == {"x86-avx2": 6, "arm-a53-small": 2}
    both = parse_tiers(None, 10)
    assert sum(both.values()) == 10 and set(both) == {"x86-avx2", "arm-a72", "arm-a53-small", "x86-vnni"}
    with pytest.raises(UsageError, match="unknown tier 'pi'"):
        parse_tiers("pi=1", 4)
    with pytest.raises(UsageError, match="add up to 0"):
        parse_tiers("x86-avx2=0", 4)


def test_faults_parse_and_reject() -> None:
    f = parse_faults(
        "flaky=0.3@10%, cut=20s@2, slow, clock-skew=-1h@1, memory=128@arm-a72, crash=3.0.0@rk3308,"
        " disk-full, power-loss@1"
    )
    assert [x.kind for x in f] == ["flaky", "cut", "slow", "clock-skew", "memory", "crash", "disk-full", "power-loss"]
    assert f[2].value == "500ms" and f[2].who == "1" and f[1].seconds == 20
    for bad, msg in [
        ("boom", "unknown fault"),
        ("flaky=2", r"\[0, 1\]"),
        ("memory", "needs a value"),
        ("memory=lots", "in MB"),
        ("cut=soon", "duration"),
    ]:
        with pytest.raises(UsageError, match=msg):
            parse_faults(bad)


def test_plan_full_agents_and_fault_targets() -> None:
    counts = parse_tiers(None, 12)
    faults = parse_faults("flaky@2,power-loss@1,memory=64@arm-a72,crash=2.0.0@rk3308")
    plans = plan_fleet(counts, full=4, faults=faults, full_tiers=("arm-a53-small",))
    full = [p for p in plans if p.full]
    assert len(full) == 4 and sum(p.tier.name == "arm-a53-small" for p in full) == 3  # the whole tier first
    flaky = [p for p in plans if p.fault("flaky")]
    assert len(flaky) == 2 and not any(p.full for p in flaky)  # link faults go to lightweight agents
    assert [p.full for p in plans if p.fault("power-loss")] == [True]
    assert all(p.memory_mb == 64 for p in plans if p.tier.name == "arm-a72")
    assert {p.tier.chipset for p in plans if p.fault("crash")} == {"rk3308"}
    with pytest.raises(UsageError, match="needs full agents"):
        plan_fleet(counts, full=0, faults=parse_faults("disk-full"))
    with pytest.raises(UsageError, match="no device"):
        plan_fleet({"x86-avx2": 2}, full=0, faults=parse_faults("crash=1.0.0@rk3308"))


def test_clock_skew_moves_every_timestamp() -> None:
    body = json.dumps(
        {
            "sent_at": "2026-01-01T00:02:00+00:00",
            "events": [{"at": "2026-01-01T00:00:00+00:00"}],
            "telemetry": [{"start": "2026-01-01T00:00:00+00:00", "end": "2026-01-01T00:01:00+00:00"}],
        }
    )
    doc = json.loads(skew_report(body.encode(), 3600))
    assert doc["events"][0]["at"].startswith("2026-01-01T01:00")
    assert doc["telemetry"][0]["end"].startswith("2026-01-01T01:01")
    assert doc["sent_at"].startswith("2026-01-01T01:02")  # the server reads the device's clock offset from it


def test_canary_holds_every_tier() -> None:
    ids = {f"dev-{i}": t for i, t in enumerate(["a", "b", "c", "d"] * 5)}
    pct = canary_percent(ids)
    from edgefleet.controlplane.rollout import DeviceFacts, plan_wave

    # the control plane's own membership function decides who is in the canary
    facts = [DeviceFacts(d, t, "1") for d, t in ids.items()]
    canary = plan_wave(facts, model="m", version="2", wave=0, waves=[pct, 100], tier=None, channel=None, moved=[])
    assert {ids[d] for d in canary} == {"a", "b", "c", "d"} and 5 <= pct <= 99
