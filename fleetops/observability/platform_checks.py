"""The platform's own status checks, scrape-time gauges and dashboard card."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.http import HttpRequest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from fleetops.lib import clock
from fleetops.observability import registry
from fleetops.observability.heartbeats import heartbeat_verdicts, schedule_last_runs
from fleetops.observability.models import Heartbeat, Lease
from fleetops.observability.registry import CheckResult, DashboardCard
from fleetops.observability.trends import platform_trends


def check_database() -> CheckResult:
    with connection.cursor() as cursor:
        cursor.execute("SELECT version(), pg_database_size(current_database())")
        version, size = cursor.fetchone()
    return CheckResult("ok", version.split(" on ")[0], [{"database size (MB)": round(size / 1e6, 1)}])


def check_broker() -> CheckResult:
    from fleetops.celery import app

    rows: list[dict[str, Any]] = []
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)
        transport = conn.transport_cls
        try:
            channel: Any = conn.default_channel
            for queue in (settings.CELERY_TASK_DEFAULT_QUEUE,):
                declared = channel.queue_declare(queue=queue, passive=True)
                rows.append({"queue": queue, "messages": declared.message_count})
        except Exception as exc:  # the queue may not exist before the first worker declares it
            rows.append({"queue": settings.CELERY_TASK_DEFAULT_QUEUE, "messages": f"unknown ({exc})"})
    return CheckResult("ok", f"reachable ({transport})", rows)


def check_beat() -> CheckResult:
    from django_celery_beat.models import PeriodicTask

    now = clock.now()
    # Beat saves `last_run_at` only every few minutes; the heartbeat rows the tasks write are
    # current, so a schedule that ran a minute ago never reads "never".
    ran = schedule_last_runs()
    rows: list[dict[str, Any]] = []
    late_names: list[str] = []
    for task in PeriodicTask.objects.select_related("interval", "crontab").order_by("name"):
        period = task.interval.schedule.run_every.total_seconds() if task.interval else 86400.0
        last_run = max((t for t in (task.last_run_at, ran.get(task.name)) if t is not None), default=None)
        # A schedule that never ran is measured from when it was created or last changed, so a daily
        # job is not "late" an hour after a deploy.
        since = last_run or task.date_changed
        late = bool(task.enabled and since is not None and (now - since).total_seconds() > 2 * period + 60)
        rows.append(
            {
                "schedule": task.name,
                "enabled": task.enabled,
                "every (s)": int(period),
                "last run": last_run.isoformat(timespec="seconds") if last_run else "never",
                "late": late,
            }
        )
        if late:
            late_names.append(task.name)
    summary = f"{len(rows)} schedules" + (f"; late: {', '.join(late_names)}" if late_names else "")
    return CheckResult("warn" if late_names else "ok", summary, rows)


def check_heartbeats() -> CheckResult:
    """One row per loop with its own staleness threshold and, when it is not ok, why."""
    verdicts = heartbeat_verdicts()
    rows = [
        {
            "loop": v.name,
            "status": v.status,
            "age (s)": round(v.age_seconds, 1),
            "stale after (s)": round(v.stale_after_seconds),
            "why": v.reason,
        }
        for v in verdicts
    ]
    warned = [v.name for v in verdicts if v.status == "warn"]
    finished = sum(1 for v in verdicts if v.status == "finished")
    summary = f"{len(rows)} loops" + (f", {finished} finished" if finished else "")
    if warned:
        summary += "; not ok: " + ", ".join(warned)
    return CheckResult("warn" if warned else "ok", summary, rows)


def check_leases() -> CheckResult:
    now = clock.now()
    rows = [
        {
            "lease": lease.name,
            "holder": lease.holder,
            "token": lease.token,
            "live": lease.expires_at > now,
            "expires in (s)": round((lease.expires_at - now).total_seconds(), 1),
        }
        for lease in Lease.objects.all()
    ]
    return CheckResult("ok", f"{sum(1 for r in rows if r['live'])} live of {len(rows)}", rows)


def collect_platform() -> Iterable[Metric]:
    now = clock.now()
    age = GaugeMetricFamily(
        "fleetops_platform_heartbeat_age_seconds",
        "Seconds since a loop last wrote its heartbeat.",
        labels=["name"],
    )
    success_age = GaugeMetricFamily(
        "fleetops_platform_heartbeat_success_age_seconds",
        "Seconds since a loop last completed an iteration successfully.",
        labels=["name"],
    )
    for name, beat_at, success_at in Heartbeat.objects.values_list("name", "last_beat_at", "last_success_at"):
        age.add_metric([name], (now - beat_at).total_seconds())
        if success_at is not None:
            success_age.add_metric([name], (now - success_at).total_seconds())
    yield age
    yield success_age

    held = GaugeMetricFamily(
        "fleetops_platform_lease_token",
        "Fencing token of each live lease (absent when expired).",
        labels=["name"],
    )
    for name, token in Lease.objects.filter(expires_at__gt=now).values_list("name", "token"):
        held.add_metric([name], token)
    yield held

    from django_celery_beat.models import PeriodicTask

    beat = GaugeMetricFamily(
        "fleetops_platform_schedule_last_run_age_seconds",
        "Seconds since Celery beat last sent each enabled schedule.",
        labels=["schedule"],
    )
    for name, last_run in PeriodicTask.objects.filter(enabled=True).values_list("name", "last_run_at"):
        if last_run is not None:
            beat.add_metric([name], (now - last_run).total_seconds())
    yield beat


# The card counts a day of audit rows up to this many and says "10,000+" beyond: refreshed every
# few seconds per open dashboard, an exact count would read a busy day's rows each time.
CARD_COUNT_CAP = 10_000


def _bounded_count(rows: Any) -> int | str:
    n = int(rows.order_by()[: CARD_COUNT_CAP + 1].count())
    return f"{CARD_COUNT_CAP:,}+" if n > CARD_COUNT_CAP else n


def platform_card_context(request: HttpRequest) -> dict[str, Any]:
    from fleetops.audit.models import AuditEvent
    from fleetops.audit.selectors import audit_event_visible_to

    now = clock.now()
    since = now - timedelta(hours=24)
    recent = audit_event_visible_to(user=request.user).filter(at__gte=since)
    heartbeats = [
        {"name": v.name, "age": v.age_seconds, "status": v.status, "why": v.reason}
        for v in heartbeat_verdicts(limit=20)
    ]
    return {
        "heartbeats": heartbeats,
        "audit_24h": _bounded_count(recent),
        "denied_24h": _bounded_count(recent.filter(action__in=AuditEvent.ATTENTION_ACTIONS)),
    }


def register() -> None:
    registry.register_status_check("database", check_database)
    registry.register_status_check("broker", check_broker)
    registry.register_status_check("beat schedules", check_beat)
    registry.register_status_check("heartbeats", check_heartbeats)
    registry.register_status_check("leases", check_leases)
    registry.register_collector("platform", collect_platform)
    registry.register_card(
        DashboardCard(
            key="platform",
            title="Platform",
            template="observability/card_platform.html",
            context=platform_card_context,
            order=0,
            trends=platform_trends,
        )
    )
