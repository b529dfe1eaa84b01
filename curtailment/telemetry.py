"""Telemetry predicates (pure). Curtailed means power at most half the baseline; restored means
more than half. Exactly half is neither: a deliberate no-progress band."""

from __future__ import annotations

import math

DRIFT_THRESHOLD_FACTOR = 0.5


def _known(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def is_curtailed(
    power_w: float | None, baseline_w: float | None, hash_rate_hs: float | None, *, require_evidence: bool
) -> bool:
    """Confirm path (require_evidence): only positive evidence counts. Drift path: missing data
    counts as still curtailed, so a flaky sensor cannot set off a redispatch storm."""
    if require_evidence:
        if not _known(power_w):
            return False
        if _known(baseline_w) and baseline_w > 0:  # type: ignore[operator]
            return power_w <= baseline_w * DRIFT_THRESHOLD_FACTOR  # type: ignore[operator]
        return _known(hash_rate_hs) and hash_rate_hs <= 0  # type: ignore[operator]
    if not _known(power_w):
        return not (_known(hash_rate_hs) and hash_rate_hs > 0)  # type: ignore[operator]
    if _known(baseline_w) and baseline_w > 0:  # type: ignore[operator]
        return power_w <= DRIFT_THRESHOLD_FACTOR * baseline_w  # type: ignore[operator]
    return not _known(hash_rate_hs) or hash_rate_hs <= 0  # type: ignore[operator]


def is_restored(power_w: float | None, baseline_w: float | None, hash_rate_hs: float | None) -> bool:
    if _known(power_w) and _known(baseline_w) and baseline_w > 0:  # type: ignore[operator]
        return power_w > DRIFT_THRESHOLD_FACTOR * baseline_w  # type: ignore[operator]
    return _known(hash_rate_hs) and hash_rate_hs > 0  # type: ignore[operator]
