from __future__ import annotations

from django.apps import AppConfig


class IndexerConfig(AppConfig):
    """The forever indexer and its sync sources (seeds 004 and 002)."""

    name = "indexer"
    verbose_name = "Indexer"

    def ready(self) -> None:
        from fleetops import schedules
        from fleetops.observability import registry
        from indexer import collectors, dashboard

        registry.register_collector("indexer", collectors.collect_states)
        registry.register_card(dashboard.CARD)
        registry.register_sampler("indexer", dashboard.sample_enrichment_backlog)
        registry.register_status_check("indexer", dashboard.check_chains)

        schedules.declare(
            name="indexer.enrich",
            task="indexer.tasks.enrich",
            heartbeat="indexer.enrich.*",
            every_seconds=10,
            expires_seconds=8,
            description="Decode due enrichment rows of every chain with enrichment on (claims, SKIP LOCKED).",
        )
        schedules.declare(
            name="indexer.partitions",
            task="indexer.tasks.partitions",
            every_seconds=3600,
            expires_seconds=3000,
            description=(
                "Height-range partitions ahead of every chain's tip; drop ranges past retention (audited)."
            ),
        )
