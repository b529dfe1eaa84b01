"""The reconciler's event moves are named services (activate, complete, expire), each audited in
the transaction of its state change: the row and the change commit together or not at all."""

from __future__ import annotations

from datetime import timedelta

import pytest

from curtailment.lifecycle import (
    EXPIRE_NOT_DUE,
    curtailment_activate,
    curtailment_complete,
    curtailment_expire,
)
from curtailment.models import EVENT_MACHINE, TARGET_MACHINE, CurtailmentEvent, EventState, TargetState
from curtailment.planning import StartRequest
from curtailment.reconciler import reconcile_tick
from curtailment.services import curtailment_start, curtailment_stop
from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.lib import transition as kernel
from fleetops.lib.errors import Conflict, Forbidden
from tests.curtailment.conftest import make_fleet
from tests.curtailment.fakes import FakeGateway
from tests.transitions import assert_trail_replays, set_state

SCHEDULER = Actor.scheduler("curtailment.reconciler")


def start(member, **kw):
    kw.setdefault("target_kw", 6.0)
    kw.setdefault("reason", "grid request")
    return curtailment_start(org=member.org, actor=Actor.for_user(member.user), req=StartRequest(**kw)).event


def actions(event):
    return list(
        AuditEvent.objects.filter(target_id=str(event.pk)).order_by("id").values_list("action", flat=True)
    )


class AuditStoreDown(RuntimeError):
    pass


@pytest.fixture
def audit_fails(monkeypatch):
    """The kernel's audit write raises: whatever it was to describe must not commit either."""

    def boom(**kwargs):
        raise AuditStoreDown(kwargs["action"])

    monkeypatch.setattr(kernel, "record", boom)


@pytest.mark.django_db(transaction=True)
def test_a_tick_activates_and_completes_in_autocommit_with_the_audit_rows(operator, org):
    """No test transaction around the tick: `record()` refuses to run outside one, so an audit row
    written after its change (in autocommit) would fail here."""
    gateway = FakeGateway(d.identifier for d in make_fleet(org, 4))
    event = start(operator)

    reconcile_tick(gateway_for=gateway.factory())
    event.refresh_from_db()
    assert event.state == EventState.ACTIVE and event.started_at is not None
    activated = AuditEvent.objects.get(action="curtailment.activated", target_id=str(event.pk))
    assert activated.changes == {"state": [EventState.PENDING, EventState.ACTIVE]}
    assert activated.actor_type == "scheduler" and activated.metadata["confirmed"] == 2

    curtailment_stop(event=event, actor=Actor.for_user(operator.user), reason="enough")
    with clock.frozen(clock.now() + timedelta(seconds=31)):
        reconcile_tick(gateway_for=gateway.factory())
        reconcile_tick(gateway_for=gateway.factory())
    event.refresh_from_db()
    assert event.state == EventState.COMPLETED and event.ended_at is not None
    completed = AuditEvent.objects.get(action="curtailment.completed", target_id=str(event.pk))
    assert completed.changes == {"state": [EventState.RESTORING, EventState.COMPLETED]}
    assert completed.metadata["targets"] == {TargetState.RESOLVED: 2}
    assert actions(event) == [
        "curtailment.started",
        "curtailment.activated",
        "curtailment.stopped",
        "curtailment.completed",
    ]
    assert_trail_replays(event, EVENT_MACHINE)


@pytest.mark.django_db(transaction=True)
def test_a_failed_audit_write_leaves_the_event_pending(operator, fleet, audit_fails):
    event = start(operator)  # a start creates its event; it does not go through the kernel
    with pytest.raises(AuditStoreDown):
        curtailment_activate(event=event, actor=SCHEDULER, counts={TargetState.CONFIRMED: 2})
    event.refresh_from_db()
    assert (event.state, event.started_at) == (EventState.PENDING, None)
    assert not AuditEvent.objects.filter(action="curtailment.activated").exists()


