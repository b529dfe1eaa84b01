from __future__ import annotations

from django.db import models

from fleetops.lib.machine import Machine


class IdempotencyState(models.TextChoices):
    IN_FLIGHT = "in_flight", "In flight"
    COMPLETED = "completed", "Completed"


# Plumbing, not an operator-visible change: the edge writes no audit row (the request it answers
# writes its own).
IDEMPOTENCY_MACHINE = Machine.declare(
    "api.idempotency_key",
    IdempotencyState,
    field="state",
    initial=IdempotencyState.IN_FLIGHT,
    edges={IdempotencyState.IN_FLIGHT: {IdempotencyState.COMPLETED: None}},
)


class IdempotencyKey(models.Model):
    """A client's `Idempotency-Key` for one organization, with the request's fingerprint and, once
    the request finished, the response to replay.

        in_flight ──(view finished, same transaction as its effects)──> completed
            └──(view raised or answered 5xx)──> deleted, the key may be used again
            └──(holder crashed, stale after IDEMPOTENCY_STALE_SECONDS)──> taken over

    The stored response is the one sent: its bytes, status and the headers a client reads
    (Content-Type, Location), so a replay is byte-for-byte the first answer.
    Rows are pruned after IDEMPOTENCY_TTL_HOURS (24 h by default).
    """

    State = IdempotencyState

    org = models.ForeignKey("access.Organization", on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64)
    method = models.CharField(max_length=8)
    path = models.CharField(max_length=300)
    state = models.CharField(max_length=16, choices=State.choices, default=State.IN_FLIGHT)
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    response_content = models.BinaryField(null=True, blank=True)
    response_headers = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField()
    locked_at = models.DateTimeField()
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["org", "key"], name="idempotency_key_unique_per_org"),
            models.CheckConstraint(
                condition=IDEMPOTENCY_MACHINE.constraint_q(), name="idempotency_state_valid"
            ),
            models.CheckConstraint(
                condition=models.Q(state=IDEMPOTENCY_MACHINE.initial)
                | models.Q(response_status__isnull=False, response_content__isnull=False),
                name="idempotency_completed_has_response",
            ),
        ]
        indexes = [models.Index(fields=["created_at"], name="idempotency_created")]

    def __str__(self) -> str:
        return f"{self.key} ({self.state})"


class RateCounter(models.Model):
    """One API rate-limit counter (`<scope>:<client>`) for the current window, when the counters
    live in PostgreSQL (no Redis cache): see `fleetops.api.ratelimit`. The table is UNLOGGED."""

    key = models.CharField(max_length=200, primary_key=True)
    window_start = models.BigIntegerField(help_text="Epoch seconds at which the counted window began.")
    hits = models.IntegerField()

    def __str__(self) -> str:
        return f"{self.key} @ {self.window_start}: {self.hits}"
