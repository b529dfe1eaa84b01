"""Curtailment reads."""

from __future__ import annotations

from typing import Any

from django.db.models import Count, QuerySet

from curtailment.models import CurtailmentEvent, CurtailmentTarget, TargetState
from fleetops.access.models import Organization
from fleetops.lib.errors import NotFound

EVENT_NOT_FOUND = "No such curtailment event."


def event_get(*, org: Organization, uuid: Any) -> CurtailmentEvent:
    """Another organization's event is simply not found."""
    event = CurtailmentEvent.objects.filter(org=org, uuid=uuid).select_related("org").first()
    if event is None:
        raise NotFound(EVENT_NOT_FOUND)
    return event


def event_list(*, org: Organization, state: str | None = None) -> QuerySet[CurtailmentEvent]:
    qs = CurtailmentEvent.objects.filter(org=org)
    return qs.filter(state=state) if state else qs


def target_rollup(*, event: CurtailmentEvent) -> dict[str, int]:
    """Counts by state; DISPATCHING counts as dispatched (a command is about to be, or was, sent)."""
    counts = dict(
        CurtailmentTarget.objects.filter(event=event)
        .values_list("state")
        .annotate(n=Count("id"))
        .values_list("state", "n")
    )
    rollup = {state: counts.get(state, 0) for state in TargetState.values if state != TargetState.DISPATCHING}
    rollup[TargetState.DISPATCHED] += counts.get(TargetState.DISPATCHING, 0)
    rollup["total"] = sum(counts.values())
    return rollup


def target_list(*, event: CurtailmentEvent) -> QuerySet[CurtailmentTarget]:
    return CurtailmentTarget.objects.filter(event=event)
