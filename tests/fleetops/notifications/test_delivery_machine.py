"""The delivery machine, generated: every legal edge through the sender, every other pair refused;
and a stateful run of publish/send/sweep calls, some racing on another connection."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.test import override_settings
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fleetops.audit.actors import Actor
from fleetops.lib import clock
from fleetops.notifications.models import DELIVERY_MACHINE, DeliveryStatus, NotificationDelivery
from fleetops.notifications.services import deliveries_send_pending, delivery_send, notification_publish
from tests.fleetops.notifications.test_notifications import channel
from tests.migrations_app.keys_fixtures import Receiver
from tests.transitions import assert_refused_without_write, edge_keys, pair_params

S = DeliveryStatus


def _publish(member) -> NotificationDelivery:
    [delivery_id] = notification_publish(org=member.org, event_type="e.failed", subject="s")
    return NotificationDelivery.objects.get(pk=delivery_id)


def _retry(member, receivers):
    channel(member, target=receivers[500].url)
    delivery = _publish(member)
    with override_settings(FLEETOPS_NOTIFICATION_MAX_ATTEMPTS=3):
        assert delivery_send(delivery_id=delivery.pk) == S.PENDING
    return delivery


def _sent(member, receivers):
    channel(member, target=receivers[200].url)
    delivery = _publish(member)
    assert delivery_send(delivery_id=delivery.pk) == S.SENT
    return delivery


def _error(member, receivers):
    channel(member, target=receivers[500].url)
    delivery = _publish(member)
    with override_settings(FLEETOPS_NOTIFICATION_MAX_ATTEMPTS=1):
        assert delivery_send(delivery_id=delivery.pk) == S.ERROR
    return delivery


# Each edge of the machine and the named service that takes it.
SERVICES = {(S.PENDING, S.PENDING): _retry, (S.PENDING, S.SENT): _sent, (S.PENDING, S.ERROR): _error}


@pytest.fixture
def receivers():
    running = {200: Receiver(200), 500: Receiver(500)}
    yield running
    for r in running.values():
        r.close()


def test_every_edge_of_the_delivery_machine_has_a_named_service():
    assert set(SERVICES) == edge_keys(DELIVERY_MACHINE)


@pytest.mark.django_db
@pytest.mark.parametrize(("source", "target"), pair_params(DELIVERY_MACHINE))
def test_each_pair_is_taken_by_its_service_or_refused_without_a_write(
    source, target, admin_member, receivers
):
    if DELIVERY_MACHINE.can(source, target):
        delivery = SERVICES[(source, target)](admin_member, receivers)
        delivery.refresh_from_db()
        assert delivery.status == target
        return
    delivery = {S.PENDING: _retry, S.SENT: _sent, S.ERROR: _error}[source](admin_member, receivers)
    delivery.refresh_from_db()
    assert_refused_without_write(
        delivery, machine=DELIVERY_MACHINE, to=target, actor=Actor.scheduler("t"), org=admin_member.org
    )


@pytest.mark.django_db(transaction=True)
def test_random_sends_and_sweeps_never_send_twice_or_leave_the_machine(admin_member, receivers):
    ok, failing = receivers[200], receivers[500]
    channel(admin_member, target=ok.url, events=("e.ok",))
    channel(admin_member, target=failing.url, events=("e.bad",))

    class Deliveries(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.ids: list[int] = []

        @rule(good=st.booleans())
        def publish(self, good: bool) -> None:
            event = "e.ok" if good else "e.bad"
            self.ids += notification_publish(org=admin_member.org, event_type=event, subject="s")

        @rule(data=st.data())
        def send(self, data: st.DataObject) -> None:
            if self.ids:
                with override_settings(FLEETOPS_NOTIFICATION_MAX_ATTEMPTS=2):
                    delivery_send(delivery_id=data.draw(st.sampled_from(self.ids)))

        @rule(data=st.data())
        def race_two_senders(self, data: st.DataObject) -> None:
            if not self.ids:
                return
            target = data.draw(st.sampled_from(self.ids))

            errors: list[BaseException] = []

            def other() -> None:
                try:
                    delivery_send(delivery_id=target)
                except BaseException as exc:  # surfaced below: a crash in the racer fails the test
                    errors.append(exc)
                finally:
                    connection.close()

            thread = threading.Thread(target=other)
            thread.start()
            delivery_send(delivery_id=target)
            thread.join(timeout=30)
            assert not thread.is_alive()
            assert errors == []

        @rule()
        def time_passes_and_the_sweep_runs(self) -> None:
            clock.advance(timedelta(hours=2))
            with override_settings(FLEETOPS_NOTIFICATION_MAX_ATTEMPTS=2):
                deliveries_send_pending()

        @invariant()
        def every_delivery_is_in_a_machine_state_and_sent_at_most_once(self) -> None:
            mine = set(self.ids)
            rows = list(
                NotificationDelivery.objects.filter(pk__in=mine).values_list("pk", "status", "attempts")
            )
            assert all(status in DELIVERY_MACHINE.states for _, status, _ in rows)
            assert all(attempts <= 2 for _, _, attempts in rows)
            posted = [r["json"]["delivery_id"] for r in ok.requests if r["json"]["delivery_id"] in mine]
            assert len(posted) == len(set(posted))  # never sent twice
            sent = {pk for pk, status, _ in rows if status == S.SENT}
            assert sent == set(posted)  # marked sent exactly when it was posted

    Deliveries.TestCase.settings = settings(
        max_examples=8,
        stateful_step_count=10,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    with clock.frozen(clock.now()):
        Deliveries.TestCase().runTest()