@pytest.mark.django_db(transaction=True)
def test_a_failed_audit_write_leaves_the_event_restoring(operator, fleet, audit_fails):
    event = start(operator)
    set_state(event, EVENT_MACHINE, EventState.RESTORING)
    with pytest.raises(AuditStoreDown):
        curtailment_complete(event=event, actor=SCHEDULER, to=EventState.COMPLETED, counts={})
    event.refresh_from_db()
    assert (event.state, event.ended_at) == (EventState.RESTORING, None)


@pytest.mark.django_db(transaction=True)
def test_a_tick_whose_audit_write_fails_changes_no_event(operator, fleet, audit_fails):
    gateway = FakeGateway(d.identifier for d in fleet)
    event = start(operator)
    result = reconcile_tick(gateway_for=gateway.factory())
    assert result.failures == 1  # counted and logged; the tick went on
    event.refresh_from_db()
    assert event.state == EventState.PENDING
    # The target writes committed (they are not audited one by one); the activation did not.
    assert set(event.targets.values_list("state", flat=True)) == {TargetState.CONFIRMED}


@pytest.mark.django_db
def test_expire_stops_an_event_past_its_maximum_duration(operator, fleet):
    event = start(operator, max_duration_seconds=600)
    set_state(event, EVENT_MACHINE, EventState.ACTIVE, started_at=clock.now())
    with pytest.raises(Conflict, match=EXPIRE_NOT_DUE.format(uuid=event.uuid)):
        curtailment_expire(event=event, actor=SCHEDULER)
    with clock.frozen(clock.now() + timedelta(seconds=601)):
        curtailment_expire(event=event, actor=SCHEDULER)
    event.refresh_from_db()
    assert event.state == EventState.RESTORING
    audit = AuditEvent.objects.get(action="curtailment.max_duration_reached")
    assert audit.changes == {"state": [EventState.ACTIVE, EventState.RESTORING]}
    assert audit.metadata["targets_reset"] == 2 and audit.metadata["max_duration_seconds"] == 600
    assert set(event.targets.values_list("state", "desired_state")) == {(TargetState.PENDING, "active")}
    assert set(event.targets.values_list("state", flat=True)) <= set(TARGET_MACHINE.states)


@pytest.mark.django_db
def test_a_person_cannot_take_an_engine_edge_and_the_refusal_is_audited(operator, admin_member, fleet):
    event = start(operator)
    for member in (operator, admin_member):
        with pytest.raises(Forbidden):
            curtailment_activate(event=event, actor=Actor.for_user(member.user), counts={})
    denied = AuditEvent.objects.filter(action="access.denied", target_id=str(event.pk))
    assert denied.count() == 2
    assert denied.first().metadata["what"] == "curtailment.event: pending -> active"
    assert CurtailmentEvent.objects.get(pk=event.pk).state == EventState.PENDING


@pytest.mark.django_db
def test_an_active_event_redispatches_a_target_whose_confirmation_timed_out(operator, fleet):
    gateway = FakeGateway(d.identifier for d in fleet)
    event = start(operator)
    reconcile_tick(gateway_for=gateway.factory())
    event.refresh_from_db()
    assert event.state == EventState.ACTIVE
    stuck = event.targets.order_by("id").first()
    # A redispatch after drift that the device never confirmed: it still mines.
    gateway.mining[stuck.device_identifier] = True
    long_ago = clock.now() - timedelta(seconds=301)
    set_state(stuck, TARGET_MACHINE, TargetState.DISPATCHED, dispatch_attempt=2, last_dispatched_at=long_ago)

    reconcile_tick(gateway_for=gateway.factory())

    stuck.refresh_from_db()
    assert (stuck.state, stuck.retry_count, stuck.dispatch_attempt) == (TargetState.DISPATCHED, 1, 3)
    assert stuck.last_error == ""  # cleared by the new dispatch
    assert not gateway.mining[stuck.device_identifier]
