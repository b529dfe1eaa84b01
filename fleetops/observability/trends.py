"""Sparklines for the dashboard cards: helpers every card uses, and the platform card's own
(audit rows per hour over the last day)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from django.db.models import Count
from django.db.models.functions import TruncHour
from django.http import HttpRequest

from fleetops.access.selectors import org_ids_for_user
from fleetops.audit.selectors import audit_event_visible_to
from fleetops.lib import clock
from fleetops.lib.charts import sparkline
from fleetops.observability.registry import Trend

TREND_HOURS = 24


def user_org_ids(request: HttpRequest) -> list[int] | None:
    """None for a superuser (every organization)."""
    return None if request.user.is_superuser else list(org_ids_for_user(request.user))


def trend(key: str, caption: str, series: Sequence[Sequence[float | None]]) -> Trend:
    """A sparkline, or an honest "no history yet" when no series has a value."""
    if not any(v is not None for s in series for v in s):
        caption = f"{caption} (no history yet)"
    return Trend(key=key, caption=caption, svg=str(sparkline(series, label=caption)))


def platform_trends(request: HttpRequest) -> list[Trend]:
    """Audit rows per hour over the last day, zero-filled: one grouped query bounded to 24 hours."""
    now = clock.now()
    first = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=TREND_HOURS - 1)
    counts = dict(
        audit_event_visible_to(user=request.user)
        .filter(at__gte=first)
        .order_by()
        .annotate(hour=TruncHour("at"))
        .values("hour")
        .annotate(n=Count("id"))
        .values_list("hour", "n")
    )
    hours = [first + timedelta(hours=i) for i in range(TREND_HOURS)]
    return [trend("audit", "audit rows per hour, 24 h", [[float(counts.get(h, 0)) for h in hours]])]
