"""Committing and rolling back indexed blocks.

`blocks_commit` writes a contiguous batch of blocks in ONE transaction:
1. fence: the writer's lease token must still hold the lease (a paused ex-leader fails here);
2. lock the chain's IndexerState and check the batch starts right after `last_indexed_height`;
3. linkage: the first block's parent hash must equal the stored hash below it, and each block's
   parent the previous block's hash, else ReorgDetected and nothing is written;
4. binary COPY of blocks, transactions, events and pending enrichment rows into the (partitioned)
   parent tables (set-based; one round trip per table); a block's rows may have been built ahead, in
   the thread that fetched it (`prepare_rows`);
5. registered producers write their derived rows in the same transaction;
6. advance `last_indexed_height` by compare-and-set (and store the chain's fingerprint, the hash of
   the first block ever indexed, on the first commit).
A crash anywhere leaves the database at the previous height, rows and height together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from django.db import connection, transaction
from psycopg.types.string import BytesBinaryDumper

from fleetops.audit.actors import Actor
from fleetops.audit.services import record
from fleetops.lib.cas import cas_update
from fleetops.lib.errors import Conflict, ValidationFailed
from fleetops.observability.leases import LeaseGrant, lease_assert_held
from indexer.blocks import IndexedBlock
from indexer.blocks import event_rows as event_rows  # the event rows, shared with verify and producers
from indexer.blocks import lease_name as lease_name  # the writer lease every write here is fenced by
from indexer.enrichment import ENRICHMENT_COPY_COLUMNS, enrichment_rows_for
from indexer.metrics import ROWS
from indexer.models import Block, Chain, Enrichment, Event, IndexerState, Phase, Transaction
from indexer.producers import producers

REWRITE_NOT_INDEXED = "only indexed heights can be re-indexed (last indexed height: {last})"
BATCH_NOT_CONTIGUOUS = "blocks must be contiguous, ascending, and each block paired with its own results"


class ReorgDetected(Conflict):
    code = "reorg_detected"

    def __init__(self, *, height: int, expected_parent: str, got_parent: str):
        super().__init__(
            f"block {height} has parent {got_parent[:16]}… but the stored block {height - 1} is "
            f"{expected_parent[:16]}…"
        )
        self.height = height


class NotNextHeight(Conflict):
    code = "not_next_height"


BLOCK_COLUMNS = ["chain_id", "height", "hash", "parent_hash", "time", "proposer", "tx_count"]
TX_COLUMNS = ["chain_id", "height", "index", "hash", "code", "gas_wanted", "gas_used"]
EVENT_COLUMNS = ["chain_id", "height", "phase", "tx_index", "event_index", "type", "attributes"]


def block_row(chain_id: int, item: IndexedBlock) -> tuple[Any, ...]:
    b = item.block
    return (chain_id, b.height, b.hash, b.parent_hash, b.time, b.proposer, len(b.txs))


def tx_rows(chain_id: int, item: IndexedBlock) -> Iterable[tuple[Any, ...]]:
    hashes = item.block.tx_hashes  # computed once per block: it hashes every tx
    for tx in item.results.txs:
        tx_hash = hashes[tx.index] if tx.index < len(hashes) else ""
        yield (chain_id, item.height, tx.index, tx_hash, tx.code, tx.gas_wanted, tx.gas_used)


# jsonb's binary input is a version byte (1) and the JSON text. A jsonb column is COPYed as these
# bytes, passed through as they are (`_copy`): no JSON dumper call and no text per value.
_JSONB_VERSION = b"\x01"
_JSONB_OID = 3802
_BYTEA_OID = 17


def _jsonb(value: Any) -> bytes:
    # orjson writes the frozen attribute dataclasses as {"key", "value", "index"} objects itself (no
    # dict per attribute); a canonical text never holds what it refuses (lone surrogates, see parse).
    return _JSONB_VERSION + orjson.dumps(value)


_BLOCK_PHASES = (Phase.BEGIN_BLOCK.value, Phase.END_BLOCK.value, Phase.FINALIZE_BLOCK.value)


def copy_event_rows(chain_id: int, item: IndexedBlock) -> Iterable[tuple[Any, ...]]:
    """`event_rows` for the binary COPY: the same identities in the same order, the attributes as
    jsonb's binary input (`_jsonb`), encoded by orjson straight from the parsed dataclasses."""
    height, results = item.height, item.results
    for phase, events in zip(
        _BLOCK_PHASES,
        (results.begin_block_events, results.end_block_events, results.finalize_block_events),
        strict=True,
    ):
        for i, event in enumerate(events):
            yield (chain_id, height, phase, None, i, event.type[:200], _jsonb(event.attributes))
    tx_phase = Phase.TX.value
    for tx in results.txs:
        tx_index = tx.index
        for i, event in enumerate(tx.events):
            yield (chain_id, height, tx_phase, tx_index, i, event.type[:200], _jsonb(event.attributes))


