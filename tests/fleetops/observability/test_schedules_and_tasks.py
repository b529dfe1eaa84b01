from __future__ import annotations

import pytest
from django_celery_beat.models import PeriodicTask

from fleetops.audit.actors import Actor
from fleetops.observability.metrics import CELERY_TASKS
from fleetops.observability.models import Heartbeat
from fleetops.observability.sync import schedules_sync
from fleetops.schedules import DeclaredSchedule, declared

pytestmark = pytest.mark.django_db
ACTOR = Actor.system("test")


def test_every_declared_schedule_expires_under_its_period():
    assert declared(), "the platform declares its own schedules"
    for schedule in declared():
        assert 0 < schedule.expires_seconds < schedule.every_seconds, schedule.name
    with pytest.raises(ValueError):
        DeclaredSchedule(name="x", task="t", every_seconds=30, expires_seconds=30)


def test_sync_creates_then_changes_nothing_on_a_rerun():
    first = schedules_sync(actor=ACTOR)
    second = schedules_sync(actor=ACTOR)

    assert set(first.created) == {s.name for s in declared()}
    assert second.created == second.updated == []
    row = PeriodicTask.objects.get(name="platform.worker_heartbeat")
    assert row.interval.every == 30 and row.expire_seconds == 25


def test_a_created_schedule_is_due_on_beats_first_tick_and_has_not_run_yet():
    from django_celery_beat.schedulers import ModelEntry

    schedules_sync(actor=ACTOR)
    for schedule in declared():
        row = PeriodicTask.objects.get(name=schedule.name)
        assert row.last_run_at is None  # the status page says "never" until it has run
        due, _ = ModelEntry(row).is_due()
        assert due, schedule.name  # not one period after the deploy

    started = PeriodicTask.objects.get(name="platform.worker_heartbeat").start_time
    PeriodicTask.objects.filter(name="platform.worker_heartbeat").update(expire_seconds=999)
    schedules_sync(actor=ACTOR)
    assert PeriodicTask.objects.get(name="platform.worker_heartbeat").start_time == started


def test_sync_keeps_an_operators_pause_and_fixes_drifted_fields():
    schedules_sync(actor=ACTOR)
    PeriodicTask.objects.filter(name="platform.worker_heartbeat").update(enabled=False, expire_seconds=999)

    result = schedules_sync(actor=ACTOR)

    row = PeriodicTask.objects.get(name="platform.worker_heartbeat")
    assert result.updated == ["platform.worker_heartbeat"]
    assert row.enabled is False
    assert row.expire_seconds == 25


def test_sync_never_deletes_rows_it_does_not_know():
    PeriodicTask.objects.create(name="operator.custom", task="x.y", interval=_interval())
    schedules_sync(actor=ACTOR)
    assert PeriodicTask.objects.filter(name="operator.custom").exists()


def _interval():
    from django_celery_beat.models import IntervalSchedule

    return IntervalSchedule.objects.create(every=60, period=IntervalSchedule.SECONDS)


def test_a_task_run_records_metrics_through_celery_signals_and_its_heartbeat():
    from fleetops.observability.tasks import worker_heartbeat

    before = CELERY_TASKS.labels(task=worker_heartbeat.name, state="success")._value.get()
    worker_heartbeat.apply()
    after = CELERY_TASKS.labels(task=worker_heartbeat.name, state="success")._value.get()

    assert after == before + 1
    assert Heartbeat.objects.get(name="platform.worker").beats == 1
