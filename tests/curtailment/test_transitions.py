"""Transition tests generated from the curtailment machines: every (from, to) pair of both machines
is either reached through a named service (the maps below must name a service for every edge, so a
new edge without one fails) or refused by the kernel without a write."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from curtailment.lifecycle import curtailment_activate, curtailment_complete
from curtailment.models import (
    EVENT_MACHINE,
    TARGET_MACHINE,
    CurtailmentEvent,
    CurtailmentTarget,
    DesiredState,
    EventState,
    TargetState,
)
from curtailment.planning import StartRequest
from curtailment.services import (
    curtailment_start,
    curtailment_stop,
    curtailment_terminate,
    curtailment_update,
)
from curtailment.targets import (
    Phase,
    target_confirm,
    target_fail,
    target_mark_dispatched,
    target_mark_dispatching,
    target_mark_drifted,
    target_observe,
    target_resolve,
)
from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.lib.transition import transition_rows
from tests.transitions import assert_refused_without_write, edge_keys, pair_params, set_state

pytestmark = pytest.mark.django_db

E, T = EventState, TargetState
SCHEDULER = Actor.scheduler("curtailment.reconciler")


@dataclass
class Ctx:
    event: CurtailmentEvent
    target: CurtailmentTarget
    operator: Actor
    admin: Actor

    @property
    def phase(self) -> Phase:
        return Phase(event_id=self.event.pk, event_state=self.event.state, desired=self.target.desired_state)


@pytest.fixture
def ctx(operator, admin_member, fleet) -> Ctx:
    admin = Actor.for_user(admin_member.user)
    event = curtailment_start(
        org=admin_member.org, actor=admin, req=StartRequest(target_kw=6.0, reason="grid request")
    ).event
    target = event.targets.order_by("id").first()
    assert target is not None
    return Ctx(
        event=event,
        target=target,
        operator=Actor.for_user(operator.user),
        admin=admin,
    )


# --- the event machine ------------------------------------------------------------------------------


def _terminate(state: str) -> Callable[[Ctx], Any]:
    return lambda c: curtailment_terminate(event=c.event, actor=c.admin, target_state=state, reason="stuck")


def _complete(state: str) -> Callable[[Ctx], Any]:
    return lambda c: curtailment_complete(event=c.event, actor=SCHEDULER, to=state, counts={})


def _stop(c: Ctx) -> Any:
    return curtailment_stop(event=c.event, actor=c.operator, reason="price dropped")


def _update(c: Ctx) -> Any:
    return curtailment_update(event=c.event, actor=c.operator, patch={"restore_batch_size": 7})


def _activate(c: Ctx) -> Any:
    return curtailment_activate(event=c.event, actor=SCHEDULER, counts={T.CONFIRMED: 2})


# (from, to) -> (the named service that takes the edge, the audit action it writes)
EVENT_SERVICES: dict[tuple[str, str], tuple[Callable[[Ctx], Any], str]] = {
    (E.PENDING, E.PENDING): (_update, "curtailment.updated"),
    (E.PENDING, E.ACTIVE): (_activate, "curtailment.activated"),
    (E.PENDING, E.RESTORING): (_stop, "curtailment.stopped"),
    (E.PENDING, E.COMPLETED_WITH_FAILURES): (_complete(E.COMPLETED_WITH_FAILURES), "curtailment.completed"),
    (E.PENDING, E.CANCELLED): (_terminate(E.CANCELLED), "curtailment.admin_terminated"),
    (E.PENDING, E.FAILED): (_terminate(E.FAILED), "curtailment.admin_terminated"),
    (E.ACTIVE, E.ACTIVE): (_update, "curtailment.updated"),
    (E.ACTIVE, E.RESTORING): (_stop, "curtailment.stopped"),
    (E.RESTORING, E.COMPLETED): (_complete(E.COMPLETED), "curtailment.completed"),
    (E.RESTORING, E.COMPLETED_WITH_FAILURES): (
        _complete(E.COMPLETED_WITH_FAILURES),
        "curtailment.completed",
    ),
    (E.RESTORING, E.CANCELLED): (_terminate(E.CANCELLED), "curtailment.admin_terminated"),
    (E.RESTORING, E.FAILED): (_terminate(E.FAILED), "curtailment.admin_terminated"),
}


def test_every_event_edge_has_a_named_service():
    assert set(EVENT_SERVICES) == edge_keys(EVENT_MACHINE)


@pytest.mark.parametrize(("source", "target"), pair_params(EVENT_MACHINE))
def test_each_event_pair_is_taken_by_its_service_or_refused_without_a_write(ctx, source, target):
    event = set_state(
        ctx.event, EVENT_MACHINE, source, started_at=clock.now() if source == E.ACTIVE else None
    )
    if not EVENT_MACHINE.can(source, target):
        assert_refused_without_write(event, machine=EVENT_MACHINE, to=target, actor=ctx.admin, org=event.org)
        return
    service, action = EVENT_SERVICES[(source, target)]
    service(ctx)
    event.refresh_from_db()
    assert event.state == target
    audit = AuditEvent.objects.get(action=action, target_id=str(event.pk))
    if source != target:
        assert audit.changes["state"] == [source, target]
    else:
        assert "state" not in audit.changes and audit.changes


# --- the target machine -----------------------------------------------------------------------------


def _fail(state: str) -> Callable[[Ctx], set[int]]:
    return lambda c: target_fail(c.phase, [c.target], message="gateway said no", fail_state=state)


def _reading(c: Ctx, power: float) -> list[Any]:
    return [(c.target, power, clock.now())]


def _stop_targets(c: Ctx) -> set[int]:
    """The stop's reset: the targets now waiting in the restore phase."""
    curtailment_stop(event=c.event, actor=c.operator, reason="price dropped")
    restore = CurtailmentTarget.objects.filter(event=c.event, desired_state=DesiredState.ACTIVE)
    return set(restore.values_list("pk", flat=True))


