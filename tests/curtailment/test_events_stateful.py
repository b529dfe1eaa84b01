"""A Hypothesis state machine drives random curtailment calls (start, stop, force stop, update,
terminate, refused callers, reconciler ticks against a fake gateway that may fail, and an operator
acting on a separate connection while a tick runs) and checks after every step that each event and
target is in a state of its machine, that each event's audit trail replays to its state, and that
a finished event holds no device."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from curtailment.models import (
    EVENT_MACHINE,
    TARGET_MACHINE,
    TARGET_NON_TERMINAL,
    TERMINATE_STATES,
    CurtailmentEvent,
    CurtailmentTarget,
    Device,
    EventState,
    OrgCurtailmentConfig,
)
from curtailment.planning import StartRequest
from curtailment.reconciler import reconcile_tick
from curtailment.services import (
    curtailment_start,
    curtailment_stop,
    curtailment_terminate,
    curtailment_update,
)
from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.lib.errors import Conflict, Forbidden, ValidationFailed
from tests.curtailment.conftest import make_fleet
from tests.curtailment.fakes import FakeGateway
from tests.transitions import assert_trail_replays

DEVICES = 6
SOME_EVENT = st.integers(0, 3)


def on_another_connection(work: Callable[[], Any], errors: list[BaseException]) -> threading.Thread:
    """Run `work` in a thread: Django gives it its own database connection, closed at the end."""

    def run() -> None:
        try:
            work()
        except Conflict:
            pass  # a state conflict or a lost race: refused, nothing written
        except BaseException as exc:  # re-raised by the test thread
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.django_db(transaction=True)
def test_events_stay_legal_and_every_trail_replays(operator, admin_member, viewer):
    org = operator.org
    OrgCurtailmentConfig.objects.create(org=org, post_event_cooldown_sec=0, curtail_confirm_timeout_sec=60)
    gateway = FakeGateway(d.identifier for d in make_fleet(org, DEVICES))
    person, admin, onlooker = (Actor.for_user(m.user) for m in (operator, admin_member, viewer))

    def tick() -> None:
        result = reconcile_tick(gateway_for=gateway.factory())
        assert result.ran and result.failures == 0

    class EventLifecycle(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            CurtailmentEvent.objects.all().delete()  # the previous example's events and targets
            gateway.reset()
            Device.objects.filter(org=org).update(
                last_power_w=3000.0, last_hash_rate_hs=1e14, last_sample_at=clock.now()
            )
            self.events: list[int] = []

        def event(self, i: int) -> CurtailmentEvent | None:
            if not self.events:
                return None
            return CurtailmentEvent.objects.select_related("org").get(pk=self.events[i % len(self.events)])

        def stop(self, i: int, *, force: bool = False) -> None:
            if (event := self.event(i)) is not None:
                curtailment_stop(event=event, actor=admin if force else person, force=force, reason="enough")

        def terminate(self, i: int, state: str) -> None:
            if (event := self.event(i)) is not None:
                curtailment_terminate(event=event, actor=admin, target_state=state, reason="stuck")

        def update(self, i: int, size: int) -> None:
            if (event := self.event(i)) is not None:
                patch = {"restore_batch_size": size, "restore_batch_interval_sec": 0}
                curtailment_update(event=event, actor=person, patch=patch)

        @rule(kw=st.sampled_from([3.0, 6.0, 9.0]), bounded=st.booleans(), hold=st.booleans())
        def start(self, kw: float, bounded: bool, hold: bool) -> None:
            req = StartRequest(
                target_kw=kw,
                reason="grid request",
                max_duration_seconds=90 if bounded else 0,
                min_curtailed_duration_sec=45 if hold else 0,
            )
            try:
                result = curtailment_start(org=org, actor=person, req=req)
            except (ValidationFailed, Conflict):
                return  # not enough free devices: refused, nothing written
            if result.created:
                self.events.append(result.event.pk)

        @rule(i=SOME_EVENT, force=st.booleans())
        def stop_one(self, i: int, force: bool) -> None:
            try:
                self.stop(i, force=force)
            except Conflict:
                pass  # terminal, or the minimum duration holds it

        @rule(i=SOME_EVENT, size=st.integers(0, 20))
        def update_one(self, i: int, size: int) -> None:
            try:
                self.update(i, size)
            except Conflict:
                pass  # restoring or finished

        @rule(i=SOME_EVENT, state=st.sampled_from(TERMINATE_STATES))
        def terminate_one(self, i: int, state: str) -> None:
            try:
                self.terminate(i, state)
            except Conflict:
                pass  # active or in flight: stop first; or already finished

        @rule(i=SOME_EVENT)
        def a_viewer_is_refused(self, i: int) -> None:
            if (event := self.event(i)) is None:
                return
            before = AuditEvent.objects.filter(action="access.denied").count()
            with pytest.raises(Forbidden):
                curtailment_stop(event=event, actor=onlooker, reason="x")
            assert AuditEvent.objects.filter(action="access.denied").count() == before + 1

        @rule(failing=st.booleans())
        def gateway_mood(self, failing: bool) -> None:
            gateway.failing = failing

        @rule(seconds=st.sampled_from([5, 31, 61]))
        def reconciler_tick(self, seconds: int) -> None:
            clock.advance(timedelta(seconds=seconds))
            tick()

        @rule(i=SOME_EVENT, what=st.sampled_from(["stop", "terminate", "update"]))
        def operator_acts_while_the_reconciler_ticks(self, i: int, what: str) -> None:
            work = {
                "stop": lambda: self.stop(i),
                "terminate": lambda: self.terminate(i, EventState.CANCELLED),
                "update": lambda: self.update(i, 3),
            }[what]
            errors: list[BaseException] = []
            clock.advance(timedelta(seconds=31))
            thread = on_another_connection(work, errors)
            tick()
            thread.join(30)
            assert not thread.is_alive() and not errors, errors

        @invariant()
        def states_are_legal_and_trails_replay(self) -> None:
            for event in CurtailmentEvent.objects.filter(pk__in=self.events):
                assert event.state in EVENT_MACHINE.states
                assert_trail_replays(event, EVENT_MACHINE)
                targets = CurtailmentTarget.objects.filter(event=event)
                assert set(targets.values_list("state", flat=True)) <= set(TARGET_MACHINE.states)
                if EVENT_MACHINE.is_terminal(event.state):
                    assert not targets.filter(state__in=TARGET_NON_TERMINAL).exists(), event
                if event.state == EventState.ACTIVE:
                    assert event.started_at is not None

    with clock.frozen(clock.now()):
        run_state_machine_as_test(
            EventLifecycle,
            settings=settings(
                max_examples=25,
                stateful_step_count=15,
                deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
            ),
        )
