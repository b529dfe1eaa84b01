"""The selector, rule by rule (pure functions: no database)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from curtailment.selector import (
    SKIP_REASONS,
    Candidate,
    Outcome,
    dual_signal_reason,
    effective_batch_size,
    prefilter_reason,
    rank,
    select_fixed_kw,
)

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def dev(identifier="m-1", **kw) -> Candidate:
    base = {
        "device_id": 1,
        "identifier": identifier,
        "driver": "antminer",
        "status": "active",
        "pairing_status": "PAIRED",
        "sample_at": NOW - timedelta(minutes=1),
        "power_w": 3000.0,
        "hash_rate_hs": 1e14,
        "efficiency_j_th": 30.0,
    }
    base.update(kw)
    return Candidate(**base)


def reason(c, **kw):
    opts: dict[str, Any] = {
        "now": NOW,
        "active": set(),
        "cooldown": set(),
        "include_maintenance": False,
        "force_include_maintenance": False,
    }
    opts.update(kw)
    return prefilter_reason(c, **opts)


@pytest.mark.parametrize(
    ("candidate", "kwargs", "expected"),
    [
        (dev(), {"active": {"m-1"}}, "active_event"),
        (dev(pairing_status="UNPAIRED"), {}, "pairing"),
        (dev(driver=""), {}, "curtail_full_unsupported"),
        (dev(status=""), {}, "stale_telemetry"),
        (dev(status="updating"), {}, "updating"),
        (dev(status="reboot_required"), {}, "reboot_required"),
        (dev(status="offline"), {}, "unreachable_residual_load"),
        (dev(status="inactive"), {}, "non_actionable_status"),
        (dev(status="needs_mining_pool"), {}, "non_actionable_status"),
        (dev(status="maintenance"), {}, "maintenance"),
        (dev(status="maintenance"), {"include_maintenance": True}, "maintenance"),
        (dev(sample_at=None), {}, "stale_telemetry"),
        (dev(sample_at=NOW - timedelta(minutes=16)), {}, "stale_telemetry"),
        (dev(power_w=math.nan), {}, "stale_telemetry"),
        (dev(hash_rate_hs=math.inf), {}, "stale_telemetry"),
        (dev(), {"cooldown": {"m-1"}}, "cooldown"),
    ],
)
def test_each_prefilter_stage_has_its_reason(candidate, kwargs, expected):
    assert reason(candidate, **kwargs) == expected


def test_the_first_matching_stage_wins():
    c = dev(pairing_status="UNPAIRED", status="offline", driver="")
    assert reason(c, active={"m-1"}) == "active_event"
    assert reason(c) == "pairing"


@pytest.mark.parametrize("status", ["active", "error", "unknown"])
def test_active_error_and_unknown_fall_through_to_eligibility(status):
    assert reason(dev(status=status)) is None


def test_maintenance_needs_both_flags():
    assert reason(dev(status="maintenance"), include_maintenance=True, force_include_maintenance=True) is None


def test_the_dual_signal_filter():
    assert dual_signal_reason(dev(power_w=1000, hash_rate_hs=0), 1500) == "below_candidate_min_power_w"
    assert dual_signal_reason(dev(power_w=1000, hash_rate_hs=5e13), 1500) == "power_telemetry_unreliable"
    assert dual_signal_reason(dev(power_w=2000, hash_rate_hs=0), 1500) == "phantom_load_no_hash"
    assert dual_signal_reason(dev(power_w=1500, hash_rate_hs=1), 1500) is None


def test_ranking_is_least_efficient_first_unknown_last_stable_by_identifier():
    devices = [
        dev("m-4", efficiency_j_th=None),
        dev("m-3", efficiency_j_th=20.0),
        dev("m-2", efficiency_j_th=35.0),
        dev("m-1", efficiency_j_th=20.0),
        dev("m-0", efficiency_j_th=math.nan),
    ]
    assert [c.identifier for c in rank(devices)] == ["m-2", "m-1", "m-3", "m-0", "m-4"]


def _fleet():
    return [dev(f"m-{i}", efficiency_j_th=20.0 + i, power_w=3000.0) for i in range(5)]


def plan(**kw):
    opts: dict[str, Any] = {
        "now": NOW,
        "target_kw": 6.0,
        "tolerance_kw": 0.0,
        "floor_w": 1500,
        "active": set(),
        "cooldown": set(),
    }
    opts.update(kw)
    return select_fixed_kw(opts.pop("candidates", _fleet()), **opts)


def test_fixed_kw_stops_at_the_first_device_that_reaches_the_target():
    result = plan(target_kw=7.0)
    assert result.outcome is Outcome.TARGET_REACHED
    assert [s.candidate.identifier for s in result.selected] == ["m-4", "m-3", "m-2"]
    assert result.estimated_reduction_kw == 9.0
    assert result.estimated_remaining_power_kw == 6.0


def test_fixed_kw_takes_everything_within_the_tolerance():
    result = plan(target_kw=16.0, tolerance_kw=1.5)
    assert result.outcome is Outcome.UNDERSHOOT_TOLERATED
    assert len(result.selected) == 5


def test_insufficient_load_selects_nothing_and_explains_itself_byte_for_byte():
    candidates = [
        *_fleet()[:2],
        dev("x-1", power_w=100.0, hash_rate_hs=0.0),
        dev("x-2", status="offline"),
        dev("x-3", status="offline"),
        dev("x-4", driver=""),
    ]
    result = plan(candidates=candidates, target_kw=10.0, tolerance_kw=0.5)
    assert result.outcome is Outcome.INSUFFICIENT_LOAD
    assert result.selected == []
    assert result.insufficient_load_message() == (
        "insufficient curtailable load: 6.000 kW available, 10.000 kW requested, tolerance 0.500 kW, "
        "candidate_min_power_w=1500W; excluded: below_candidate_min_power_w=1, unreachable_residual_load=2, "
        "curtail_full_unsupported=1"
    )


def test_the_excluded_part_is_omitted_when_nothing_was_excluded():
    message = plan(target_kw=100.0).insufficient_load_message()
    assert message.endswith("candidate_min_power_w=1500W")


def test_every_reason_the_selector_produces_is_in_the_message_vocabulary():
    reasons = {
        reason(dev(pairing_status="U")),
        reason(dev(driver="")),
        reason(dev(status="updating")),
        reason(dev(status="reboot_required")),
        reason(dev(status="offline")),
        reason(dev(status="inactive")),
        reason(dev(status="maintenance")),
        reason(dev(sample_at=None)),
        reason(dev(), cooldown={"m-1"}),
        reason(dev(), active={"m-1"}),
        dual_signal_reason(dev(power_w=0, hash_rate_hs=0), 1500),
        dual_signal_reason(dev(power_w=0, hash_rate_hs=1), 1500),
        dual_signal_reason(dev(hash_rate_hs=0), 1500),
    }
    assert reasons == set(SKIP_REASONS)


def test_plans_are_reproducible():
    shuffled = list(reversed(_fleet()))
    assert [s.candidate.identifier for s in plan(candidates=shuffled).selected] == [
        s.candidate.identifier for s in plan().selected
    ]


@pytest.mark.parametrize(
    ("requested", "targets", "expected"),
    [(0, 5, 10), (0, 5000, 50), (0, 20000, 100), (500, 5, 100), (-3, 5, 10), (40, 100, 40)],
)
def test_effective_batch_size(requested, targets, expected):
    assert effective_batch_size(requested, targets, cap=100) == expected


@pytest.mark.parametrize(
    ("requested", "targets", "expected"),
    [(0, 5, 10), (0, 20_000, 200), (0, 100_000, 1000), (0, 500_000, 1000), (5000, 5, 1000)],
)
def test_the_default_batch_cap_restores_a_large_event_in_a_hundred_batches(requested, targets, expected):
    assert effective_batch_size(requested, targets) == expected
