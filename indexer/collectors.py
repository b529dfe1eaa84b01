"""The indexer's scrape-time gauges, computed from PostgreSQL (registered in `IndexerConfig.ready`)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from indexer.models import Mode
from indexer.selectors import BACKLOG_STATUSES, chain_statuses, chains_visible


def collect_states() -> Iterable[Metric]:
    """Per-chain gauges computed from PostgreSQL at scrape time, so every web process agrees and a
    dead writer still shows its last state. Four small queries whatever the size of the indexed
    tables (states, leases, sources, enrichment backlog by the (chain, status) index)."""

    def gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"fleetops_indexer_{name}", doc, labels=["chain", *labels])

    head = gauge("head_height", "Latest chain height the sources reported.")
    indexed = gauge("indexed_height", "Last contiguous committed height.")
    lag = gauge("lag_blocks", "Head height minus indexed height.")
    mode = gauge("mode", "Indexer mode: 1 for the current one.", "mode")
    paused = gauge("paused", "1 while an operator paused ingest.")
    poison = gauge("poison_height", "Height whose commit keeps failing; 0 when there is none.")
    stalled = gauge("chain_stalled", "1 when the chain itself stopped producing blocks (mode idle).")
    backlog = gauge("enrichment_backlog", "Enrichment rows not decoded yet, by status.", "status")
    connection = gauge(
        "source_connection_status",
        "Source connection status: 0 disconnected, 1 connecting, 2 syncing, 3 connected, "
        "4 connected (degraded: partial data), 5 disconnecting (intentional), 6 refused (DNS, TLS or "
        "protocol error, until an operator re-enables it).",
        "source",
    )
    health = gauge(
        "source_health",
        "Source health: 1 healthy, 2 disconnected, 3 degraded, 4 dead, 5 rate limited.",
        "source",
    )
    failures = gauge("source_failures", "Consecutive failed requests of a source.", "source")
    leader = gauge("leader", "1 while a writer holds a live lease for the chain.")
    for s in chain_statuses(chains_visible(org_ids=None)):
        if s.head_height is not None:
            head.add_metric([s.slug], s.head_height)
        if s.last_indexed_height is not None:
            indexed.add_metric([s.slug], s.last_indexed_height)
        if s.lag_blocks is not None:
            lag.add_metric([s.slug], s.lag_blocks)
        for value in Mode.values:
            mode.add_metric([s.slug, value], 1 if s.mode == value else 0)
        paused.add_metric([s.slug], 1 if s.paused else 0)
        poison.add_metric([s.slug], s.poison_height or 0)
        stalled.add_metric([s.slug], 1 if s.stalled else 0)
        for status in BACKLOG_STATUSES:
            backlog.add_metric([s.slug, status.value], s.enrichment_backlog.get(status.value, 0))
        for source in s.sources:
            connection.add_metric([s.slug, source.name], source.connection_status)
            health.add_metric([s.slug, source.name], source.health)
            failures.add_metric([s.slug, source.name], source.consecutive_failures)
        leader.add_metric([s.slug], 1 if s.leader is not None and s.leader.live else 0)
    yield from (head, indexed, lag, mode, paused, poison, stalled, backlog)
    yield from (connection, health, failures, leader)
