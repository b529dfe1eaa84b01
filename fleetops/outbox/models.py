"""The transactional outbox: a Celery task to send, written in the transaction of the request that
asked for it.

Message states::

    pending ─(the broker took it)─> sent
       └─(claimed by a relay pass / the send failed: retry later)─> pending

Every edge is the outbox's own (engine) and writes no audit row: the request that enqueued the
message wrote its own audit row in the same transaction, and the message is plumbing under it.
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q

from fleetops.lib.machine import Machine


class OutboxStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    SENT = "sent", "Sent"


OUTBOX_MACHINE = Machine.declare(
    "outbox.message",
    OutboxStatus,
    field="status",
    initial=OutboxStatus.PENDING,
    edges={
        OutboxStatus.PENDING: {OutboxStatus.PENDING: None, OutboxStatus.SENT: None},
    },
    terminal=(OutboxStatus.SENT,),
    description="""
A Celery task a request asked for (a kick), written in the request's transaction. After the commit
the request sends it at once and marks it `sent` when the broker took it; a failed send, or a relay
pass claiming it, keeps it `pending` with a later `available_at`; the relay (beat, every 10 s) sends
what is due. Engine edges only, and no audit rows: the request audited itself in the same
transaction.
""",
)


class OutboxMessage(models.Model):
    """One task to send through the broker: its name, its keyword arguments and how sending went."""

    task = models.CharField(max_length=200)
    kwargs = models.JSONField(default=dict, blank=True)
    # Celery's `expires` (seconds after the send) for kicks that are worthless once late.
    expires_seconds = models.PositiveIntegerField(null=True, blank=True)
    status = models.CharField(max_length=8, choices=OutboxStatus.choices, default=OutboxStatus.PENDING)
    created_at = models.DateTimeField()
    # When the relay may send it: after the on-commit send had its chance, after a claim's lease,
    # after a failed send's backoff.
    available_at = models.DateTimeField()
    sent_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    # The request that enqueued it (the same id as its audit row's).
    request_id = models.CharField(max_length=64, blank=True, default="")

    class Meta:
        ordering = ["-id"]
        verbose_name = "outbox message"
        constraints = [
            models.CheckConstraint(condition=OUTBOX_MACHINE.constraint_q(), name="outbox_status_valid"),
        ]
        indexes = [
            models.Index(
                fields=["available_at"], condition=Q(status=OutboxStatus.PENDING), name="outbox_pending_due"
            ),
            # The console's search by the request that queued a message.
            models.Index(fields=["request_id"], name="outbox_request_id"),
        ]

    def __str__(self) -> str:
        return f"{self.task} #{self.pk} ({self.status})"
