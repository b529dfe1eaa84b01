"""Heartbeat helpers every loop calls once per iteration."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import connection

from fleetops.lib import clock
from fleetops.observability.models import Heartbeat

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
