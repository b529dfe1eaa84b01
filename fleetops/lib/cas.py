"""Compare-and-set helpers: a conditional UPDATE whose row count is checked.

State columns move through the transition kernel (`fleetops.lib.transition`), which uses these;
`cas_update` is for the other guarded columns (cursors, leases, counters). If the row count is
not what the caller expected, somebody else moved the row first; that is a `RaceLost`,
counted in `fleetops_platform_race_lost_total{operation}` and logged, never silently success.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from django.db import models

from fleetops.lib.errors import RaceLost
from fleetops.observability.metrics import RACE_LOST

log = logging.getLogger(__name__)
M = TypeVar("M", bound=models.Model)


def cas_update(queryset: models.QuerySet[M], *, operation: str, expected: int = 1, **updates: Any) -> int:
    """Apply `updates` to `queryset`; raise RaceLost unless exactly `expected` rows changed."""
    changed = queryset.update(**updates)
    if changed != expected:
        note_race_lost(operation, expected=expected, changed=changed)
        raise RaceLost(f"{operation}: expected {expected} row(s) to change, {changed} did.")
    return changed


def note_race_lost(operation: str, *, expected: int = 1, changed: int = 0) -> None:
    """Count a lost compare-and-set once per call (never a log line per row)."""
    RACE_LOST.labels(operation=operation).inc(max(expected - changed, 1))
    log.debug("race lost", extra={"operation": operation, "expected": expected, "changed": changed})
