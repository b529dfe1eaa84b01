from __future__ import annotations

from django.apps import AppConfig


class MigrationsAppConfig(AppConfig):
    """Key re-stake lifecycle (seed 000) and protocol history migration (seed 003).

    The explicit label keeps the app's tables and migration history apart from Django's own
    `migrations` machinery and reads well in the admin.
    """

    name = "migrations_app"
    label = "migrations_app"
    verbose_name = "Migrations"

    def ready(self) -> None:
        self._ready_keys()
        self._ready_protocols()

    def _ready_keys(self) -> None:
        # Key re-stake lifecycle (seed 000): the two schedules, the notification event type, the
        # dashboard card, the scrape-time metrics, the admin pages and the Celery tasks.
        from fleetops import schedules
        from fleetops.notifications.registry import register_event_type
        from fleetops.observability import registry
        from migrations_app.keys import admin as keys_admin  # noqa: F401
        from migrations_app.keys import dashboard as keys_dashboard
        from migrations_app.keys import metrics as keys_metrics
        from migrations_app.keys import tasks as keys_tasks  # noqa: F401
        from migrations_app.keys.services import FAILED_EVENT

        schedules.declare(
            name="keys.restake",
            task="migrations_app.keys.tasks.restake",
            every_seconds=30,
            expires_seconds=25,
            description="Re-stake schedule: claim due keys, count the attempt, broadcast the stake tx.",
        )
        schedules.declare(
            name="keys.verify",
            task="migrations_app.keys.tasks.verify",
            every_seconds=30,
            expires_seconds=25,
            description="Verify pending stake transactions by coverage scanning; apply verdicts.",
        )
        register_event_type(FAILED_EVENT, "Key re-stake failed (attempt limit reached)")
        registry.register_collector("keys", keys_metrics.collect_states)
        registry.register_card(keys_dashboard.CARD)
        registry.register_sampler("keys", keys_dashboard.sample_keys_by_status)

    def _ready_protocols(self) -> None:
        # Protocol history migration (seed 003): the indexer producer, the dashboard card, the
        # scrape-time metrics, the admin pages and the Celery tasks.
        from fleetops.observability import registry
        from fleetops.observability.heartbeats import expect_one_shot
        from indexer.producers import register_producer
        from migrations_app.protocols import admin, dashboard, metrics, producer, tasks  # noqa: F401

        register_producer(producer.PRODUCER)
        # A migration runs once to its handoff (one heartbeat row per chain): finished, not stale,
        # once it completed.
        for migration in ("history", "current_state"):
            expect_one_shot(f"protocols.{migration}.*")
        registry.register_collector("protocols", metrics.collect_states)
        registry.register_card(dashboard.CARD)
        registry.register_status_check("protocols", dashboard.check_protocols)
