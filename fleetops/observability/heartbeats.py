"""Heartbeat helpers every loop calls once per iteration, and the verdict on each loop.

A loop is stale when its row has not moved for twice its period plus a grace; the period comes
from the loop itself (`--loop --interval`, in its details) or from the declared schedule of the task
that writes the row (`DeclaredSchedule.heartbeat`). A one-shot loop (`expect_one_shot`) that finished
(`heartbeat_finish`) reads "finished", never stale.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from django.conf import settings
from django.db import connection

from fleetops import schedules
from fleetops.lib import clock
from fleetops.observability.models import Heartbeat
from fleetops.schedules import DeclaredSchedule

_UPSERT = f"""
INSERT INTO {Heartbeat._meta.db_table}
    (name, last_beat_at, last_success_at, last_duration_seconds, last_error, beats, failures, details)
VALUES (%(name)s, %(now)s, CASE WHEN %(ok)s THEN %(now)s END, %(duration)s, %(error)s, 1,
        CASE WHEN %(ok)s THEN 0 ELSE 1 END, %(details)s::jsonb)
ON CONFLICT (name) DO UPDATE SET
    last_beat_at = EXCLUDED.last_beat_at,
    last_success_at = COALESCE(EXCLUDED.last_success_at, {Heartbeat._meta.db_table}.last_success_at),
    last_duration_seconds = EXCLUDED.last_duration_seconds,
    last_error = EXCLUDED.last_error,
    beats = {Heartbeat._meta.db_table}.beats + 1,
    failures = {Heartbeat._meta.db_table}.failures + EXCLUDED.failures,
    details = EXCLUDED.details