def _sweep(state: str) -> Callable[[Ctx], set[int]]:
    """The terminate's sweep: the targets it moved to `state`."""

    def sweep(c: Ctx) -> set[int]:
        curtailment_terminate(event=c.event, actor=c.admin, target_state=E.CANCELLED, reason="gateway gone")
        swept = CurtailmentTarget.objects.filter(event=c.event, state=state)
        return set(swept.values_list("pk", flat=True))

    return sweep


CURT, REST = DesiredState.CURTAILED, DesiredState.ACTIVE
# (from, to) -> (event state, target phase, target fields, the named move)
TARGET_SERVICES: dict[tuple[str, str], tuple[str, str, dict[str, Any], Callable[[Ctx], set[int]]]] = {
    (T.PENDING, T.PENDING): (E.PENDING, CURT, {}, _stop_targets),
    (T.PENDING, T.DISPATCHING): (
        E.PENDING,
        CURT,
        {},
        lambda c: target_mark_dispatching(c.phase, [(c.target, "cmd-1")]),
    ),
    (T.PENDING, T.RESTORE_FAILED): (E.PENDING, CURT, {"dispatch_attempt": 1}, _sweep(T.RESTORE_FAILED)),
    (T.PENDING, T.CANCELLED): (E.PENDING, CURT, {}, _sweep(T.CANCELLED)),
    (T.DISPATCHING, T.DISPATCHING): (
        E.PENDING,
        CURT,
        {"dispatch_attempt": 1, "last_command_id": "cmd-0"},
        lambda c: target_mark_dispatching(c.phase, [(c.target, c.target.last_command_id)]),
    ),
    (T.DISPATCHING, T.DISPATCHED): (
        E.PENDING,
        CURT,
        {"dispatch_attempt": 1, "last_command_id": "cmd-0"},
        lambda c: target_mark_dispatched(c.phase, [(c.target, "batch-1")], now=clock.now()),
    ),
    (T.DISPATCHING, T.PENDING): (E.PENDING, CURT, {}, _fail(T.PENDING)),
    (T.DISPATCHING, T.DRIFTED): (E.ACTIVE, CURT, {}, _fail(T.DRIFTED)),
    (T.DISPATCHING, T.RESTORE_FAILED): (E.RESTORING, REST, {"retry_count": 2}, _fail(T.PENDING)),
    (T.DISPATCHED, T.CONFIRMED): (
        E.PENDING,
        CURT,
        {},
        lambda c: target_confirm(c.phase, _reading(c, 40.0), now=clock.now()),
    ),
    (T.DISPATCHED, T.RESOLVED): (
        E.RESTORING,
        REST,
        {},
        lambda c: target_resolve(c.phase, _reading(c, 3000.0), now=clock.now()),
    ),
    (T.DISPATCHED, T.PENDING): (E.PENDING, CURT, {}, _fail(T.PENDING)),
    (T.DISPATCHED, T.RESTORE_FAILED): (E.PENDING, CURT, {"retry_count": 2}, _fail(T.PENDING)),
    (T.CONFIRMED, T.CONFIRMED): (E.ACTIVE, CURT, {}, lambda c: target_observe(c.phase, _reading(c, 40.0))),
    (T.CONFIRMED, T.DRIFTED): (
        E.ACTIVE,
        CURT,
        {},
        lambda c: target_mark_drifted(c.phase, _reading(c, 3000.0)),
    ),
    (T.CONFIRMED, T.PENDING): (E.ACTIVE, CURT, {}, _stop_targets),
    (T.DRIFTED, T.DISPATCHING): (
        E.ACTIVE,
        CURT,
        {"retry_count": 1},
        lambda c: target_mark_dispatching(c.phase, [(c.target, "cmd-2")]),
    ),
    (T.DRIFTED, T.PENDING): (E.ACTIVE, CURT, {}, _stop_targets),
    (T.DRIFTED, T.RESTORE_FAILED): (E.ACTIVE, CURT, {"retry_count": 2}, _fail(T.DRIFTED)),
}


