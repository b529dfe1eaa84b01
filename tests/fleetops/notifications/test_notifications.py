from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta

import pytest
from django.core import mail
from django.db import transaction
from django.test import override_settings

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.lib.errors import ValidationFailed
from fleetops.notifications.models import DeliveryStatus, NotificationDelivery
from fleetops.notifications.services import (
    deliveries_send_pending,
    delivery_send,
    notification_channel_save,
    notification_publish,
)
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


def test_a_rolled_back_change_notifies_nobody(admin_member):
    channel(admin_member)
    with pytest.raises(RuntimeError), transaction.atomic():
        notification_publish(org=admin_member.org, event_type="e.failed", subject="s")
        raise RuntimeError("the change failed")
    assert not NotificationDelivery.objects.exists()


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