"""  # noqa: S608 - table name comes from the model, values are parameters


def heartbeat_beat(
    *,
    name: str,
    ok: bool = True,
    duration: float = 0.0,
    error: str = "",
    details: dict[str, Any] | None = None,
) -> None:
    """Upsert one heartbeat in a single statement (no read-modify-write race between processes)."""
    import json

    with connection.cursor() as cursor:
        cursor.execute(
            _UPSERT,
            {
                "name": name,
                "now": clock.now(),
                "ok": ok,
                "duration": duration,
                "error": error[:4000],
                "details": json.dumps(details or {}, default=str),
            },
        )


@dataclass
class Beat:
    details: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def heartbeat_scope(name: str) -> Iterator[Beat]:
    """Time a loop iteration and write its heartbeat whatever happens; re-raises failures."""
    started = time.monotonic()
    beat = Beat()
    try:
        yield beat
    except Exception as exc:
        heartbeat_beat(
            name=name, ok=False, duration=time.monotonic() - started, error=repr(exc), details=beat.details
        )
        raise
    heartbeat_beat(name=name, ok=True, duration=time.monotonic() - started, details=beat.details)


def heartbeat_age_seconds(hb: Heartbeat, *, at: datetime | None = None) -> float:
    return ((at or clock.now()) - hb.last_beat_at).total_seconds()


# Beyond twice its period, a loop gets this long before it reads as stale (a slow tick, a busy
# worker, beat's own jitter).
HEARTBEAT_GRACE_SECONDS = 60.0
# `details` keys with a meaning to the verdict: a loop's own period (`--loop --interval`), and the
# mark a one-shot loop leaves when it completed.
INTERVAL_KEY = "interval"
FINISHED_KEY = "finished"

VerdictStatus = Literal["ok", "warn", "finished"]


@dataclass(frozen=True)
class LoopCadence:
    """How often a heartbeat row should move: `every_seconds` (None: unknown, the
    `FLEETOPS_HEARTBEAT_STALE_SECONDS` threshold applies) and whether the loop runs once."""

    every_seconds: float | None
    one_shot: bool = False
    source: str = "default"


_one_shots: set[str] = set()


def expect_one_shot(name: str) -> None:
    """Declare a loop that runs to completion once (a history migration): after its finishing beat
    (`heartbeat_finish`) it reads "finished", never stale. A name ending in ".*" covers every row
    it starts ("protocols.history.*": one per chain)."""
    _one_shots.add(name)


def is_one_shot(name: str) -> bool:
    return name in _one_shots or any(p.endswith(".*") and name.startswith(p[:-1]) for p in _one_shots)


def heartbeat_finish(*, name: str, details: dict[str, Any] | None = None) -> None:
    """The last beat of a one-shot loop that completed."""
    heartbeat_beat(name=name, ok=True, details={**(details or {}), FINISHED_KEY: True})


def _declared_by_heartbeat() -> dict[str, DeclaredSchedule]:
    return {s.heartbeat_name: s for s in schedules.declared()}


def schedule_for(name: str, declared: dict[str, DeclaredSchedule] | None = None) -> DeclaredSchedule | None:
    """The declared schedule whose task writes heartbeat `name` (exactly, or by a ".*" prefix)."""
    declared = _declared_by_heartbeat() if declared is None else declared
    if name in declared:
        return declared[name]
    for pattern, schedule in declared.items():
        if pattern.endswith(".*") and name.startswith(pattern[:-1]):
            return schedule
    return None


def loop_cadence(hb: Heartbeat, declared: dict[str, DeclaredSchedule] | None = None) -> LoopCadence:
    """Where a loop's period comes from, most specific first: the loop's own `--interval` in its
    details, the declared schedule of the task that writes it, or nothing known."""
    one_shot = is_one_shot(hb.name)
    interval = (hb.details or {}).get(INTERVAL_KEY)
    if isinstance(interval, int | float) and interval > 0:
        return LoopCadence(float(interval), one_shot, "--interval")
    schedule = schedule_for(hb.name, declared)
    if schedule is not None:
        return LoopCadence(float(schedule.every_seconds), one_shot, f"schedule {schedule.name}")
    return LoopCadence(None, one_shot)


@dataclass(frozen=True)
class HeartbeatVerdict:
    name: str
    status: VerdictStatus
    age_seconds: float
    stale_after_seconds: float
    reason: str


def heartbeat_verdict(
    hb: Heartbeat, *, now: datetime | None = None, declared: dict[str, DeclaredSchedule] | None = None
) -> HeartbeatVerdict:
    """Is this loop healthy, and if not, why. Stale means no beat for 2 x its period + a grace
    (`FLEETOPS_HEARTBEAT_STALE_SECONDS` when the period is unknown); a one-shot loop whose last beat
    marked it finished is "finished" however old; a loop whose last iteration failed warns."""
    age = heartbeat_age_seconds(hb, at=now)
    cadence = loop_cadence(hb, declared)
    if cadence.every_seconds is None:
        stale_after = float(settings.FLEETOPS_HEARTBEAT_STALE_SECONDS)
        expected = f"no declared period; stale after {stale_after:.0f} s"
    else:
        stale_after = 2 * cadence.every_seconds + HEARTBEAT_GRACE_SECONDS
        expected = f"every {cadence.every_seconds:.0f} s ({cadence.source}); stale after {stale_after:.0f} s"
    failing = hb.last_success_at is None or hb.last_success_at < hb.last_beat_at
    if cadence.one_shot and not failing and (hb.details or {}).get(FINISHED_KEY):
        return HeartbeatVerdict(hb.name, "finished", age, stale_after, "finished: ran once to completion")
    if age > stale_after:
        reason = f"stale: last beat {age:.0f} s ago, expected {expected}"
        return HeartbeatVerdict(hb.name, "warn", age, stale_after, reason)
    if failing:
        error = hb.last_error.strip().splitlines()[0][:200] if hb.last_error.strip() else "no error text"
        return HeartbeatVerdict(hb.name, "warn", age, stale_after, f"last iteration failed: {error}")
    return HeartbeatVerdict(hb.name, "ok", age, stale_after, f"beat {age:.0f} s ago, expected {expected}")


def heartbeat_verdicts(*, names: list[str] | None = None, limit: int = 200) -> list[HeartbeatVerdict]:
    """Verdicts of the heartbeat rows (one row per loop: a bounded table), by name."""
    rows = Heartbeat.objects.order_by("name")
    if names is not None:
        rows = rows.filter(name__in=names)
    now = clock.now()
    declared = _declared_by_heartbeat()
    return [heartbeat_verdict(hb, now=now, declared=declared) for hb in rows[:limit]]


def schedule_last_runs(declared: list[DeclaredSchedule] | None = None) -> dict[str, datetime]:
    """When each declared schedule's task last ran, from the heartbeat rows it writes (newest row
    for a ".*" pattern). Celery beat's `PeriodicTask.last_run_at` lags by up to its sync interval."""
    declared = schedules.declared() if declared is None else declared
    exact = [s.heartbeat_name for s in declared if not s.heartbeat_name.endswith(".*")]
    beats = dict(Heartbeat.objects.filter(name__in=exact).values_list("name", "last_beat_at"))
    runs: dict[str, datetime] = {}
    for schedule in declared:
        pattern = schedule.heartbeat_name
        if pattern.endswith(".*"):
            latest = (
                Heartbeat.objects.filter(name__startswith=pattern[:-1])
                .order_by("-last_beat_at")
                .values_list("last_beat_at", flat=True)
                .first()
            )
        else:
            latest = beats.get(pattern)
        if latest is not None:
            runs[schedule.name] = latest
    return runs
