"""The key migrations card on the ops dashboard: keys by status, failed keys, oldest scheduled."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest

from fleetops.access.selectors import org_ids_for_user
from fleetops.lib import clock
from fleetops.observability.models import Heartbeat
from fleetops.observability.registry import DashboardCard
from migrations_app.keys.schedule import HEARTBEAT as RESTAKE_HEARTBEAT
from migrations_app.keys.selectors import migration_summary
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
            }
        )
    oldest = summary.oldest_scheduled_at
    return {
        "by_status": sorted(summary.by_status.items()),
        "failed": summary.failed,
        "failed_count": summary.by_status.get(KeyMigrationStatus.FAILED, 0),
        "oldest_age": (now - oldest).total_seconds() if oldest else None,
        "stuck_after": settings.FLEETOPS_KEYS_STUCK_SECONDS,
        "loops": loops,
        "stale_after": settings.FLEETOPS_HEARTBEAT_STALE_SECONDS,
    }


CARD = DashboardCard(
    key="keys",
    title="Key migrations",
    template="migrations_app/keys/card.html",
    context=card_context,
    order=20,
)
