"""Scrape-time gauges, the dashboard card and the /ops/status check, computed from PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleetops.lib import clock
from fleetops.observability import registry
from fleetops.observability.leases import lease_acquire
from indexer.blocks import lease_name
from indexer.collectors import collect_states
from indexer.dashboard import check_chains
from indexer.models import ConnectionStatus, DegradedReason, Enrichment, IndexerState, SyncSource
from tests.factories import make_indexed_chain

pytestmark = pytest.mark.django_db


def _samples():
    """{(metric name, frozenset(labels)): value} as Prometheus would scrape them."""
    scrape = CollectorRegistry(auto_describe=False)

    class _Collector:
        def collect(self):
            return collect_states()

    scrape.register(_Collector())
    text = generate_latest(scrape).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def chains(org):
    sim = make_indexed_chain(org, slug="sim", blocks=10)
    IndexerState.objects.filter(chain=sim).update(head_height=25, mode="normal", poison_height=11)
    lease_acquire(name=lease_name(sim), holder="writer", ttl=timedelta(seconds=30))
    now = clock.now()
    SyncSource.objects.create(
        chain=sim,
        name="archive",
        rpc_url="http://archive:1",
        connection_status=ConnectionStatus.CONNECTED_DEGRADED,
        degraded_reasons=[DegradedReason.HISTORIC_RANGE_FAILED],
        last_success_at=now - timedelta(hours=1),
    )
    SyncSource.objects.create(
        chain=sim,
        name="flaky",
        rpc_url="http://flaky:1",
        connection_status=ConnectionStatus.CONNECTING,
        consecutive_failures=4,
        first_failure_at=now - timedelta(minutes=5),
    )
    Enrichment.objects.bulk_create(
        [
            Enrichment(chain=sim, height=h, phase="tx", tx_index=0, event_index=0, payload="x", status=s)
            for h, s in ((1, "pending"), (2, "pending"), (3, "undecodable"), (4, "ok"))
        ]
    )
    halted = make_indexed_chain(org, slug="halted", mode="idle")
    return sim, halted


def test_the_collector_reports_every_gauge_per_chain(chains):
    samples = _samples()

    def value(name, **labels):
        return samples[(f"fleetops_indexer_{name}", frozenset(labels.items()))]

    assert value("head_height", chain="sim") == 25
    assert value("indexed_height", chain="sim") == 10
    assert value("lag_blocks", chain="sim") == 15
    assert value("mode", chain="sim", mode="normal") == 1
    assert value("mode", chain="sim", mode="degraded") == 0
    assert value("poison_height", chain="sim") == 11
    assert value("chain_stalled", chain="sim") == 0
    assert value("leader", chain="sim") == 1
    assert value("enrichment_backlog", chain="sim", status="pending") == 2
    assert value("enrichment_backlog", chain="sim", status="undecodable") == 1
    assert value("enrichment_backlog", chain="sim", status="failed") == 0
    assert ("fleetops_indexer_enrichment_backlog", frozenset({"chain": "sim", "status": "ok"})) not in samples
    assert value("source_connection_status", chain="sim", source="archive") == 4
    assert value("source_connection_status", chain="sim", source="flaky") == 1
    assert value("source_health", chain="sim", source="archive") == 1  # healthy: no failures
    assert value("source_health", chain="sim", source="flaky") == 3  # degraded while failing
    assert value("source_failures", chain="sim", source="flaky") == 4
    # A chain that stopped producing blocks and has no live writer.
    assert value("chain_stalled", chain="halted") == 1
    assert value("mode", chain="halted", mode="idle") == 1
    assert value("leader", chain="halted") == 0
    assert value("poison_height", chain="halted") == 0
    assert ("fleetops_indexer_head_height", frozenset({"chain": "halted"})) not in samples


def test_the_collector_runs_a_fixed_number_of_queries(chains, org):
    with CaptureQueriesContext(connection) as few:
        list(collect_states())
    for i in range(4):
        chain = make_indexed_chain(org, slug=f"extra-{i}")
        SyncSource.objects.create(chain=chain, name="s", rpc_url="http://s:1")
    with CaptureQueriesContext(connection) as many:
        list(collect_states())
    assert len(few) == len(many) == 4


def test_the_app_registers_its_collector_card_and_status_check():
    assert registry.collectors()["indexer"] is collect_states
    assert registry.status_checks()["indexer"] is check_chains
    assert "indexer" in {card.key for card in registry.cards()}


def test_the_metrics_endpoint_serves_the_indexer_gauges(chains, client):
    text = client.get("/metrics").content.decode()
    assert 'fleetops_indexer_lag_blocks{chain="sim"} 15.0' in text
    assert 'fleetops_indexer_source_connection_status{chain="sim",source="archive"} 4.0' in text


def test_the_status_check_fails_halted_and_leaderless_chains_and_warns_on_degraded(org):
    good = make_indexed_chain(org, slug="good", blocks=2, head_height=2, mode="normal")
    lease_acquire(name=lease_name(good), holder="w", ttl=timedelta(seconds=30))
    assert check_chains().status == "ok"

    IndexerState.objects.filter(chain=good).update(mode="degraded", last_error="height 3: boom")
    result = check_chains()
    assert result.status == "warn"
    assert result.rows[0]["notes"] == "degraded: height 3: boom"

    bad = make_indexed_chain(org, slug="bad", mode="halted", last_error="reorg deeper than finality")
    lease_acquire(name=lease_name(bad), holder="w2", ttl=timedelta(seconds=30))
    result = check_chains()
    assert result.status == "fail"
    assert "bad" in result.summary and "good" in result.summary
    by_chain = {row["chain"]: row for row in result.rows}
    assert by_chain["bad"]["status"] == "fail"
    assert by_chain["bad"]["notes"].startswith("halted: reorg deeper")


def test_an_idle_chain_with_a_writer_is_not_a_failure(org):
    idle = make_indexed_chain(org, slug="idle", blocks=1, head_height=1, mode="idle")
    lease_acquire(name=lease_name(idle), holder="w", ttl=timedelta(seconds=30))
    result = check_chains()
    assert result.status == "ok"
    assert "chain stalled" in result.rows[0]["notes"]


def test_the_dashboard_card_shows_each_visible_chain(client, org, other_org, viewer):
    sim = make_indexed_chain(org, slug="sim", blocks=3, head_height=9, mode="catching_up")
    SyncSource.objects.create(
        chain=sim, name="a", rpc_url="http://a:1", connection_status=ConnectionStatus.CONNECTED_DEGRADED
    )
    Enrichment.objects.create(chain=sim, height=1, phase="tx", tx_index=0, event_index=0, payload="x")
    make_indexed_chain(other_org, slug="globex-chain")
    client.force_login(viewer.user)
    page = client.get("/admin/").content.decode()
    assert 'id="card-indexer"' in page
    assert 'id="indexer-card-sim"' in page and "indexer-card-globex-chain" not in page
    assert "catching_up" in page and "9 / 3" in page
    assert "connected (degraded) 1" in page and "pending 1" in page
