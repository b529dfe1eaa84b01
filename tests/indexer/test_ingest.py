"""Atomic, fenced, linkage-checked block commits and rollback, on real PostgreSQL."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.observability.leases import LeaseLost, lease_acquire
from indexer.blocks import IndexedBlock, lease_name
from indexer.ingest import (
    NotNextHeight,
    ReorgDetected,
    block_rows,
    blocks_commit,
    blocks_rollback,
    prepare_rows,
)
from indexer.models import Block, Chain, Event, IndexerState, Transaction
from indexer.producers import Producer, register_producer, unregister_producer
from indexer.rpc.parse import Attribute, BlockResults, TxResult
from indexer.rpc.parse import Block as RpcBlock
from indexer.rpc.parse import Event as RpcEvent

pytestmark = pytest.mark.django_db
TTL = timedelta(seconds=30)


def make_chain_blocks(start: int, count: int, parent: str = "0" * 64, salt: str = "a") -> list[IndexedBlock]:
    blocks = []
    for height in range(start, start + count):
        txs = tuple(f"{salt}-tx-{height}-{i}".encode() for i in range(2))
        block_hash = hashlib.sha256(f"{salt}{height}{parent}".encode()).hexdigest().upper()
        transfer = RpcEvent(
            "transfer", (Attribute("sender", f"sim1{height}", True), Attribute("amount", "5utok", True))
        )
        results = BlockResults(
            height=height,
            txs=tuple(TxResult(i, 0, "", 100, 90, "", (transfer,)) for i in range(2)),
            begin_block_events=(RpcEvent("coin_received", (Attribute("receiver", "sim1x", True),)),),
            end_block_events=(RpcEvent("fee_market", ()),),
        )
        block = RpcBlock(
            height,
            block_hash,
            parent,
            datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=height),
            "sim",
            "AB" * 20,
            txs,
        )
        blocks.append(IndexedBlock(block, results))
        parent = block_hash
    return blocks


@pytest.fixture
def chain(org):
    chain = Chain.objects.create(org=org, slug="sim", chain_id="fleetops-sim-1")
    IndexerState.objects.create(chain=chain)
    return chain


@pytest.fixture
def lease(chain):
    grant = lease_acquire(name=lease_name(chain), holder="writer-1", ttl=TTL)
    assert grant is not None
    return grant


def test_a_batch_is_written_with_deterministic_rows_and_the_height_advances(chain, lease):
    blocks = make_chain_blocks(1, 3)
    assert blocks_commit(chain=chain, blocks=blocks, lease=lease) == 3
    state = IndexerState.objects.get(chain=chain)
    assert (state.last_indexed_height, state.oldest_indexed_height) == (3, 1)
    assert Block.objects.filter(chain=chain).count() == 3
    assert Transaction.objects.filter(chain=chain).count() == 6
    # per block: 1 begin + 1 end + 2 tx events
    assert Event.objects.filter(chain=chain).count() == 12
    tx = Transaction.objects.get(chain=chain, height=2, index=1)
    assert tx.hash == hashlib.sha256(b"a-tx-2-1").hexdigest().upper()
    event = Event.objects.get(chain=chain, height=2, phase="tx", tx_index=1, event_index=0)
    assert event.attributes == [
        {"key": "sender", "value": "sim12", "index": True},
        {"key": "amount", "value": "5utok", "index": True},
    ]


def stored_rows(chain: Chain) -> list[list[tuple]]:
    with connection.cursor() as cur:
        out = []
        for sql in (
            "SELECT height, hash, parent_hash, time, proposer, tx_count FROM indexer_block",
            'SELECT height, "index", hash, code, gas_wanted, gas_used FROM indexer_transaction',
            "SELECT height, phase, tx_index, event_index, type, attributes::text FROM indexer_event",
        ):
            cur.execute(f"{sql} WHERE chain_id = %s ORDER BY 1, 2, 3, 4", [chain.pk])
            out.append(cur.fetchall())
    return out


def test_rows_built_ahead_are_the_rows_built_at_commit_and_only_used_for_their_chain(chain, lease, org):
    blocks = make_chain_blocks(1, 4)
    blocks_commit(chain=chain, blocks=blocks, lease=lease)
    built_now = stored_rows(chain)
    blocks_rollback(chain=chain, to_height=0, lease=lease, actor=Actor.system("test"), reason="again")
    # Built ahead for this chain (as the fetch threads do), and for another chain: not used here.
    other = Chain.objects.create(org=org, slug="other", chain_id="other-1")
    ahead = [
        prepare_rows(b, chain_id=chain.pk if b.height % 2 else other.pk, enrichment=chain.enrichment_enabled)
        for b in make_chain_blocks(1, 4)
    ]
    assert ahead[0].rows == block_rows(chain.pk, blocks[0], enrichment=chain.enrichment_enabled)
    blocks_commit(chain=chain, blocks=ahead, lease=lease)
    assert stored_rows(chain) == built_now


def test_a_replayed_batch_is_refused_and_duplicates_nothing(chain, lease):
    blocks = make_chain_blocks(1, 3)
    blocks_commit(chain=chain, blocks=blocks, lease=lease)
    with pytest.raises(NotNextHeight):
        blocks_commit(chain=chain, blocks=blocks, lease=lease)
    assert Block.objects.filter(chain=chain).count() == 3


def test_identities_are_unique_even_with_null_tx_index(chain):
    Event.objects.create(chain=chain, height=1, phase="begin_block", tx_index=None, event_index=0, type="x")
    from django.db import IntegrityError, transaction

    with pytest.raises(IntegrityError), transaction.atomic():
        Event.objects.create(
            chain=chain, height=1, phase="begin_block", tx_index=None, event_index=0, type="y"
        )


def test_a_parent_mismatch_is_a_reorg_and_writes_nothing(chain, lease):
    first = make_chain_blocks(1, 3)
    blocks_commit(chain=chain, blocks=first, lease=lease)
    fork = make_chain_blocks(4, 2, parent="F" * 64)
    with pytest.raises(ReorgDetected) as caught:
        blocks_commit(chain=chain, blocks=fork, lease=lease)
    assert caught.value.height == 4
    assert IndexerState.objects.get(chain=chain).last_indexed_height == 3
    assert not Block.objects.filter(chain=chain, height__gt=3).exists()


def test_a_broken_link_inside_the_batch_is_refused(chain, lease):
    blocks = make_chain_blocks(1, 3)
    broken = [blocks[0], make_chain_blocks(2, 1, parent="E" * 64)[0]]
    with pytest.raises(ReorgDetected):
        blocks_commit(chain=chain, blocks=broken, lease=lease)
    assert not Block.objects.filter(chain=chain).exists()


def test_a_writer_whose_lease_was_taken_over_cannot_commit(chain, lease):
    with clock.frozen(clock.now() + TTL + timedelta(seconds=1)):
        newer = lease_acquire(name=lease_name(chain), holder="writer-2", ttl=TTL)
        assert newer is not None and newer.token == lease.token + 1
        with pytest.raises(LeaseLost):
            blocks_commit(chain=chain, blocks=make_chain_blocks(1, 2), lease=lease)
        assert not Block.objects.filter(chain=chain).exists()
        assert blocks_commit(chain=chain, blocks=make_chain_blocks(1, 2), lease=newer) == 2


def test_producers_write_in_the_same_transaction_and_roll_back_with_it(chain, lease):
    seen: list[tuple[str, int]] = []

    def write(chain_, blocks):
        seen.append(("write", blocks[-1].height))
        if blocks[-1].height == 5:
            raise RuntimeError("producer failed")

    register_producer(Producer("test", write, lambda chain_, height: seen.append(("rollback", height))))
    try:
        blocks_commit(chain=chain, blocks=make_chain_blocks(1, 3), lease=lease)
        tail = make_chain_blocks(4, 2, parent=Block.objects.get(chain=chain, height=3).hash)
        with pytest.raises(RuntimeError):
            blocks_commit(chain=chain, blocks=tail, lease=lease)
        # The failing producer took the whole batch down with it: rows and height alike.
        assert IndexerState.objects.get(chain=chain).last_indexed_height == 3
        assert not Block.objects.filter(chain=chain, height__gt=3).exists()
        blocks_rollback(chain=chain, to_height=1, lease=lease, actor=Actor.system("test"), reason="test")
    finally:
        unregister_producer("test")
    assert seen == [("write", 3), ("write", 5), ("rollback", 1)]


def test_rollback_removes_every_row_above_the_height_and_is_audited(chain, lease):
    blocks_commit(chain=chain, blocks=make_chain_blocks(1, 10), lease=lease)
    removed = blocks_rollback(
        chain=chain, to_height=6, lease=lease, actor=Actor.system("test"), reason="reorg"
    )
    assert removed == 4
    assert IndexerState.objects.get(chain=chain).last_indexed_height == 6
    for model in (Block, Transaction, Event):
        assert not model.objects.filter(chain=chain, height__gt=6).exists()
        assert model.objects.filter(chain=chain, height=6).exists()
    audit = AuditEvent.objects.get(action="indexer.rolled_back")
    assert audit.metadata["depth"] == 4
    # Re-ingest on the other branch from the fork point.
    parent = Block.objects.get(chain=chain, height=6).hash
    assert (
        blocks_commit(chain=chain, blocks=make_chain_blocks(7, 4, parent=parent, salt="b"), lease=lease) == 10
    )


def test_commit_uses_a_fixed_number_of_statements_whatever_the_batch_size(chain, lease):
    from django.test.utils import CaptureQueriesContext

    blocks_commit(chain=chain, blocks=make_chain_blocks(1, 1), lease=lease)
    parent = Block.objects.get(chain=chain, height=1).hash
    with CaptureQueriesContext(connection) as small:
        blocks_commit(chain=chain, blocks=make_chain_blocks(2, 2, parent=parent), lease=lease)
    parent = Block.objects.get(chain=chain, height=3).hash
    with CaptureQueriesContext(connection) as large:
        blocks_commit(chain=chain, blocks=make_chain_blocks(4, 50, parent=parent), lease=lease)
    assert len(large) == len(small)
    assert Event.objects.filter(chain=chain).count() == 53 * 4
