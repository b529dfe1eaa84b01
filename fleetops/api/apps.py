from __future__ import annotations

from django.apps import AppConfig


class ApiConfig(AppConfig):
    name = "fleetops.api"
    label = "api"
    verbose_name = "API"

    def ready(self) -> None:
        from fleetops import schedules
        from fleetops.api import schema  # noqa: F401 - registers the OpenAPI auth extension

        schedules.declare(
            name="platform.idempotency_prune",
            task="fleetops.api.tasks.idempotency_prune",
            every_seconds=3600,
            expires_seconds=3000,
            description="Delete Idempotency-Key records older than IDEMPOTENCY_TTL_HOURS.",
        )