@dataclass(frozen=True, slots=True)
class BlockRows:
    """One block's rows as `blocks_commit` COPYs them, for one chain, with or without its pending
    enrichment rows."""

    chain_id: int
    enrichment: bool
    block: tuple[Any, ...]
    txs: list[tuple[Any, ...]]
    events: list[tuple[Any, ...]]
    enrichments: list[tuple[Any, ...]]


def _built_ahead(chain_id: int, item: IndexedBlock, *, enrichment: bool) -> BlockRows | None:
    """The rows built ahead (`prepare_rows`) when they are for this chain and enrichment setting (a
    live setting may have changed since)."""
    ready = item.rows
    if type(ready) is BlockRows and ready.chain_id == chain_id and ready.enrichment == enrichment:
        return ready
    return None


def block_rows(chain_id: int, item: IndexedBlock, *, enrichment: bool) -> BlockRows:
    """The block's rows: the ones built ahead, else built now."""
    ready = _built_ahead(chain_id, item, enrichment=enrichment)
    if ready is not None:
        return ready
    return BlockRows(
        chain_id=chain_id,
        enrichment=enrichment,
        block=block_row(chain_id, item),
        txs=list(tx_rows(chain_id, item)),
        events=list(copy_event_rows(chain_id, item)),
        enrichments=enrichment_rows_for(chain_id, item) if enrichment else [],
    )


def prepare_rows(item: IndexedBlock, *, chain_id: int, enrichment: bool) -> IndexedBlock:
    """The block with its rows built now: the catch-up's fetching threads do this while the runner's
    thread waits on PostgreSQL, so the commit only writes them (the same rows, see `block_rows`)."""
    return dataclasses.replace(item, rows=block_rows(chain_id, item, enrichment=enrichment))


# Column types of the tables COPYed into, read once per process: a binary COPY applies no casts, so
# every value is encoded as its column's own type.
_COLUMN_TYPES: dict[tuple[str, tuple[str, ...]], list[int]] = {}


def _column_types(cursor: Any, table: str, columns: Sequence[str]) -> list[int]:
    key = (table, tuple(columns))
    if key not in _COLUMN_TYPES:
        cursor.execute(
            "SELECT attname, atttypid::int FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0",
            [table],
        )
        types = dict(cursor.fetchall())
        # A jsonb value arrives as its binary input (`_jsonb`), which bytea's dumper passes through.
        _COLUMN_TYPES[key] = [_BYTEA_OID if types[c] == _JSONB_OID else types[c] for c in columns]
    return _COLUMN_TYPES[key]


def _copy(table: str, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]) -> int:
    """Binary COPY: no text formatting and parsing of every value on either side. jsonb values are
    given as `_jsonb` bytes (or None)."""
    count = 0
    with connection.cursor() as cursor:
        raw = cursor.cursor  # psycopg's cursor: COPY is not part of the DB-API
        types = _column_types(raw, table, columns)
        # By oid, bytea is dumped by psycopg's DB-API `Binary` dumper, written in Python; this
        # cursor's bytes go through the compiled one.
        raw.adapters.register_dumper(None, BytesBinaryDumper)
        with raw.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(types)
            write_row = copy.write_row
            for row in rows:
                write_row(row)
                count += 1
    return count


def _check_batch(blocks: Sequence[IndexedBlock]) -> None:
    if not blocks:
        raise ValidationFailed(BATCH_NOT_CONTIGUOUS)
    for prev, item in zip([None, *blocks[:-1]], blocks, strict=True):
        if item.block.height != item.results.height:
            raise ValidationFailed(BATCH_NOT_CONTIGUOUS)
        if prev is not None:
            if item.height != prev.height + 1:
                raise ValidationFailed(BATCH_NOT_CONTIGUOUS)
            if item.block.parent_hash != prev.block.hash:
                raise ReorgDetected(
                    height=item.height, expected_parent=prev.block.hash, got_parent=item.block.parent_hash
                )


