"""The event moves the reconciler makes, as named services: activate, complete, expire.

Each one is a kernel transition (`fleetops.lib.transition`): the edge's role is checked for the
actor (the reconciler acts as `Actor.scheduler("curtailment.reconciler")`; activate and complete are
engine edges no person can take), then one transaction locks the event, runs the compare-and-set
UPDATE and writes the audit row. A lost race raises `RaceLost`; the reconciler counts it and moves on.

`event_begin_restore` is the step stop and expire share: every live target back to `pending` for the
restore phase and the event to `restoring`, in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from django.db import transaction

from curtailment.models import EVENT_MACHINE, CurtailmentEvent, EventState, TargetState
from curtailment.targets import target_reset_for_restore
from fleetops.audit.actors import Actor
from fleetops.lib import clock
from fleetops.lib.cas import note_race_lost
from fleetops.lib.errors import Conflict, RaceLost
from fleetops.lib.transition import Moved, authorize, transition

MOVED_SINCE_READ = "curtailment event {uuid} is {state!r} now, not {expected!r}; read it again"
EXPIRE_NOT_DUE = "curtailment event {uuid} has not reached its maximum duration"


def lock_as_read(event: CurtailmentEvent) -> None:
    """Lock the event row; `RaceLost` when its state moved since `event` was read."""
    state = (
        CurtailmentEvent.objects.select_for_update()
        .filter(pk=event.pk)
        .values_list("state", flat=True)
        .first()
    )
    if state != event.state:
        note_race_lost(f"{EVENT_MACHINE.name}>lock")
        raise RaceLost(MOVED_SINCE_READ.format(uuid=event.uuid, state=state, expected=event.state))


def event_begin_restore(
    event: CurtailmentEvent, *, actor: Actor, reason: str, action: str, metadata: Mapping[str, Any]
) -> Moved:
    """pending|active -> restoring, every live target reset for the restore phase, one audit row.
    Call it inside a transaction that holds the event's lock (`lock_as_read`), after authorizing
    the edge: the targets are written before the event so the audit row can count them."""
    reset = target_reset_for_restore(event=event)
    return transition(
        event,
        machine=EVENT_MACHINE,
        to=EventState.RESTORING,
        actor=actor,
        org=event.org,
        action=action,
        reason=reason,
        updates={"updated_at": clock.now()},
        metadata={"event_uuid": str(event.uuid), "targets_reset": reset, **metadata},
        check_role=False,
    )


def curtailment_activate(*, event: CurtailmentEvent, actor: Actor, counts: Mapping[str, int]) -> Moved:
    """pending -> active: every target is confirmed or restore_failed and at least one confirmed
    (the reconciler decides from `counts`, the targets by state, which the audit row keeps)."""
    now = clock.now()
    return transition(
        event,
        machine=EVENT_MACHINE,
        to=EventState.ACTIVE,
        actor=actor,
        org=event.org,
        action="curtailment.activated",
        updates={"started_at": now, "updated_at": now},
        metadata={
            "event_uuid": str(event.uuid),
            "confirmed": counts.get(TargetState.CONFIRMED, 0),
            "restore_failed": counts.get(TargetState.RESTORE_FAILED, 0),
        },
    )


def curtailment_complete(
    *, event: CurtailmentEvent, actor: Actor, to: str, counts: Mapping[str, int]
) -> Moved:
    """pending|restoring -> completed | completed_with_failures: every target is final (`to` is
    chosen by the reconciler from `counts`, which the audit row keeps)."""
    now = clock.now()
    return transition(
        event,
        machine=EVENT_MACHINE,
        to=to,
        actor=actor,
        org=event.org,
        action="curtailment.completed",
        updates={"ended_at": now, "updated_at": now},
        metadata={"event_uuid": str(event.uuid), "targets": dict(counts)},
    )


def max_duration_reached(event: CurtailmentEvent, *, now: datetime) -> bool:
    if event.allow_unbounded or not event.max_duration_seconds or event.started_at is None:
        return False
    return (now - event.started_at).total_seconds() >= event.max_duration_seconds


def curtailment_expire(*, event: CurtailmentEvent, actor: Actor) -> Moved:
    """active -> restoring because the event's maximum duration is reached (the same step as a stop,
    audited as `curtailment.max_duration_reached`)."""
    if not max_duration_reached(event, now=clock.now()):
        raise Conflict(EXPIRE_NOT_DUE.format(uuid=event.uuid), code="state_conflict")
    authorize(
        machine=EVENT_MACHINE,
        source=event.state,
        to=EventState.RESTORING,
        actor=actor,
        org=event.org,
        target=event,
    )
    with transaction.atomic():
        lock_as_read(event)
        return event_begin_restore(
            event,
            actor=actor,
            reason="max duration reached",
            action="curtailment.max_duration_reached",
            metadata={"max_duration_seconds": event.max_duration_seconds},
        )
