from __future__ import annotations

from django.apps import AppConfig


class AccessConfig(AppConfig):
    name = "fleetops.access"
    label = "access"
    verbose_name = "Access"

    def ready(self) -> None:
        from fleetops.access import auth_events

        auth_events.connect()
