"""Malformed answers are faults of the source, over real HTTP on loopback: the client fails over to
the next source and the first one's status shows why; and one chain read through a 0.34 node
(base64 attributes) and through a 0.37 node (text attributes) is stored as identical rows with
identical verify checksums, awkward attribute bytes included."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleetops.lib import clock
from fleetops.observability.leases import lease_acquire
from indexer import sources as sources_module
from indexer.blocks import lease_name
from indexer.ingest import blocks_commit
from indexer.models import (
    Block,
    Chain,
    ConnectionStatus,
    DegradedReason,
    Event,
    IndexerState,
    SyncSource,
    Transaction,
)
from indexer.rpc.client import CometRpc, SourceConfig
from indexer.runner import fetch_blocks
from indexer.sources import sources_observe
from indexer.verify import digests_from_source, digests_stored, heights_really_differ, range_checksum
from tests.indexer.cometbft_bodies import StubNode, awkward_chain, expected_text

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _set(path: tuple[Any, ...], value: Any):
    def corrupt(method: str, body: dict[str, Any]) -> Any:
        if method != path[0]:
            return body
        node = body
        for part in path[1:-1]:
            node = node[part]
        node[path[-1]] = value
        return body

    return corrupt


def _truncate_txs_results(method: str, body: dict[str, Any]) -> Any:
    if method == "block_results":
        body["result"]["txs_results"].pop()
    return body


def _not_json(method: str, body: dict[str, Any]) -> Any:
    return "<html>" if method == "block" else body


CORRUPTIONS = {
    "txs_results as an object": _set(("block_results", "result", "txs_results"), {"0": {}}),
    "txs_results as a string": _set(("block_results", "result", "txs_results"), "[]"),
    "a tx result missing": _truncate_txs_results,
    "block.data.txs as a string": _set(("block", "result", "block", "data", "txs"), "dHg="),
    "height null": _set(("block", "result", "block", "header", "height"), None),
    "height a fraction": _set(("block", "result", "block", "header", "height"), 2.5),
    "block_id null": _set(("block", "result", "block_id"), None),
    "an impossible timestamp": _set(("block", "result", "block", "header", "time"), "2026-02-30T00:00:00Z"),
    "bad base64 in an attribute": _set(
        ("block_results", "result", "begin_block_events", 0, "attributes", 0, "value"), "%%%"
    ),
}


@pytest.fixture
def pair():
    chain = awkward_chain(3)
    nodes = [StubNode(chain, "0.34"), StubNode(chain, "0.34")]
    yield nodes
    for node in nodes:
        node.stop()


def _client(nodes: list[StubNode], mono: FakeMonotonic) -> CometRpc:
    return CometRpc(
        [SourceConfig("primary", nodes[0].url, 1), SourceConfig("backup", nodes[1].url, 2)],
        clock=mono,
        sleep=mono.sleep,
        attempts=1,
    )


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_malformed_answer_fails_over_to_the_next_source_and_is_recorded(pair, name):
    mono = FakeMonotonic()
    pair[0].corrupt = CORRUPTIONS[name]
    with _client(pair, mono) as rpc:
        block, results = rpc.block_with_results(2)
        assert block.height == results.height == 2 and len(block.txs) == len(results.txs) == 2
        assert rpc.last_source == "backup"
        primary = rpc.health()["primary"]
        assert primary.consecutive_failures == 1 and primary.last_error.startswith("malformed: ")
        assert primary.next_retry_at > mono.now  # backed off like an outage
        assert rpc.health()["backup"].consecutive_failures == 0
        # Never an empty block: the same height from the backup has every row.
        assert sum(len(t.events) for t in results.txs) == 4


def test_the_source_status_shows_why_it_is_degraded(pair, org):
    chain = Chain.objects.create(org=org, slug="sim", chain_id="fleetops-sim-1")
    IndexerState.objects.create(chain=chain)
    for i, node in enumerate(pair):
        SyncSource.objects.create(
            chain=chain, name=("primary", "backup")[i], rpc_url=node.url, priority=i + 1
        )
    mono = FakeMonotonic()
    for memory in (sources_module._losses, sources_module._await_status):
        memory.clear()
    with clock.frozen(T0), _client(pair, mono) as rpc:
        for _ in range(5):  # observed until connected (a fresh /status each time)
            sources_observe(chain=chain, rpc=rpc, ws_connected=None)
            mono.now += 6
            if SyncSource.objects.get(name="primary").connection_status == ConnectionStatus.CONNECTED:
                break
        primary = SyncSource.objects.get(name="primary")
        assert primary.connection_status == ConnectionStatus.CONNECTED and primary.degraded_reasons == []
        pair[0].corrupt = CORRUPTIONS["txs_results as an object"]
        clock.advance(timedelta(seconds=1))
        rpc.block_with_results(3)
        sources_observe(chain=chain, rpc=rpc, ws_connected=None, probe=False)
    primary = SyncSource.objects.get(name="primary")
    assert "malformed" in primary.last_error and "txs_results" in primary.last_error
    assert DegradedReason.ERROR_RATE in primary.degraded_reasons
    assert "malformed" in primary.degraded_detail
    assert SyncSource.objects.get(name="backup").degraded_reasons == []


def _ingest(
    org: Any, slug: str, shape: str, chain_model: dict[int, Any]
) -> tuple[Chain, list[Any], StubNode]:
    chain = Chain.objects.create(org=org, slug=slug, chain_id="fleetops-sim-1")
    IndexerState.objects.create(chain=chain)
    node = StubNode(chain_model, shape)
    with CometRpc([SourceConfig(slug, node.url)]) as rpc:
        items = fetch_blocks(rpc, sorted(chain_model), max_in_flight=2)
        # The node's version (its /status, asked first) decides the attribute encoding.
        assert node.requests.index("status") < node.requests.index("block_results")
    grant = lease_acquire(name=lease_name(chain), holder="writer", ttl=timedelta(seconds=30))
    assert grant is not None
    blocks_commit(chain=chain, blocks=items, lease=grant)
    return chain, items, node


def _stored(chain: Chain) -> tuple[list[Any], list[Any], list[Any]]:
    return (
        list(
            Block.objects.filter(chain=chain)
            .order_by("height")
            .values_list("height", "hash", "parent_hash", "time", "proposer", "tx_count")
        ),
        list(
            Transaction.objects.filter(chain=chain)
            .order_by("height", "index")
            .values_list("height", "index", "hash", "code", "gas_wanted", "gas_used")
        ),
        list(
            Event.objects.filter(chain=chain)
            .order_by("height", "phase", "tx_index", "event_index")
            .values_list("height", "phase", "tx_index", "event_index", "type", "attributes")
        ),
    )


@pytest.mark.django_db
def test_a_0_34_node_and_a_0_37_node_give_identical_rows_and_checksums(org):
    model = awkward_chain(3)
    old, old_items, old_node = _ingest(org, "via-034", "0.34", model)
    new, new_items, new_node = _ingest(org, "via-037", "0.37", model)
    try:
        rows = _stored(old)
        assert rows == _stored(new)
        assert len(rows[0]) == 3 and len(rows[1]) == 6 and len(rows[2]) == 3 * (2 + 1 + 2 * 2)
        values = {a["value"] for *_, attributes in rows[2] for a in attributes}
        # Not printable but UTF-8: the text; NUL, undecodable bytes and marker look-alikes: marked.
        assert {"\x01", "b64:AA==", "b64:/w==", "b64:YjY0OkFRPT0=", expected_text(b"\xfe\xff")} <= values
        assert "AQ==" not in values  # never the 0.34 node's base64 as if it were text

        stored_old = digests_stored(chain=old, first=1, last=3)
        stored_new = digests_stored(chain=new, first=1, last=3)
        assert stored_old == stored_new == digests_from_source(old_items) == digests_from_source(new_items)
        assert range_checksum(stored_old.values()) == range_checksum(stored_new.values())
        # Verifying (or re-indexing) a chain ingested through one version against the other: no change.
        assert heights_really_differ(chain=new, items=old_items) == []
        assert heights_really_differ(chain=old, items=new_items) == []
    finally:
        old_node.stop()
        new_node.stop()
