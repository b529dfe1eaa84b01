from __future__ import annotations

from django.apps import AppConfig


class OutboxConfig(AppConfig):
    """The transactional outbox: every kick through the broker is a row written in the request's
    transaction, sent after commit and, when that fails, by the relay (`fleetops.outbox.services`).
    Domain apps call `outbox_enqueue`; this app imports none of them."""

    name = "fleetops.outbox"
    label = "outbox"
    verbose_name = "Outbox"

    def ready(self) -> None:
        from fleetops import schedules
        from fleetops.observability import registry
        from fleetops.outbox import metrics, selectors

        schedules.declare(
            name="outbox.relay",
            task="fleetops.outbox.tasks.relay",
            every_seconds=10,
            expires_seconds=8,
            description="Send outbox messages still pending (a failed or lost on-commit send), with backoff.",
        )
        schedules.declare(
            name="outbox.prune",
            task="fleetops.outbox.tasks.prune",
            every_seconds=3600,
            expires_seconds=3000,
            description="Delete sent outbox messages older than 7 days (pending ones are kept).",
        )
        registry.register_collector("outbox", metrics.collect_backlog)
        registry.register_status_check("outbox", selectors.check_outbox)
