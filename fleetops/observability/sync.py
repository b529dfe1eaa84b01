from __future__ import annotations

import json
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask, PeriodicTasks

from fleetops.audit.actors import Actor
from fleetops.audit.models import PlatformAction
from fleetops.audit.services import record
from fleetops.schedules import DeclaredSchedule, declared


@dataclass(frozen=True)
class SyncResult:
    created: list[str]
    updated: list[str]
    unchanged: list[str]


def schedules_sync(*, actor: Actor, schedules: list[DeclaredSchedule] | None = None) -> SyncResult:
    """Upsert declared schedules into django-celery-beat without deleting rows or touching `enabled`."""
    created, updated, unchanged = [], [], []
    with transaction.atomic():
        for schedule in schedules if schedules is not None else declared():
            interval, _ = IntervalSchedule.objects.get_or_create(
                every=schedule.every_seconds, period=IntervalSchedule.SECONDS
            )
            wanted = {
                "task": schedule.task,
                "interval": interval,
                "crontab": None,
                "expire_seconds": schedule.expires_seconds,
                "description": schedule.description,
                "kwargs": json.dumps(schedule.kwargs, sort_keys=True),
                "queue": schedule.queue,
            }
            row = PeriodicTask.objects.filter(name=schedule.name).first()
            if row is None:
                # A start time and no last run: django-celery-beat then runs the schedule on beat's
                # first tick. Without a start time it counts the first period from the row's
                # creation, so a fresh deploy would show no heartbeat and no reconciler tick for up
                # to a full period. `last_run_at` stays empty until it has really run.
                PeriodicTask.objects.create(
                    name=schedule.name, enabled=True, start_time=timezone.now(), **wanted
                )
                created.append(schedule.name)
                continue
            diff = {k: v for k, v in wanted.items() if getattr(row, k) != v}
            if diff:
                PeriodicTask.objects.filter(pk=row.pk).update(**diff)
                updated.append(schedule.name)
            else:
                unchanged.append(schedule.name)
        if created or updated:
            # .update() skips PeriodicTask.save(), so tell beat explicitly that its schedule changed.
            PeriodicTasks.update_changed()
            record(
                action=PlatformAction.SCHEDULES_SYNCED,
                actor=actor,
                org=None,
                metadata={"created": created, "updated": updated},
            )
    return SyncResult(created=created, updated=updated, unchanged=unchanged)
