"""Candidate selection, shared by preview and start. Pure functions over plain data: the caller
loads devices, the live-event set and the cooldown set; nothing here touches the database.

1. Stage A pre-filter, first match wins (12 stages, the skip-reason vocabulary is a contract).
2. Stage B dual-signal filter on power against the floor and hash rate.
3. Rank least efficient first (J/TH descending), unknown efficiency last, ties by identifier.
4. FIXED_KW: take devices in rank order until the running sum reaches the target; else, within
   the tolerance, take them all; else insufficient load.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from django.conf import settings

STALE_AFTER = timedelta(minutes=15)

# The order of the counters in the insufficient-load message (fixed; only non-zero ones appear).
SKIP_REASONS = (
    "below_candidate_min_power_w",
    "phantom_load_no_hash",
    "power_telemetry_unreliable",
    "unreachable_residual_load",
    "maintenance",
    "updating",
    "reboot_required",
    "stale_telemetry",
    "non_actionable_status",
    "pairing",
    "cooldown",
    "active_event",
    "curtail_full_unsupported",
)
INSUFFICIENT_LOAD = (
    "insufficient curtailable load: {available:.3f} kW available, {requested:.3f} kW requested, "
    "tolerance {tolerance:.3f} kW, candidate_min_power_w={floor:d}W"
)
REASON_SELECTED = "least_efficient_first"


class Outcome(StrEnum):
    TARGET_REACHED = "target_reached"
    UNDERSHOOT_TOLERATED = "undershoot_tolerated"
    INSUFFICIENT_LOAD = "insufficient_load"


@dataclass(frozen=True)
class Candidate:
    device_id: int
    identifier: str
    driver: str
    status: str
    pairing_status: str
    sample_at: datetime | None
    power_w: float | None
    hash_rate_hs: float | None
    efficiency_j_th: float | None


@dataclass(frozen=True)
class Selected:
    candidate: Candidate
    power_w: float
    efficiency_j_th: float | None


@dataclass(frozen=True)
class Skipped:
    identifier: str
    reason: str


@dataclass
class Plan:
    outcome: Outcome
    selected: list[Selected]
    skipped: list[Skipped]
    eligible_total_w: float
    target_w: float
    tolerance_w: float
    floor_w: int
    counts: Counter[str] = field(default_factory=Counter)

    @property
    def realised_w(self) -> float:
        return sum(s.power_w for s in self.selected)

    @property
    def estimated_reduction_kw(self) -> float:
        return self.realised_w / 1000

    @property
    def estimated_remaining_power_kw(self) -> float:
        return (self.eligible_total_w - self.realised_w) / 1000

    def insufficient_load_message(self) -> str:
        message = INSUFFICIENT_LOAD.format(
            available=self.eligible_total_w / 1000,
            requested=self.target_w / 1000,
            tolerance=self.tolerance_w / 1000,
            floor=self.floor_w,
        )
        excluded = [f"{reason}={self.counts[reason]}" for reason in SKIP_REASONS if self.counts[reason]]
        return message + ("; excluded: " + ", ".join(excluded) if excluded else "")


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def prefilter_reason(
    c: Candidate,
    *,
    now: datetime,
    active: set[str],
    cooldown: set[str],
    include_maintenance: bool,
    force_include_maintenance: bool,
) -> str | None:
    """Stage A: the first matching skip reason, or None when the device goes on to Stage B."""
    if c.identifier in active:
        return "active_event"
    if c.pairing_status != "PAIRED":
        return "pairing"
    if not c.driver:
        return "curtail_full_unsupported"
    if not c.status:
        return "stale_telemetry"
    if c.status == "updating":
        return "updating"
    if c.status == "reboot_required":
        return "reboot_required"
    if c.status == "offline":
        return "unreachable_residual_load"
    if c.status in ("inactive", "needs_mining_pool"):
        return "non_actionable_status"
    if c.status == "maintenance" and not (include_maintenance and force_include_maintenance):
        return "maintenance"
    if c.sample_at is None or now - c.sample_at > STALE_AFTER:
        return "stale_telemetry"
    if not _finite(c.power_w) or not _finite(c.hash_rate_hs):
        return "stale_telemetry"
    if c.identifier in cooldown:
        return "cooldown"
    return None


def dual_signal_reason(c: Candidate, floor_w: int) -> str | None:
    """Stage B: power below the floor and/or no hash rate."""
    power, hashrate = float(c.power_w or 0), float(c.hash_rate_hs or 0)
    if power < floor_w and hashrate <= 0:
        return "below_candidate_min_power_w"
    if power < floor_w:
        return "power_telemetry_unreliable"  # hashing but the power monitor reads low: dead AC meter
    if hashrate <= 0:
        return "phantom_load_no_hash"
    return None


def rank(eligible: Iterable[Candidate]) -> list[Candidate]:
    """Least efficient (highest J/TH) first; unknown efficiency last; ties by identifier."""
    ordered = sorted(eligible, key=lambda c: c.identifier)
    return sorted(
        ordered,
        key=lambda c: (0, -float(c.efficiency_j_th)) if _finite(c.efficiency_j_th) else (1, 0.0),  # type: ignore[arg-type]
    )


def select_fixed_kw(
    candidates: Iterable[Candidate],
    *,
    now: datetime,
    target_kw: float,
    tolerance_kw: float,
    floor_w: int,
    active: set[str],
    cooldown: set[str],
    include_maintenance: bool = False,
    force_include_maintenance: bool = False,
) -> Plan:
    skipped: list[Skipped] = []
    counts: Counter[str] = Counter()
    eligible: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: c.identifier):
        reason = prefilter_reason(
            c,
            now=now,
            active=active,
            cooldown=cooldown,
            include_maintenance=include_maintenance,
            force_include_maintenance=force_include_maintenance,
        ) or dual_signal_reason(c, floor_w)
        if reason:
            skipped.append(Skipped(c.identifier, reason))
            counts[reason] += 1
        else:
            eligible.append(c)

    ranked = rank(eligible)
    total = sum(float(c.power_w or 0) for c in ranked)
    target_w, tolerance_w = target_kw * 1000, tolerance_kw * 1000
    selected: list[Selected] = []
    running = 0.0
    outcome = Outcome.INSUFFICIENT_LOAD
    for c in ranked:
        power = float(c.power_w or 0)
        selected.append(Selected(c, power, c.efficiency_j_th if _finite(c.efficiency_j_th) else None))
        running += power
        if running >= target_w:
            outcome = Outcome.TARGET_REACHED
            break
    if outcome is not Outcome.TARGET_REACHED:
        if tolerance_w > 0 and total >= target_w - tolerance_w:
            outcome = Outcome.UNDERSHOOT_TOLERATED
        else:
            selected = []
    return Plan(
        outcome=outcome,
        selected=selected,
        skipped=skipped,
        eligible_total_w=total,
        target_w=target_w,
        tolerance_w=tolerance_w,
        floor_w=floor_w,
        counts=counts,
    )


def effective_batch_size(requested: int, selected_count: int, *, cap: int | None = None) -> int:
    """clamp(max(requested, ceil(1% of targets)), 10, cap), frozen at start. The cap is
    `FLEETOPS_CURTAIL_RESTORE_BATCH_MAX` (1,000): a 100,000-target event restores in 100 batches."""
    top = max(10, settings.FLEETOPS_CURTAIL_RESTORE_BATCH_MAX if cap is None else cap)
    return max(10, min(top, max(max(requested, 0), math.ceil(selected_count / 100))))
