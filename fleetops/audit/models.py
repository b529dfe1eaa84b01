from __future__ import annotations

from django.db import models


class ActorType(models.TextChoices):
    USER = "user", "User"
    API_TOKEN = "api_token", "API token"
    SCHEDULER = "scheduler", "Scheduler"
    SYSTEM = "system", "System"
    ANONYMOUS = "anonymous", "Anonymous"


class PlatformAction(models.TextChoices):
    """Audit actions of the platform itself. Each domain app declares its own enum."""

    LOGIN = "access.login", "Logged in"
    LOGIN_FAILED = "access.login_failed", "Login failed"
    LOGIN_LOCKED_OUT = "access.login_locked_out", "Login locked out"
    DENIED = "access.denied", "Action denied"
    TOKEN_CREATED = "access.token_created", "API token created"
    TOKEN_REVOKED = "access.token_revoked", "API token revoked"
    AUDIT_PRUNED = "audit.pruned", "Audit log pruned"
    SCHEDULES_SYNCED = "platform.schedules_synced", "Schedules synced"


class AuditEvent(models.Model):
    """One operator-visible change or security-relevant event. Append-only: a database trigger
    (migration 0002) rejects UPDATE and DELETE, except a DELETE of rows past retention inside a
    transaction that set `fleetops.audit_prune` (only `audit_prune` does).

    Rows are written by services inside the transaction of the change they describe (`record`),
    never from model signals, so a rolled-back change leaves no audit row and background writes
    are never missed.
    """

    ATTENTION_ACTIONS = (PlatformAction.DENIED, PlatformAction.LOGIN_FAILED, PlatformAction.LOGIN_LOCKED_OUT)

    at = models.DateTimeField(db_index=True)
    org = models.ForeignKey(
        "access.Organization", on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    actor_type = models.CharField(max_length=16, choices=ActorType.choices)
    actor_id = models.CharField(max_length=64, blank=True, default="")
    actor_label = models.CharField(max_length=200, blank=True, default="")
    action = models.CharField(max_length=80)
    target_type = models.CharField(max_length=80, blank=True, default="")
    target_id = models.CharField(max_length=64, blank=True, default="")
    target_label = models.CharField(max_length=200, blank=True, default="")
    reason = models.TextField(blank=True, default="")
    changes = models.JSONField(default=dict, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    request_id = models.CharField(max_length=64, blank=True, default="")

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["org", "-id"], name="audit_org_id"),
            models.Index(fields=["org", "action", "-id"], name="audit_org_action_id"),
            models.Index(fields=["target_type", "target_id"], name="audit_target"),
            # The actor filter. The search's GIN index is on an expression (migration 0003).
            models.Index(fields=["actor_type", "actor_id", "-id"], name="audit_actor"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(actor_type__in=ActorType.values), name="audit_actor_type_valid"
            )
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.action} by {self.actor_label or self.actor_type}"
