from __future__ import annotations

from django.apps import AppConfig


class ObservabilityConfig(AppConfig):
    name = "fleetops.observability"
    label = "observability"
    verbose_name = "Observability"

    def ready(self) -> None:
        from fleetops.observability import platform_checks

        platform_checks.register()
        from fleetops import schedules

        schedules.declare(
            name="platform.worker_heartbeat",
            task="fleetops.observability.tasks.worker_heartbeat",
            heartbeat="platform.worker",
            every_seconds=30,
            expires_seconds=25,
            description="Beat -> broker -> worker -> database liveness probe (heartbeat platform.worker).",
        )
