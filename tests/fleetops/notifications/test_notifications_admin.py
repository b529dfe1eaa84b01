from __future__ import annotations

import pytest
from django.db.models import F
from prometheus_client import REGISTRY

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.lib.errors import Forbidden, ValidationFailed
from fleetops.notifications import services
from fleetops.notifications.metrics import DELIVERIES
from fleetops.notifications.models import DeliveryStatus, NotificationChannel, NotificationDelivery
from fleetops.notifications.registry import event_type_choices
from fleetops.notifications.services import (
    ADMIN_REQUIRED,
    KIND_INVALID,
    SendOutcome,
    delivery_send,
    notification_channel_save,
    notification_publish,
)

pytestmark = pytest.mark.django_db
SECRET = "s3cr3t-do-not-show-9f2c"
CHANGELIST = "/admin/notifications/notificationchannel/"


def make_channel(member, *, name="hook", secret=SECRET, **values):
    return notification_channel_save(
        org=member.org,
        actor=Actor.for_user(member.user),
        channel=None,
        values={
            "name": name,
            "kind": "webhook",
            "target": "http://127.0.0.1:9/x",
            "secret": secret,
            **values,
        },
        event_types=["e.failed"],
    )


def change_url(channel: NotificationChannel) -> str:
    return f"{CHANGELIST}{channel.pk}/change/"


def test_neither_a_viewer_nor_an_admin_ever_sees_the_webhook_secret(client, viewer, admin_member):
    channel = make_channel(admin_member)
    for member in (viewer, admin_member):
        client.force_login(member.user)
        page = client.get(change_url(channel))
        assert page.status_code == 200
        assert SECRET not in page.content.decode()
        listing = client.get(CHANGELIST)
        assert listing.status_code == 200 and SECRET not in listing.content.decode()
    assert 'name="new_secret"' in page.content.decode()  # the admin gets the write-only field


def _post(client, channel, **overrides):
    data = {
        "name": channel.name,
        "kind": channel.kind,
        "target": channel.target,
        "enabled": "on",
        "event_types": [event_type_choices()[0][0]],
        "new_secret": "",
        **overrides,
    }
    return client.post(change_url(channel), data)


def test_a_blank_new_secret_keeps_the_current_one_and_a_typed_one_replaces_it(client, admin_member):
    channel = make_channel(admin_member)
    client.force_login(admin_member.user)
    assert _post(client, channel, target="http://127.0.0.1:9/y").status_code == 302
    channel.refresh_from_db()
    assert (channel.target, channel.secret) == ("http://127.0.0.1:9/y", SECRET)
    assert _post(client, channel, new_secret="rotated").status_code == 302
    channel.refresh_from_db()
    assert channel.secret == "rotated"


def test_channels_cannot_be_deleted_from_the_console_only_disabled(client, admin_member):
    channel = make_channel(admin_member)
    notification_publish(org=admin_member.org, event_type="e.failed", subject="s")
    client.force_login(admin_member.user)
    assert client.post(f"{CHANGELIST}{channel.pk}/delete/", {"post": "yes"}).status_code == 403
    assert "delete_selected" not in client.get(CHANGELIST).content.decode()
    assert NotificationChannel.objects.filter(pk=channel.pk).exists()
    assert NotificationDelivery.objects.filter(channel=channel).exists()


def test_the_org_filter_names_only_the_users_organizations(client, admin_member, outsider, other_org):
    make_channel(admin_member)
    make_channel(outsider, name="theirs")
    client.force_login(admin_member.user)
    for url in (CHANGELIST, "/admin/notifications/notificationdelivery/"):
        page = client.get(url).content.decode()
        assert other_org.name not in page
        assert admin_member.org.name in page


def test_the_channel_list_runs_a_fixed_number_of_queries(client, admin_member, django_assert_max_num_queries):
    for i in range(6):
        make_channel(admin_member, name=f"c{i}")
    client.force_login(admin_member.user)
    client.get(CHANGELIST)
    with django_assert_max_num_queries(12):
        assert client.get(CHANGELIST).status_code == 200


def test_only_admins_may_save_a_channel_in_the_service_and_each_refusal_is_audited(
    operator, viewer, outsider
):
    for member in (operator, viewer, outsider):
        with pytest.raises(Forbidden, match=ADMIN_REQUIRED):
            notification_channel_save(
                org=operator.org,
                actor=Actor.for_user(member.user),
                channel=None,
                values={"name": "x", "kind": "email", "target": "a@b.c"},
            )
    assert not NotificationChannel.objects.exists()
    assert not AuditEvent.objects.filter(action__startswith="notifications.").exists()
    denied = AuditEvent.objects.filter(action="access.denied", org=operator.org).order_by("id")
    assert [d.actor_id for d in denied] == [str(m.user.pk) for m in (operator, viewer, outsider)]
    assert {d.metadata["what"] for d in denied} == {"notifications.channel_save"}
    assert [d.metadata["role"] for d in denied] == ["operator", "viewer", None]
    assert denied[0].metadata["asked"] == {"fields": ["kind", "name", "target"]}


@pytest.mark.parametrize("values", [{"kind": "sms"}, {}])
def test_an_unknown_or_missing_kind_is_a_validation_error_not_a_500(admin_member, values):
    with pytest.raises(ValidationFailed, match=KIND_INVALID):
        notification_channel_save(
            org=admin_member.org,
            actor=Actor.for_user(admin_member.user),
            channel=None,
            values={"name": "x", "target": "http://127.0.0.1:9/x", **values},
        )
    assert not NotificationChannel.objects.exists()


def _sample(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_send_whose_claim_was_lost_is_not_reported_or_counted_as_sent(admin_member, monkeypatch):
    make_channel(admin_member)
    [delivery_id] = notification_publish(org=admin_member.org, event_type="e.failed", subject="s")

    def slow_send(delivery):
        # Our lease ran out mid-send: another worker claimed the delivery (a new attempt).
        NotificationDelivery.objects.filter(pk=delivery.pk).update(attempts=F("attempts") + 1)
        return SendOutcome(ok=True, response_status=200)

    monkeypatch.setattr(services, "_send", slow_send)
    sent_before = DELIVERIES.labels(kind="webhook", outcome="sent")._value.get()
    lost_before = _sample("fleetops_platform_race_lost_total", operation="notifications_delivery_record")
    assert delivery_send(delivery_id=delivery_id) is None
    assert NotificationDelivery.objects.get(pk=delivery_id).status == DeliveryStatus.PENDING
    assert DELIVERIES.labels(kind="webhook", outcome="sent")._value.get() == sent_before
    assert (
        _sample("fleetops_platform_race_lost_total", operation="notifications_delivery_record")
        == lost_before + 1
    )


def test_a_delivery_page_draws_the_delivery_machine_at_its_status(client, admin_member):
    channel = make_channel(admin_member)
    now = clock.now()
    delivery = NotificationDelivery.objects.create(
        org=admin_member.org,
        channel=channel,
        event_type="e",
        subject="s",
        created_at=now,
        next_attempt_at=now,
    )
    client.force_login(admin_member.user)
    page = client.get(f"/admin/notifications/notificationdelivery/{delivery.pk}/change/").content.decode()
    assert 'aria-label="notifications.delivery state diagram"' in page
    assert '<g class="state current" data-state="pending">' in page
