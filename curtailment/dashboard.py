"""The curtailment card on the ops dashboard."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models import Count
from django.http import HttpRequest

from curtailment.models import EVENT_NON_TERMINAL, CurtailmentEvent, CurtailmentTarget
from curtailment.reconciler import HEARTBEAT
from fleetops.access.selectors import org_ids_for_user
from fleetops.lib import clock
from fleetops.observability.models import Heartbeat
from fleetops.observability.registry import DashboardCard


def card_context(request: HttpRequest) -> dict[str, Any]:
    events = CurtailmentEvent.objects.filter(state__in=EVENT_NON_TERMINAL)
    if not request.user.is_superuser:
        events = events.filter(org_id__in=org_ids_for_user(request.user))
    live = list(events.order_by("-id")[:10])
    targets = dict(
        CurtailmentTarget.objects.filter(event__in=events)
        .values_list("state")
        .annotate(n=Count("id"))
        .values_list("state", "n")
    )
    heartbeat = Heartbeat.objects.filter(name=HEARTBEAT).first()
    age = (clock.now() - heartbeat.last_beat_at).total_seconds() if heartbeat else None
    return {
        "live": live,
        "targets": sorted(targets.items()),
        "heartbeat_age": age,
        "heartbeat_duration": heartbeat.last_duration_seconds if heartbeat else None,
        "stale_after": settings.FLEETOPS_HEARTBEAT_STALE_SECONDS,
    }


CARD = DashboardCard(
    key="curtailment", title="Curtailment", template="curtailment/card.html", context=card_context, order=10
)
