"""Publish events to an organization's subscribed channels, and send the stored deliveries.

`notification_publish` runs inside the caller's transaction: the delivery rows and one outbox
message per delivery (`fleetops.outbox`, the send task by name) commit (or roll back) with the change
they report; the message is sent to the broker after commit, or by the outbox relay later. A send
claims its delivery with a conditional UPDATE first, so a redelivered task or two sweeps never send
one delivery twice at the same time; the network call runs outside any transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction

from fleetops.access.models import Organization, Role
from fleetops.access.roles import require_role
from fleetops.audit.actors import Actor
from fleetops.audit.services import changes_between, record, snapshot
from fleetops.lib import clock
from fleetops.lib.backoff import backoff_delay
from fleetops.lib.errors import ValidationFailed
from fleetops.lib.transition import transition_rows
from fleetops.notifications.metrics import DELIVERIES
from fleetops.notifications.models import (
    DELIVERY_MACHINE,
    ChannelKind,
    DeliveryStatus,
    NotificationChannel,
    NotificationDelivery,
    NotificationSubscription,
)
from fleetops.outbox.services import outbox_enqueue

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-FleetOps-Signature"
EVENT_HEADER = "X-FleetOps-Event"
DELIVERY_HEADER = "X-FleetOps-Delivery"
TARGET_INVALID_WEBHOOK = "a webhook target must be an http:// or https:// URL"
TARGET_INVALID_EMAIL = "an email target must be an email address"
KIND_INVALID = "kind must be one of: " + ", ".join(ChannelKind.values)
ADMIN_REQUIRED = "Managing notification channels needs the admin role in the organization."
RETRY_BASE_SECONDS = 60.0
RETRY_CAP_SECONDS = 3600.0
# How long a claimed send holds its delivery: a worker that died mid-send releases it after this.
SEND_LEASE_SECONDS = 120


def notification_publish(
    *,
    org: Organization,
    event_type: str,
    subject: str,
    body: str = "",
    payload: Mapping[str, Any] | None = None,
) -> list[int]:
    """Store one pending delivery per enabled channel of `org` subscribed to `event_type`, each
    with an outbox message for its send, in the caller's transaction (or one of its own). Returns
    the delivery ids."""
    channels = list(
        NotificationChannel.objects.filter(
            org=org, enabled=True, subscriptions__event_type=event_type
        ).distinct()
    )
    if not channels:
        return []
    now = clock.now()
    with transaction.atomic(savepoint=False):
        created = NotificationDelivery.objects.bulk_create(
            [
                NotificationDelivery(
                    org=org,
                    channel=channel,
                    event_type=event_type,
                    subject=subject[:200],
                    body=body,
                    payload=json.loads(json.dumps(dict(payload or {}), default=str)),
                    created_at=now,
                    next_attempt_at=now,
                )
                for channel in channels
            ]
        )
        ids = [d.pk for d in created]
        # The send, by task name; a message sent twice is harmless (the send claims its delivery).
        for delivery_id in ids:
            outbox_enqueue(task=DELIVER_TASK, kwargs={"delivery_id": delivery_id})
    return ids


DELIVER_TASK = "fleetops.notifications.tasks.deliver"


@dataclass(frozen=True)
class SendOutcome:
    ok: bool
    error: str = ""
    response_status: int | None = None


def _webhook_body(delivery: NotificationDelivery) -> bytes:
    return json.dumps(
        {
            "delivery_id": delivery.pk,
            "event_type": delivery.event_type,
            "organization": delivery.org.slug,
            "subject": delivery.subject,
            "body": delivery.body,
            "payload": delivery.payload,
            "created_at": delivery.created_at.isoformat(),
        },
        sort_keys=True,
    ).encode()


def webhook_signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _send(delivery: NotificationDelivery) -> SendOutcome:
    channel = delivery.channel
    if channel.kind == ChannelKind.WEBHOOK:
        body = _webhook_body(delivery)
        headers = {
            "Content-Type": "application/json",
            EVENT_HEADER: delivery.event_type,
            DELIVERY_HEADER: str(delivery.pk),
        }
        if channel.secret:
            headers[SIGNATURE_HEADER] = webhook_signature(channel.secret, body)
        try:
            response = httpx.post(
                channel.target,
                content=body,
                headers=headers,
                timeout=settings.FLEETOPS_NOTIFICATION_TIMEOUT_SECONDS,
            )
        except httpx.HTTPError as exc:
            return SendOutcome(ok=False, error=f"{exc.__class__.__name__}: {exc}")
        if 200 <= response.status_code < 300:
            return SendOutcome(ok=True, response_status=response.status_code)
        return SendOutcome(
            ok=False,
            error=f"HTTP {response.status_code}: {response.text[:300]}",
            response_status=response.status_code,
        )
    try:
        send_mail(
            subject=delivery.subject,
            message=delivery.body or delivery.subject,
            from_email=settings.DEFAULT_FROM_EMAIL,
            recipient_list=[channel.target],
        )
    except Exception as exc:  # SMTP errors come in many classes; every one is a failed send
        return SendOutcome(ok=False, error=f"{exc.__class__.__name__}: {exc}")
    return SendOutcome(ok=True)


def delivery_send(*, delivery_id: int) -> str | None:
    """Send one due pending delivery. Returns its new status, or None when it was not ours to send
    (already sent, not due, or claimed by another worker)."""
    now = clock.now()
    seen = (
        NotificationDelivery.objects.filter(pk=delivery_id, next_attempt_at__lte=now)
        .values("status", "attempts")
        .first()
    )
    if seen is None or seen["status"] not in DELIVERY_MACHINE.allowed_from(DeliveryStatus.SENT):
        return None
    # 1. Claim: pending -> pending on the attempt counter we read (a concurrent claim moved it), count
    #    the attempt and push next_attempt_at out by the lease, in one UPDATE.
    claimed = transition_rows(
        model=NotificationDelivery,
        machine=DELIVERY_MACHINE,
        rows=[{"pk": delivery_id, "attempts": seen["attempts"]}],
        to=DeliveryStatus.PENDING,
        match=("attempts",),
        increments={"attempts": 1},
        updates={"last_attempt_at": now, "next_attempt_at": now + timedelta(seconds=SEND_LEASE_SECONDS)},
        operation="notifications_delivery_claim",
    )
    if not claimed:
        return None
    delivery = NotificationDelivery.objects.select_related("channel", "org").get(pk=delivery_id)
    # 2. Send, outside any transaction.
    outcome = _send(delivery)
    # 3. Record, conditional on the claim still being ours (same attempt number).
    kind = delivery.channel.kind
    if outcome.ok:
        status = DeliveryStatus.SENT
        updates: dict[str, Any] = {
            "sent_at": clock.now(),
            "error": "",
            "response_status": outcome.response_status,
        }
    elif delivery.attempts >= settings.FLEETOPS_NOTIFICATION_MAX_ATTEMPTS:
        status = DeliveryStatus.ERROR
        updates = {"error": outcome.error[:2000], "response_status": outcome.response_status}
    else:
        status = DeliveryStatus.PENDING
        delay = backoff_delay(delivery.attempts, base=RETRY_BASE_SECONDS, cap=RETRY_CAP_SECONDS, jitter=False)
        updates = {
            "error": outcome.error[:2000],
            "response_status": outcome.response_status,
            "next_attempt_at": clock.now() + timedelta(seconds=delay),
        }
    recorded = transition_rows(
        model=NotificationDelivery,
        machine=DELIVERY_MACHINE,
        rows=[{"pk": delivery_id, "attempts": delivery.attempts}],
        to=status,
        match=("attempts",),
        updates=updates,
        operation="notifications_delivery_record",
    )
    if not recorded:
        # Our lease expired mid-send and another worker re-claimed (or finished) the delivery: its
        # outcome is the one that counts (the kernel counted the lost race).
        log.warning("notification delivery claim lost before recording", extra={"delivery": delivery_id})
        return None
    outcome_label = {DeliveryStatus.SENT: "sent", DeliveryStatus.ERROR: "error"}.get(status, "retry")
    DELIVERIES.labels(kind=kind, outcome=outcome_label).inc()
    if status == DeliveryStatus.ERROR:
        log.warning(
            "notification delivery failed for good", extra={"delivery": delivery_id, "error": outcome.error}
        )
    return status


def deliveries_send_pending(*, limit: int = 200) -> int:
    """Send every due pending delivery (lost kicks, retries after backoff). Returns how many sent."""
    ids = list(
        NotificationDelivery.objects.filter(status=DeliveryStatus.PENDING, next_attempt_at__lte=clock.now())
        .order_by("next_attempt_at")
        .values_list("pk", flat=True)[:limit]
    )
    return sum(1 for delivery_id in ids if delivery_send(delivery_id=delivery_id) == DeliveryStatus.SENT)


CHANNEL_FIELDS = ("name", "kind", "target", "enabled", "secret")


def _validate_target(kind: str, target: str) -> None:
    if kind == ChannelKind.WEBHOOK and not target.startswith(("http://", "https://")):
        raise ValidationFailed(TARGET_INVALID_WEBHOOK, fields={"target": [TARGET_INVALID_WEBHOOK]})
    if kind == ChannelKind.EMAIL and ("@" not in target or " " in target.strip()):
        raise ValidationFailed(TARGET_INVALID_EMAIL, fields={"target": [TARGET_INVALID_EMAIL]})


def notification_channel_save(
    *,
    org: Organization,
    actor: Actor,
    channel: NotificationChannel | None,
    values: Mapping[str, Any],
    event_types: list[str] | None = None,
) -> NotificationChannel:
    """Create or change a channel (and, when given, its subscriptions); admin only; one audit row.
    The secret is never written to the audit log, only whether it changed."""
    require_role(
        actor=actor,
        org=org,
        role=Role.ADMIN,
        what="notifications.channel_save",
        message=ADMIN_REQUIRED,
        target=channel,
        asked={"fields": sorted(values)},
    )
    unknown = set(values) - set(CHANNEL_FIELDS)
    if unknown:
        raise ValidationFailed(f"unknown fields {sorted(unknown)}")
    with transaction.atomic():
        if channel is None:
            channel = NotificationChannel(org=org)
            before: dict[str, Any] = {}
            subscribed_before: list[str] = []
        else:
            channel = NotificationChannel.objects.select_for_update().get(pk=channel.pk, org=org)
            before = snapshot(channel, CHANNEL_FIELDS)
            subscribed_before = sorted(channel.subscriptions.values_list("event_type", flat=True))
        for key, value in values.items():
            setattr(channel, key, value)
        if channel.kind not in ChannelKind.values:
            raise ValidationFailed(KIND_INVALID, fields={"kind": [KIND_INVALID]})
        _validate_target(channel.kind, channel.target)
        channel.save()
        subscribed_after = subscribed_before
        if event_types is not None:
            subscribed_after = sorted(set(event_types))
            channel.subscriptions.exclude(event_type__in=subscribed_after).delete()
            NotificationSubscription.objects.bulk_create(
                [NotificationSubscription(channel=channel, event_type=e) for e in subscribed_after],
                ignore_conflicts=True,
            )
        after = snapshot(channel, CHANNEL_FIELDS)
        changes = changes_between(
            {**before, "subscriptions": subscribed_before}, {**after, "subscriptions": subscribed_after}
        )
        if "secret" in changes:
            changes["secret"] = ["***", "***"]
        record(
            action="notifications.channel_saved" if before else "notifications.channel_created",
            actor=actor,
            org=org,
            target=channel,
            changes=changes,
        )
    return channel
