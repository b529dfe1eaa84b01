from __future__ import annotations

from django.apps import AppConfig


class AuditConfig(AppConfig):
    name = "fleetops.audit"
    label = "audit"
    verbose_name = "Audit"

    def ready(self) -> None:
        from fleetops import schedules

        schedules.declare(
            name="platform.audit_prune",
            task="fleetops.audit.tasks.audit_prune",
            every_seconds=86400,
            expires_seconds=82800,
            description="Delete audit rows older than AUDIT_RETENTION_DAYS (append-only otherwise).",
        )
