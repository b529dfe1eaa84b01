"""The outbox message machine, generated: every legal edge taken by the sender that owns it, every
other pair refused by the kernel without a write; no edge writes an audit row."""

from __future__ import annotations

from datetime import timedelta
from unittest import mock

import pytest
from django.db import transaction
from kombu.exceptions import OperationalError

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.celery import app
from fleetops.lib import clock
from fleetops.lib.machine import machines
from fleetops.outbox.models import OUTBOX_MACHINE, OutboxMessage, OutboxStatus
from fleetops.outbox.services import outbox_enqueue, outbox_relay
from tests.transitions import assert_refused_without_write, edge_keys, pair_params

S = OutboxStatus
TASK = "tests.outbox.machine"


def _enqueue(capture, *, broker_error: Exception | None = None) -> OutboxMessage:
    with (
        mock.patch.object(app, "send_task", side_effect=broker_error),
        capture(execute=True),
        transaction.atomic(),
    ):
        message = outbox_enqueue(task=TASK, kwargs={"x": 1})
    message.refresh_from_db()
    return message


def _retry_later(capture) -> OutboxMessage:
    """pending -> pending: the send after commit is refused (a relay's claim takes the same edge)."""
    message = _enqueue(capture, broker_error=OperationalError("connection refused"))
    assert message.attempts == 1 and message.last_error
    return message


def _sent(capture) -> OutboxMessage:
    """pending -> sent: the broker takes the send after commit."""
    message = _enqueue(capture)
    assert message.sent_at is not None
    return message


def _relayed(capture) -> OutboxMessage:
    """pending -> pending (claim) -> sent by the relay."""
    message = _retry_later(capture)
    with clock.frozen(clock.now() + timedelta(minutes=5)), mock.patch.object(app, "send_task"):
        assert outbox_relay().sent == 1
    message.refresh_from_db()
    return message


SERVICES = {(S.PENDING, S.PENDING): _retry_later, (S.PENDING, S.SENT): _sent}
ARRANGE = {S.PENDING: _retry_later, S.SENT: _relayed}


def test_the_machine_is_declared_and_every_edge_has_a_named_sender():
    assert OUTBOX_MACHINE in machines()
    assert set(SERVICES) == edge_keys(OUTBOX_MACHINE)
    assert all(edge.engine_only for edge in OUTBOX_MACHINE.edges)
    assert OUTBOX_MACHINE.terminal == {S.SENT}


@pytest.mark.django_db
@pytest.mark.parametrize(("source", "target"), pair_params(OUTBOX_MACHINE))
def test_each_pair_is_taken_by_its_sender_or_refused_without_a_write(
    source, target, django_capture_on_commit_callbacks
):
    audit_before = AuditEvent.objects.count()
    if OUTBOX_MACHINE.can(source, target):
        message = SERVICES[(source, target)](django_capture_on_commit_callbacks)
        assert message.status == target
        assert AuditEvent.objects.count() == audit_before  # the request audited itself
        return
    message = ARRANGE[source](django_capture_on_commit_callbacks)
    assert message.status == source
    assert_refused_without_write(
        message, machine=OUTBOX_MACHINE, to=target, actor=Actor.scheduler("test"), org=None
    )


@pytest.mark.django_db
def test_a_sent_message_is_never_claimed_or_sent_again(django_capture_on_commit_callbacks):
    message = _relayed(django_capture_on_commit_callbacks)
    OutboxMessage.objects.filter(pk=message.pk).update(available_at=clock.now() - timedelta(days=1))
    with clock.frozen(clock.now() + timedelta(days=1)), mock.patch.object(app, "send_task") as send:
        assert outbox_relay().claimed == 0
    assert not send.called
    message.refresh_from_db()
    assert message.status == S.SENT and message.attempts == 2
