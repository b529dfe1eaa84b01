"""Periodic tasks declared in code and upserted into django-celery-beat's tables.

Apps declare their schedules in `AppConfig.ready()`. `manage.py schedules_sync` (run by the demo
and on every deploy) creates missing rows and updates task/interval/expiry of existing ones, but
never deletes a row and never touches `enabled`: an operator's pause in the admin survives deploys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DeclaredSchedule:
    name: str
    task: str
    every_seconds: int
    expires_seconds: int
    description: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None
    # The heartbeat row(s) the task writes: its name by default; a prefix ending in ".*" for a task
    # that beats once per item ("indexer.enrich.*": one row per chain). Staleness is measured
    # against `every_seconds`, and the schedule's last run is read from these rows (beat's own
    # `last_run_at` is only saved every few minutes).
    heartbeat: str = ""

    @property
    def heartbeat_name(self) -> str:
        return self.heartbeat or self.name

    def __post_init__(self) -> None:
        # A tick that sat in the queue longer than its period is worthless: the next one is due.
        if not 0 < self.expires_seconds < self.every_seconds:
            raise ValueError(f"{self.name}: expires_seconds must be positive and under every_seconds")


_declared: dict[str, DeclaredSchedule] = {}


def declare(**kwargs: Any) -> DeclaredSchedule:
    schedule = DeclaredSchedule(**kwargs)
    _declared[schedule.name] = schedule
    return schedule


def declared() -> list[DeclaredSchedule]:
    return sorted(_declared.values(), key=lambda s: s.name)
