"""The curtailment card on the ops dashboard."""

from __future__ import annotations

from typing import Any

from django.db.models import Count
from django.http import HttpRequest

from curtailment.models import EVENT_NON_TERMINAL, CurtailmentEvent, CurtailmentTarget
from curtailment.reconciler import HEARTBEAT
from curtailment.selectors import event_stuck
from fleetops.access.models import Role
from fleetops.access.selectors import org_ids_for_user, org_ids_with_role
from fleetops.lib import clock
from fleetops.observability.heartbeats import heartbeat_verdict
from fleetops.observability.history import trend_series
from fleetops.observability.models import Heartbeat
from fleetops.observability.registry import DashboardCard, Sample, Trend
from fleetops.observability.trends import trend, user_org_ids

LIVE_EVENTS_SERIES = "curtailment.live_events"


def card_context(request: HttpRequest) -> dict[str, Any]:
    events = CurtailmentEvent.objects.filter(state__in=EVENT_NON_TERMINAL)
    if not request.user.is_superuser:
        events = events.filter(org_id__in=org_ids_for_user(request.user))
    live = list(events.order_by("-id")[:10])
    now = clock.now()
    for event in live:
        setattr(event, "stuck", event_stuck(event, now=now))  # noqa: B010 - read by the template
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
        # The reconciler's own threshold: twice its schedule's period plus a grace.
        "stale_after": heartbeat_verdict(heartbeat, now=now).stale_after_seconds if heartbeat else None,
        # The start link only for a role that may start one (a viewer would meet a refusal).
        "can_start": org_ids_with_role(user=request.user, role=Role.OPERATOR) != [],
    }


def sample_live_events() -> list[Sample]:
    """Live (non-terminal) events per organization, for the card's sparkline."""
    rows = (
        CurtailmentEvent.objects.filter(state__in=EVENT_NON_TERMINAL)
        .order_by()
        .values_list("org_id")
        .annotate(n=Count("id"))
        .values_list("org_id", "n")
    )
    return [(LIVE_EVENTS_SERIES, org_id, float(n)) for org_id, n in rows]


def card_trends(request: HttpRequest) -> list[Trend]:
    series = trend_series(series=[LIVE_EVENTS_SERIES], org_ids=user_org_ids(request))
    return [trend("live_events", "live events, 24 h", [series[LIVE_EVENTS_SERIES]])]


CARD = DashboardCard(
    key="curtailment",
    title="Curtailment",
    template="curtailment/card.html",
    context=card_context,
    order=10,
    trends=card_trends,
)
