"""Curtailment reads."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db.models import Count, QuerySet

from curtailment.models import CurtailmentEvent, CurtailmentTarget, EventState, TargetState
from fleetops.access.models import Organization
from fleetops.lib import clock
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


def restore_allowance_seconds(event: CurtailmentEvent) -> int:
    """How long the event's restore plan may take: its selected devices in batches of
    `effective_batch_size`, one batch every `restore_batch_interval_sec`, plus the grace."""
    selected = int((event.decision_snapshot or {}).get("selected_count") or 0)
    batches = math.ceil(selected / max(event.effective_batch_size or 1, 1)) if selected else 1
    return batches * event.restore_batch_interval_sec + settings.FLEETOPS_CURTAILMENT_RESTORE_GRACE_SECONDS


def event_stuck(event: CurtailmentEvent, *, now: datetime | None = None) -> str:
    """Why the event is past its expected time, or "" when it is not. From the row alone (no query):
    1. pending (not yet active) for longer than FLEETOPS_CURTAILMENT_PENDING_STUCK_SECONDS;
    2. restoring for longer than its restore plan allows (`restore_allowance_seconds`), counted from
       the last change of the event (entering restoring stamps `updated_at`)."""
    now = now or clock.now()
    if event.state == EventState.PENDING:
        age = (now - event.created_at).total_seconds()
        limit = settings.FLEETOPS_CURTAILMENT_PENDING_STUCK_SECONDS
        if age > limit:
            return f"pending for {age / 60:.0f} min (expected active within {limit / 60:.0f} min)"
    if event.state == EventState.RESTORING:
        age = (now - event.updated_at).total_seconds()
        allowance = restore_allowance_seconds(event)
        if age > allowance:
            return f"restoring for {age / 60:.0f} min (its restore plan allows {allowance / 60:.0f} min)"
    return ""
