"""The key migrations card on the ops dashboard: keys by status, failed keys, oldest scheduled."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models import Count
from django.http import HttpRequest

from fleetops.access.selectors import org_ids_for_user
from fleetops.lib import clock
from fleetops.observability.heartbeats import heartbeat_verdict
from fleetops.observability.history import trend_series
from fleetops.observability.models import Heartbeat
from fleetops.observability.registry import DashboardCard, Sample, Trend
from fleetops.observability.trends import trend, user_org_ids
from migrations_app.keys.schedule import HEARTBEAT as RESTAKE_HEARTBEAT
from migrations_app.keys.selectors import SUMMARY_COUNT_CAP, migration_summary
from migrations_app.keys.verification import HEARTBEAT as VERIFY_HEARTBEAT
from migrations_app.models.keys import Key, KeyMigrationStatus


def card_context(request: HttpRequest) -> dict[str, Any]:
    keys = Key.objects.all()
    if not request.user.is_superuser:
        keys = keys.filter(org_id__in=org_ids_for_user(request.user))
    summary = migration_summary(keys=keys)
    now = clock.now()
    beats = {hb.name: hb for hb in Heartbeat.objects.filter(name__in=(RESTAKE_HEARTBEAT, VERIFY_HEARTBEAT))}
    loops = []
    for name, title in ((RESTAKE_HEARTBEAT, "Re-stake schedule"), (VERIFY_HEARTBEAT, "Verification")):
        hb = beats.get(name)
        loops.append(
            {
                "title": title,
                "age": (now - hb.last_beat_at).total_seconds() if hb else None,
                "error": hb.last_error if hb else "",
                # Each loop's own threshold: twice its schedule's period plus a grace.
                "stale_after": heartbeat_verdict(hb, now=now).stale_after_seconds if hb else None,
            }
        )
    oldest = summary.oldest_scheduled_at
    # Counts are bounded: past the cap the card says "1,000+" (the sparkline has the sampled figure).
    shown: dict[str, int | str] = {
        status: f"{SUMMARY_COUNT_CAP:,}+" if n > SUMMARY_COUNT_CAP else n
        for status, n in summary.by_status.items()
    }
    return {
        "by_status": sorted(shown.items()),
        "failed": summary.failed,
        "failed_count": shown[KeyMigrationStatus.FAILED],
        "oldest_age": (now - oldest).total_seconds() if oldest else None,
        "stuck_after": settings.FLEETOPS_KEYS_STUCK_SECONDS,
        "loops": loops,
    }


# Sampled for the sparkline: keys in flight (scheduled + retrying) and failed, per organization.
TREND_STATUSES = (KeyMigrationStatus.SCHEDULED, KeyMigrationStatus.RETRYING, KeyMigrationStatus.FAILED)


def _series(status: str) -> str:
    return f"keys.{status}"


def sample_keys_by_status() -> list[Sample]:
    rows = (
        Key.objects.filter(migration_status__in=TREND_STATUSES)
        .order_by()
        .values_list("org_id", "migration_status")
        .annotate(n=Count("id"))
        .values_list("org_id", "migration_status", "n")
    )
    return [(_series(status), org_id, float(n)) for org_id, status, n in rows]


def card_trends(request: HttpRequest) -> list[Trend]:
    """In flight (scheduled + retrying, first line) and failed (second line) over the last day."""
    series = trend_series(series=[_series(s) for s in TREND_STATUSES], org_ids=user_org_ids(request))
    scheduled, retrying, failed = (series[_series(s)] for s in TREND_STATUSES)
    in_flight = [a + b for a, b in zip(scheduled, retrying, strict=True)]
    return [trend("by-status", "keys in flight / failed, 24 h", [in_flight, failed])]


CARD = DashboardCard(
    key="keys",
    title="Key migrations",
    template="migrations_app/keys/card.html",
    context=card_context,
    order=20,
    trends=card_trends,
)
