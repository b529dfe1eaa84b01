"""Notification channels, subscriptions and deliveries.

Delivery states::

    pending ─(sent: 2xx / mail accepted)─> sent
       │  └─(send failed, attempts < max)─> pending (retried by the sweep after a backoff)
       └─(send failed, attempts = max)─> error

A delivery row is written in the transaction of the change it reports (so a rolled-back change
notifies nobody) and sent after commit.
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q

from fleetops.lib.machine import Machine


class ChannelKind(models.TextChoices):
    WEBHOOK = "webhook", "Webhook"
    EMAIL = "email", "Email"


class DeliveryStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    SENT = "sent", "Sent"
    ERROR = "error", "Error"


# pending ─(attempt claimed / failed, retry later)─> pending ─> sent | error (attempts exhausted).
# Every edge is the sender's (engine); deliveries are a log, so the edges write no audit row: the
# channel changes that decide where they go are audited instead.
DELIVERY_MACHINE = Machine.declare(
    "notifications.delivery",
    DeliveryStatus,
    field="status",
    initial=DeliveryStatus.PENDING,
    edges={
        DeliveryStatus.PENDING: {
            DeliveryStatus.PENDING: None,
            DeliveryStatus.SENT: None,
            DeliveryStatus.ERROR: None,
        },
    },
    terminal=(DeliveryStatus.SENT, DeliveryStatus.ERROR),
)


class NotificationChannel(models.Model):
    """Where an organization wants to hear about events: a webhook URL or an email address."""

    org = models.ForeignKey("access.Organization", on_delete=models.CASCADE, related_name="+")
    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=16, choices=ChannelKind.choices)
    target = models.CharField(max_length=500, help_text="Webhook URL (http/https) or an email address.")
    # Webhooks carry `X-FleetOps-Signature: sha256=<HMAC of the body>` when a secret is set.
    secret = models.CharField(max_length=200, blank=True, default="")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["org", "name"], name="notifchannel_name_per_org"),
            models.CheckConstraint(condition=Q(kind__in=ChannelKind.values), name="notifchannel_kind_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.kind})"


class NotificationSubscription(models.Model):
    """A channel hears the event types it is subscribed to, and only those."""

    channel = models.ForeignKey(NotificationChannel, on_delete=models.CASCADE, related_name="subscriptions")
    event_type = models.CharField(max_length=80)

    class Meta:
        ordering = ["event_type"]
        constraints = [
            models.UniqueConstraint(fields=["channel", "event_type"], name="notifsub_once_per_channel"),
        ]

    def __str__(self) -> str:
        return self.event_type


class NotificationDelivery(models.Model):
    """One event sent (or to be sent) to one channel, with its outcome."""

    org = models.ForeignKey("access.Organization", on_delete=models.CASCADE, related_name="+")
    channel = models.ForeignKey(NotificationChannel, on_delete=models.CASCADE, related_name="deliveries")
    event_type = models.CharField(max_length=80)
    subject = models.CharField(max_length=200)
    body = models.TextField(blank=True, default="")
    payload = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=8, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    error = models.TextField(blank=True, default="")
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    created_at = models.DateTimeField()
    next_attempt_at = models.DateTimeField()
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        verbose_name_plural = "notification deliveries"
        constraints = [
            models.CheckConstraint(
                condition=DELIVERY_MACHINE.constraint_q(), name="notifdelivery_status_valid"
            ),
        ]
        indexes = [
            models.Index(fields=["org", "-id"], name="notifdelivery_org_id"),
            models.Index(
                fields=["next_attempt_at"],
                condition=Q(status=DeliveryStatus.PENDING),
                name="notifdelivery_pending",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} → {self.channel_id} ({self.status})"