def blocks_commit(*, chain: Chain, blocks: Sequence[IndexedBlock], lease: LeaseGrant) -> int:
    """Write a contiguous batch of blocks atomically; returns the new last indexed height."""
    _check_batch(blocks)
    first = blocks[0]
    with transaction.atomic():
        lease_assert_held(name=lease.name, token=lease.token)
        state = IndexerState.objects.select_for_update().get(chain=chain)
        previous = state.last_indexed_height
        if previous is not None:
            if first.height != previous + 1:
                raise NotNextHeight(f"next height is {previous + 1}, not {first.height}")
            stored_parent = (
                Block.objects.filter(chain=chain, height=previous).values_list("hash", flat=True).first()
            )
            if stored_parent is not None and stored_parent != first.block.parent_hash:
                raise ReorgDetected(
                    height=first.height, expected_parent=stored_parent, got_parent=first.block.parent_hash
                )
        pk, enrichment = chain.pk, chain.enrichment_enabled
        # Rows built ahead are written as they are; the others are built while they stream to the
        # server (PostgreSQL works on the first rows while the next are built).
        ahead = [(b, _built_ahead(pk, b, enrichment=enrichment)) for b in blocks]
        rows: dict[str, int] = {}
        rows["block"] = _copy(
            Block._meta.db_table, BLOCK_COLUMNS, (r.block if r else block_row(pk, b) for b, r in ahead)
        )
        rows["transaction"] = _copy(
            Transaction._meta.db_table,
            TX_COLUMNS,
            (t for b, r in ahead for t in (r.txs if r else tx_rows(pk, b))),
        )
        rows["event"] = _copy(
            Event._meta.db_table,
            EVENT_COLUMNS,
            (e for b, r in ahead for e in (r.events if r else copy_event_rows(pk, b))),
        )
        if enrichment:
            rows["enrichment"] = _copy(
                Enrichment._meta.db_table,
                ENRICHMENT_COPY_COLUMNS,
                (e for b, r in ahead for e in (r.enrichments if r else enrichment_rows_for(pk, b))),
            )
        for producer in producers():
            producer.write(chain, blocks)
        last = blocks[-1].height
        cas_update(
            IndexerState.objects.filter(chain=chain, last_indexed_height=previous),
            operation="indexer_advance",
            last_indexed_height=last,
            oldest_indexed_height=state.oldest_indexed_height
            if state.oldest_indexed_height is not None
            else first.height,
            poison_height=None,
            poison_attempts=0,
        )
        if previous is None:
            Chain.objects.filter(pk=chain.pk, fingerprint="").update(fingerprint=first.block.hash)
    for table, count in rows.items():
        ROWS.labels(chain=chain.slug, table=table).inc(count)
    return last


def blocks_rollback(*, chain: Chain, to_height: int, lease: LeaseGrant, actor: Actor, reason: str) -> int:
    """Delete every derived row above `to_height` (producers' included) in one transaction and move
    the indexed height back. Returns how many blocks were removed."""
    with transaction.atomic():
        lease_assert_held(name=lease.name, token=lease.token)
        state = IndexerState.objects.select_for_update().get(chain=chain)
        current = state.last_indexed_height
        if current is None or to_height >= current:
            return 0
        for producer in producers():
            producer.rollback(chain, to_height)
        Enrichment.objects.filter(chain=chain, height__gt=to_height).delete()
        Event.objects.filter(chain=chain, height__gt=to_height).delete()
        Transaction.objects.filter(chain=chain, height__gt=to_height).delete()
        removed, _ = Block.objects.filter(chain=chain, height__gt=to_height).delete()
        cas_update(
            IndexerState.objects.filter(chain=chain, last_indexed_height=current),
            operation="indexer_rollback",
            last_indexed_height=to_height,
        )
        record(
            action="indexer.rolled_back",
            actor=actor,
            org=chain.org,
            target=chain,
            reason=reason,
            changes={"last_indexed_height": [current, to_height]},
            metadata={"depth": current - to_height, "blocks_removed": removed},
        )
    return removed


def blocks_rewrite(*, chain: Chain, blocks: Sequence[IndexedBlock], lease: LeaseGrant) -> int:
    """Re-write the rows of already indexed heights whose blocks are unchanged (same hashes) but
    whose stored rows differ from the source (`indexer_reindex`). One fenced transaction; the
    indexed height does not move. Returns the number of heights rewritten."""
    if not blocks:
        return 0
    heights = [b.height for b in blocks]
    with transaction.atomic():
        lease_assert_held(name=lease.name, token=lease.token)
        state = IndexerState.objects.select_for_update().get(chain=chain)
        last = state.last_indexed_height
        if last is None or max(heights) > last:
            raise ValidationFailed(REWRITE_NOT_INDEXED.format(last=last))
        stored = dict(Block.objects.filter(chain=chain, height__in=heights).values_list("height", "hash"))
        for b in blocks:
            if stored.get(b.height, b.block.hash) != b.block.hash:
                raise ReorgDetected(
                    height=b.height, expected_parent=stored[b.height], got_parent=b.block.hash
                )
        Enrichment.objects.filter(chain=chain, height__in=heights).delete()
        Event.objects.filter(chain=chain, height__in=heights).delete()
        Transaction.objects.filter(chain=chain, height__in=heights).delete()
        Block.objects.filter(chain=chain, height__in=heights).delete()
        _copy(Block._meta.db_table, BLOCK_COLUMNS, (block_row(chain.pk, b) for b in blocks))
        _copy(Transaction._meta.db_table, TX_COLUMNS, (r for b in blocks for r in tx_rows(chain.pk, b)))
        _copy(Event._meta.db_table, EVENT_COLUMNS, (r for b in blocks for r in copy_event_rows(chain.pk, b)))
        if chain.enrichment_enabled:
            _copy(
                Enrichment._meta.db_table,
                ENRICHMENT_COPY_COLUMNS,
                (r for b in blocks for r in enrichment_rows_for(chain.pk, b)),
            )
    return len(blocks)
