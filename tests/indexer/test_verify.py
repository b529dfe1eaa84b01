"""The height checksums: PostgreSQL's rendering of the stored rows and Python's of the source must
agree byte for byte, or every re-index would re-check (and verify would flag) unchanged heights."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from fleetops.observability.leases import lease_acquire
from indexer.blocks import IndexedBlock, lease_name
from indexer.ingest import blocks_commit
from indexer.models import Chain, Event, IndexerState
from indexer.rpc.parse import Attribute, BlockResults, TxResult
from indexer.rpc.parse import Block as RpcBlock
from indexer.rpc.parse import Event as RpcEvent
from indexer.verify import digests_from_source, digests_stored, heights_really_differ

pytestmark = pytest.mark.django_db

AWKWARD = [
    'quote " and backslash \\ and slash /',
    "control \x01 \x1f tab\t newline\n return\r form\x0c back\x08",
    "non-ASCII é ü 中文 and astral 😀, DEL \x7f, U+2028 \u2028",
    "",
    "pipe | and bar-bracket |[ inside",
]


def _blocks() -> list[IndexedBlock]:
    blocks, parent = [], "0" * 64
    for height in range(1, 4):
        attrs = tuple(
            Attribute(k or "k", v, i % 2 == 0) for i, (k, v) in enumerate(zip(AWKWARD, AWKWARD, strict=False))
        )
        event = RpcEvent('type | with\nodd "chars" é', attrs)
        results = BlockResults(
            height=height,
            txs=tuple(
                TxResult(i, i % 2, "", 100 + i, 90, "", (event, RpcEvent("empty", ()))) for i in range(3)
            ),
            begin_block_events=(RpcEvent("coin_received", attrs[:1]),),
            end_block_events=(event,),
            finalize_block_events=(RpcEvent("fee_market", ()),),
        )
        block_hash = hashlib.sha256(f"{height}{parent}".encode()).hexdigest().upper()
        txs = tuple(f"tx-{height}-{i}".encode() for i in range(3))
        when = datetime(2026, 1, 1, 0, 0, 0, 123456, tzinfo=UTC) + timedelta(seconds=height)
        blocks.append(
            IndexedBlock(RpcBlock(height, block_hash, parent, when, "sim", "AB" * 20, txs), results)
        )
        parent = block_hash
    return blocks


@pytest.fixture
def committed(org):
    chain = Chain.objects.create(org=org, slug="sim", chain_id="fleetops-sim-1")
    IndexerState.objects.create(chain=chain)
    grant = lease_acquire(name=lease_name(chain), holder="writer", ttl=timedelta(seconds=30))
    assert grant is not None
    blocks = _blocks()
    blocks_commit(chain=chain, blocks=blocks, lease=grant)
    return chain, blocks


def test_stored_and_source_checksums_agree_on_awkward_strings(committed):
    chain, blocks = committed
    assert digests_stored(chain=chain, first=1, last=3) == digests_from_source(blocks)
    assert heights_really_differ(chain=chain, items=blocks) == []


def test_a_changed_attribute_or_a_missing_event_changes_the_checksum(committed):
    chain, blocks = committed
    event = Event.objects.filter(chain=chain, height=2, phase="tx", tx_index=1, event_index=0).get()
    event.attributes = [{**event.attributes[0], "value": "changed"}, *event.attributes[1:]]
    event.save(update_fields=["attributes"])
    Event.objects.filter(chain=chain, height=3, phase="end_block").delete()
    stored, source = digests_stored(chain=chain, first=1, last=3), digests_from_source(blocks)
    assert [h for h in (1, 2, 3) if stored[h] != source[h]] == [2, 3]
    assert [b.height for b in heights_really_differ(chain=chain, items=blocks)] == [2, 3]


def test_a_block_field_difference_is_caught_by_both_comparisons(committed):
    chain, blocks = committed
    other = replace(blocks[0], block=replace(blocks[0].block, proposer="CD" * 20))
    assert digests_from_source([other])[1] != digests_stored(chain=chain, first=1, last=1)[1]
    assert heights_really_differ(chain=chain, items=[other]) == [other]
