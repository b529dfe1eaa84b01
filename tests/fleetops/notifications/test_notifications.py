from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta
from unittest import mock

import pytest
from celery import current_app
from django.core import mail
from django.db import transaction
from django.test import override_settings
from kombu.exceptions import OperationalError

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.lib.errors import ValidationFailed
from fleetops.notifications import tasks
from fleetops.notifications.models import DeliveryStatus, NotificationDelivery
from fleetops.notifications.services import (
    DELIVER_TASK,
    deliveries_send_pending,
    delivery_send,
    notification_channel_save,
    notification_publish,
)
from fleetops.outbox.models import OutboxMessage, OutboxStatus
from fleetops.outbox.services import outbox_relay
from tests.migrations_app.keys_fixtures import Receiver

pytestmark = pytest.mark.django_db


def channel(member, *, kind="webhook", target="http://127.0.0.1:9/x", events=("e.failed",), **values):
    return notification_channel_save(
        org=member.org,
        actor=Actor.for_user(member.user),
        channel=None,
        values={"name": f"{kind}-{target}", "kind": kind, "target": target, **values},
        event_types=list(events),
    )


def test_only_enabled_channels_subscribed_to_the_event_get_a_delivery(admin_member):
    wanted = channel(admin_member, target="http://127.0.0.1:9/a")
    channel(admin_member, target="http://127.0.0.1:9/b", events=("other",))
    channel(admin_member, target="http://127.0.0.1:9/c", enabled=False)
    ids = notification_publish(org=admin_member.org, event_type="e.failed", subject="s")
    assert [NotificationDelivery.objects.get(pk=i).channel_id for i in ids] == [wanted.pk]


def test_a_rolled_back_change_notifies_nobody(admin_member, django_capture_on_commit_callbacks):
    channel(admin_member)
    with (
        mock.patch.object(current_app, "send_task") as send,
        django_capture_on_commit_callbacks(execute=True),
        pytest.raises(RuntimeError),
        transaction.atomic(),
    ):
        notification_publish(org=admin_member.org, event_type="e.failed", subject="s")
        raise RuntimeError("the change failed")
    assert not NotificationDelivery.objects.exists()
    assert not OutboxMessage.objects.exists() and not send.called


def test_each_delivery_is_queued_in_the_outbox_with_the_change_and_sent_after_commit(
    admin_member, django_capture_on_commit_callbacks
):
    channel(admin_member, target="http://127.0.0.1:9/a")
    channel(admin_member, target="http://127.0.0.1:9/b")
    with (
        mock.patch.object(current_app, "send_task") as send,
        django_capture_on_commit_callbacks(execute=True) as after_commit,
    ):
        with transaction.atomic():
            ids = notification_publish(org=admin_member.org, event_type="e.failed", subject="s")
            queued = OutboxMessage.objects.filter(task=DELIVER_TASK).order_by("id")
            assert [m.kwargs for m in queued] == [{"delivery_id": i} for i in ids]
        assert not send.called  # not before the change commits
    assert len(ids) == 2 and len(after_commit) == 2
    assert [c.args[0] for c in send.call_args_list] == [DELIVER_TASK] * 2
    assert [c.kwargs["kwargs"] for c in send.call_args_list] == [{"delivery_id": i} for i in ids]
    assert set(OutboxMessage.objects.values_list("status", flat=True)) == {OutboxStatus.SENT}


def test_deliveries_published_while_the_broker_is_down_are_sent_by_the_relay(
    admin_member, receiver, django_capture_on_commit_callbacks
):
    channel(admin_member, target=receiver.url)
    refused = OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
    with (
        mock.patch.object(current_app, "send_task", side_effect=refused),
        django_capture_on_commit_callbacks(execute=True),
    ):
        [delivery_id] = notification_publish(org=admin_member.org, event_type="e.failed", subject="s")
    [message] = OutboxMessage.objects.filter(task=DELIVER_TASK)
    assert message.status == OutboxStatus.PENDING and message.last_error.startswith("OperationalError")
    back = clock.now() + timedelta(minutes=5)
    with clock.frozen(back), mock.patch.object(current_app, "send_task") as send:
        assert outbox_relay().sent == 1
    [call] = send.call_args_list
    assert call.args == (DELIVER_TASK,) and call.kwargs["kwargs"] == {"delivery_id": delivery_id}
    tasks.deliver(**call.kwargs["kwargs"])  # the worker's side
    assert NotificationDelivery.objects.get(pk=delivery_id).status == DeliveryStatus.SENT
    assert [r["json"]["delivery_id"] for r in receiver.requests] == [delivery_id]


def test_a_webhook_is_posted_with_a_signature_and_marked_sent(admin_member, receiver):
    channel(admin_member, target=receiver.url, secret="k")
    [delivery_id] = notification_publish(
        org=admin_member.org, event_type="e.failed", subject="Key failed", payload={"keys": [1]}
    )
    assert delivery_send(delivery_id=delivery_id) == DeliveryStatus.SENT
    [posted] = receiver.requests
    expected = "sha256=" + hmac.new(b"k", posted["body"], hashlib.sha256).hexdigest()
    assert posted["headers"]["X-FleetOps-Signature"] == expected
    assert posted["json"]["subject"] == "Key failed" and posted["json"]["payload"] == {"keys": [1]}
    assert delivery_send(delivery_id=delivery_id) is None  # sent once, never again


def test_a_failing_webhook_stores_the_error_retries_with_backoff_then_gives_up(admin_member):
    refusing = Receiver(status=500)
    try:
        channel(admin_member, target=refusing.url)
        [delivery_id] = notification_publish(org=admin_member.org, event_type="e.failed", subject="s")
        with override_settings(FLEETOPS_NOTIFICATION_MAX_ATTEMPTS=2), clock.frozen(clock.now()):
            assert delivery_send(delivery_id=delivery_id) == DeliveryStatus.PENDING
            delivery = NotificationDelivery.objects.get(pk=delivery_id)
            assert delivery.error.startswith("HTTP 500") and delivery.attempts == 1
            assert deliveries_send_pending() == 0  # not due yet: backing off
            clock.advance(timedelta(seconds=61))
            assert delivery_send(delivery_id=delivery_id) == DeliveryStatus.ERROR
    finally:
        refusing.close()
    assert len(refusing.requests) == 2
    assert NotificationDelivery.objects.get(pk=delivery_id).status == DeliveryStatus.ERROR


def test_email_channels_send_mail(admin_member):
    channel(admin_member, kind="email", target="ops@example.com")
    notification_publish(org=admin_member.org, event_type="e.failed", subject="Key failed", body="details")
    assert deliveries_send_pending() == 1
    assert mail.outbox[0].subject == "Key failed" and mail.outbox[0].to == ["ops@example.com"]


def test_channel_targets_are_validated_and_changes_audited_without_the_secret(admin_member):
    with pytest.raises(ValidationFailed):
        channel(admin_member, target="not-a-url")
    with pytest.raises(ValidationFailed):
        channel(admin_member, kind="email", target="nobody")
    channel(admin_member, secret="topsecret")
    audit = AuditEvent.objects.get(action="notifications.channel_created")
    assert "topsecret" not in str(audit.changes)
