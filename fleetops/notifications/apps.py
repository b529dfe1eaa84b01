from __future__ import annotations

from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    """Per-organization notification channels (webhook, email), subscriptions by event type, and
    the stored delivery log. Domain apps register their event types and publish through
    `fleetops.notifications.services.notification_publish`; this app imports none of them."""

    name = "fleetops.notifications"
    label = "notifications"
    verbose_name = "Notifications"

    def ready(self) -> None:
        from fleetops import schedules

        schedules.declare(
            name="notifications.deliver_pending",
            task="fleetops.notifications.tasks.deliver_pending",
            heartbeat="notifications.sweep",
            every_seconds=60,
            expires_seconds=50,
            description="Send deliveries still pending (a send task that never ran) and retry failed ones.",
        )