def test_every_target_edge_has_a_named_move():
    assert set(TARGET_SERVICES) == edge_keys(TARGET_MACHINE)


@pytest.mark.parametrize(("source", "target"), pair_params(TARGET_MACHINE))
def test_each_target_pair_is_taken_by_its_move_or_refused_without_a_write(ctx, source, target):
    if not TARGET_MACHINE.can(source, target):
        row = set_state(ctx.target, TARGET_MACHINE, source)
        assert_refused_without_write(
            row, machine=TARGET_MACHINE, to=target, actor=ctx.admin, org=ctx.event.org
        )
        # The set-based path admits only the machine's edges too.
        before = CurtailmentTarget.objects.filter(pk=row.pk).values().get()
        illegal_moved = transition_rows(
            model=CurtailmentTarget,
            machine=TARGET_MACHINE,
            rows=[{"pk": row.pk, "to": target}],
            operation="test.illegal",
        )
        assert illegal_moved == []
        assert CurtailmentTarget.objects.filter(pk=row.pk).values().get() == before
        return
    event_state, desired, fields, move = TARGET_SERVICES[(source, target)]
    set_state(ctx.event, EVENT_MACHINE, event_state, started_at=clock.now())
    set_state(ctx.target, TARGET_MACHINE, source, desired_state=desired, **fields)
    moved = move(ctx)
    ctx.target.refresh_from_db()
    assert ctx.target.pk in moved
    assert ctx.target.state == target


def test_a_target_move_finds_nothing_once_the_event_moved(ctx):
    stale = Phase(event_id=ctx.event.pk, event_state=ctx.event.state, desired=DesiredState.CURTAILED)
    set_state(ctx.event, EVENT_MACHINE, E.CANCELLED)
    assert target_mark_dispatching(stale, [(ctx.target, "cmd-1")]) == set()
    ctx.target.refresh_from_db()
    assert (ctx.target.state, ctx.target.dispatch_attempt) == (T.PENDING, 0)


def test_a_target_move_finds_nothing_in_the_other_phase(ctx):
    restore = Phase(event_id=ctx.event.pk, event_state=ctx.event.state, desired=DesiredState.ACTIVE)
    assert target_mark_dispatching(restore, [(ctx.target, "cmd-1")]) == set()
    assert CurtailmentTarget.objects.get(pk=ctx.target.pk).state == T.PENDING


def test_counters_are_compared_and_set(ctx):
    set_state(ctx.target, TARGET_MACHINE, T.DISPATCHING, dispatch_attempt=2, last_command_id="cmd-2")
    stale = CurtailmentTarget.objects.get(pk=ctx.target.pk)
    stale.dispatch_attempt = 1  # the command that went out was built from another attempt
    assert target_mark_dispatched(ctx.phase, [(stale, "batch-1")], now=clock.now()) == set()
    stale.retry_count = 1  # the verdict was computed from a retry count the row no longer holds
    assert target_fail(ctx.phase, [stale], message="x", fail_state=T.PENDING) == set()
    row = CurtailmentTarget.objects.get(pk=ctx.target.pk)
    assert (row.state, row.retry_count, row.last_batch_id) == (T.DISPATCHING, 0, "")

    set_state(ctx.target, TARGET_MACHINE, T.PENDING, dispatch_attempt=2)
    assert target_mark_dispatching(ctx.phase, [(ctx.target, "cmd-3")]) == {ctx.target.pk}
    row = CurtailmentTarget.objects.get(pk=ctx.target.pk)
    assert (row.state, row.dispatch_attempt, row.last_command_id) == (T.DISPATCHING, 3, "cmd-3")
    assert (ctx.target.state, ctx.target.dispatch_attempt) == (T.DISPATCHING, 3)  # advanced in memory
