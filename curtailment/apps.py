from __future__ import annotations

from django.apps import AppConfig


class CurtailmentConfig(AppConfig):
    """Power curtailment of a device fleet (seed 001)."""

    name = "curtailment"
    verbose_name = "Curtailment"

    def ready(self) -> None:
        from curtailment import dashboard, metrics
        from fleetops import schedules
        from fleetops.observability import registry

        schedules.declare(
            name="curtailment.reconcile",
            task="curtailment.tasks.reconcile",
            heartbeat="curtailment.reconciler",
            every_seconds=30,
            expires_seconds=25,
            description="Reconciler tick: dispatch, confirm, drift, restore, complete every live event.",
        )
        schedules.declare(
            name="curtailment.telemetry_poll",
            task="curtailment.tasks.telemetry_poll",
            heartbeat="curtailment.telemetry",
            every_seconds=15,
            expires_seconds=12,
            description="Poll every fleet gateway's telemetry into DeviceSample (bulk).",
        )
        schedules.declare(
            name="curtailment.fleet_sync",
            task="curtailment.tasks.fleet_sync",
            every_seconds=300,
            expires_seconds=240,
            description="Sync devices from every fleet gateway.",
        )
        schedules.declare(
            name="curtailment.telemetry_prune",
            task="curtailment.tasks.telemetry_prune",
            every_seconds=3600,
            expires_seconds=3000,
            description="Delete telemetry samples older than TELEMETRY_RETENTION_DAYS.",
        )
        registry.register_collector("curtailment", metrics.collect_states)
        registry.register_card(dashboard.CARD)
        registry.register_sampler("curtailment", dashboard.sample_live_events)
