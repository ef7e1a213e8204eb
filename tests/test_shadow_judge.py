"""The shadow phase's pure decisions (controlplane/shadow.py): which devices, the sums, the judgement, the step."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.controlplane.rollout import RolloutPolicy, wave_bucket
from edgefleet.controlplane.shadow import (
    ShadowAction,
    ShadowJudgement,
    ShadowOutcome,
    ShadowPolicy,
    ShadowWindow,
    TierShadow,
    choose_devices,
    judge_shadow,
    shadow_action,
    tier_stats,
)
from edgefleet.telemetry.sketch import LatencySketch

P = ShadowPolicy(min_samples=100, min_agreement=0.9, duration_s=60, max_wait_s=120)


def tier(
    name: str = "t", early: tuple[int, int] = (0, 0), late: tuple[int, int] = (0, 0), errors: int = 0
) -> TierShadow:
    return TierShadow(
        tier=name,
        devices=1,
        compared=early[0] + late[0],
        agreed=early[1] + late[1],
        errors=errors,
        halves=(early, late),
    )


# ------------------------------------------------------------------------------------------------ devices


def test_choose_devices_takes_a_share_of_each_tier_at_least_one_by_the_stable_hash() -> None:
    fleet = [(f"a{i}", "arm") for i in range(40)] + [(f"x{i}", "x86") for i in range(3)]
    got = choose_devices(fleet, 5.0, wave_bucket)
    arm = sorted((f"a{i}" for i in range(40)), key=lambda i: (wave_bucket(i), i))[:2]  # ceil(5 % of 40)
    x86 = sorted((f"x{i}" for i in range(3)), key=lambda i: (wave_bucket(i), i))[:1]  # at least one
    assert got == arm + x86
    assert choose_devices(list(reversed(fleet)), 5.0, wave_bucket) == got  # the order given does not matter
    assert choose_devices([], 5.0, wave_bucket) == []
    assert sorted(choose_devices(fleet, 100.0, wave_bucket)) == sorted(i for i, _ in fleet)


# ------------------------------------------------------------------------------------------------ sums


def test_tier_stats_sums_each_tier_and_splits_the_halves_at_the_middle_of_the_phase() -> None:
    fast, slow = LatencySketch(), LatencySketch()
    fast.extend([0.001] * 20)
    slow.extend([0.004] * 20)
    windows = [
        ShadowWindow("arm", 10.0, 20, 18, errors=1, dropped=3, latency=fast.to_data(), device_id="d1"),
        ShadowWindow("arm", 60.0, 20, 10, dropped=1, latency=slow.to_data(), device_id="d2"),
        ShadowWindow("x86", 70.0, 5, 5, device_id="d3"),
    ]
    got = {t.tier: t for t in tier_stats(windows, {"arm": 1, "x86": 1, "riscv": 2}, started=0.0, now=100.0)}
    arm = got["arm"]
    assert (arm.compared, arm.agreed, arm.errors, arm.dropped) == (40, 28, 1, 4)
    assert arm.halves == ((20, 18), (20, 10))
    assert arm.devices == 2  # more devices sent windows than hold the order now
    assert arm.agreement == pytest.approx(0.7)
    assert arm.p95_ms == pytest.approx(4.0, rel=0.02)
    assert got["x86"].halves == ((0, 0), (5, 5))
    assert got["riscv"] == TierShadow("riscv", 2)  # a tier in shadow with no window yet
    assert got["riscv"].agreement is None and got["riscv"].p95_ms is None


# ------------------------------------------------------------------------------------------------ judgement


def test_no_tier_is_inconclusive() -> None:
    assert judge_shadow([], P).outcome is ShadowOutcome.inconclusive


def test_an_agreeing_candidate_passes_on_its_sample() -> None:
    j = judge_shadow([tier(early=(60, 60), late=(60, 59))], P)
    assert j.outcome is ShadowOutcome.passed
    assert "agreement 99.2% (119/120" in j.reason


def test_agreement_exactly_at_the_threshold_passes() -> None:
    assert judge_shadow([tier(early=(50, 45), late=(50, 45))], P).outcome is ShadowOutcome.passed


def test_a_short_sample_waits_even_when_it_agrees() -> None:
    j = judge_shadow([tier(early=(40, 40), late=(40, 40))], P)
    assert j.outcome is ShadowOutcome.inconclusive and "80 of 100 mirrored requests compared" in j.reason


def test_a_tier_without_a_comparison_waits() -> None:
    j = judge_shadow([tier("a", early=(60, 60), late=(60, 60)), tier("b")], P)
    assert j.outcome is ShadowOutcome.inconclusive and "tier b: 0 of 100" in j.reason


def test_disagreement_in_both_halves_fails_and_names_the_figures() -> None:
    j = judge_shadow([tier("arm", early=(50, 20), late=(50, 25), errors=3)], P)
    assert j.outcome is ShadowOutcome.failed
    assert j.reason == (
        "tier arm: agreement 45.0% (45/100, 3 errors; halves 40.0% of 50, 50.0% of 50) < 90.0% in both halves"
    )


def test_disagreement_in_one_half_only_is_not_a_failure() -> None:
    j = judge_shadow([tier(early=(60, 10), late=(60, 60))], P)
    assert j.outcome is ShadowOutcome.inconclusive and "in one half only" in j.reason


def test_disagreement_waits_for_the_later_half_to_have_its_sample() -> None:
    j = judge_shadow([tier(early=(100, 10), late=(20, 2))], P)
    assert j.outcome is ShadowOutcome.inconclusive and "confirming in both halves (50 each)" in j.reason


def test_one_failing_tier_fails_the_phase_whatever_the_others() -> None:
    j = judge_shadow([tier("a", early=(60, 60), late=(60, 60)), tier("b", early=(50, 0), late=(50, 0))], P)
    assert j.outcome is ShadowOutcome.failed and j.reason.startswith("tier b:")
    assert [t.tier for t in j.tiers] == ["a", "b"]


def test_candidate_errors_count_against_agreement() -> None:
    # compared counts errors: a candidate that fails every request agrees with nothing
    j = judge_shadow([tier(early=(50, 0), late=(50, 0), errors=100)], P)
    assert j.outcome is ShadowOutcome.failed and "100 errors" in j.reason


# ------------------------------------------------------------------------------------------------ the step


@pytest.mark.parametrize(
    ("outcome", "elapsed", "action", "starts"),
    [
        (ShadowOutcome.failed, 0.0, ShadowAction.halt, "shadow phase failed: "),
        (ShadowOutcome.failed, 500.0, ShadowAction.halt, "shadow phase failed: "),
        (ShadowOutcome.passed, 59.0, ShadowAction.wait, "shadow phase running (59/60 s): "),
        (ShadowOutcome.passed, 60.0, ShadowAction.start_canary, "shadow phase passed: "),
        (ShadowOutcome.inconclusive, 179.0, ShadowAction.wait, "shadow phase running (179 s): "),
        (ShadowOutcome.inconclusive, 180.0, ShadowAction.halt, "shadow phase inconclusive at its deadline: "),
    ],
)
def test_shadow_action(outcome: ShadowOutcome, elapsed: float, action: ShadowAction, starts: str) -> None:
    got, why = shadow_action(ShadowJudgement(outcome, "R"), elapsed, P)
    assert got is action and why.startswith(starts) and why.endswith("R")


def test_the_rollout_policy_takes_an_optional_shadow_phase() -> None:
    assert RolloutPolicy().shadow is None
    p = RolloutPolicy.model_validate({"shadow": {"percent": 10, "min_agreement": 0.95}})
    assert p.shadow is not None and p.shadow.percent == 10 and p.shadow.min_samples == 200
    with pytest.raises(ValueError, match="extra"):
        RolloutPolicy.model_validate({"shadow": {"precent": 10}})
    with pytest.raises(ValueError):
        ShadowPolicy(min_agreement=1.5)


_half = st.tuples(st.integers(0, 300), st.integers(0, 300)).map(lambda t: (t[0], min(t[0], t[1])))


@given(halves=st.lists(st.tuples(_half, _half), min_size=1, max_size=4))
@settings(max_examples=300, deadline=None)
def test_the_judgement_fails_only_on_replicated_disagreement_and_passes_only_on_the_full_sample(
    halves: list[tuple[tuple[int, int], tuple[int, int]]],
) -> None:
    tiers = [tier(f"t{i}", early=e, late=late) for i, (e, late) in enumerate(halves)]
    j = judge_shadow(tiers, P)
    half = P.min_samples // 2

    def replicated_low(t: TierShadow) -> bool:
        return (
            t.compared > 0
            and t.agreed / t.compared < P.min_agreement
            and all(c >= half and a / c < P.min_agreement for c, a in t.halves)
        )

    def fit(t: TierShadow) -> bool:
        return t.compared >= P.min_samples and t.agreed / t.compared >= P.min_agreement

    if j.outcome is ShadowOutcome.failed:
        assert any(replicated_low(t) for t in tiers)
    elif j.outcome is ShadowOutcome.passed:
        assert all(fit(t) for t in tiers)
    else:
        assert not any(replicated_low(t) for t in tiers) and not all(fit(t) for t in tiers)
