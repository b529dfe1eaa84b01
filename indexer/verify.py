"""Checksums of indexed heights, computed the same way from the source's blocks and from the stored
rows, so `indexer_verify` can prove a range equals the chain and `indexer_reindex` rewrites only the
heights that differ (a re-index of a correct range writes nothing and is therefore fast).

A height's checksum covers its block row, its transactions and its events (identity, type and
attributes), each normalised (sorted by identity, times as epoch seconds, attributes as Python
values) so the JSONB round trip does not matter.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from indexer.ingest import IndexedBlock, block_row, event_rows, tx_rows
from indexer.models import Block, Chain, Event, Transaction


@dataclass(frozen=True)
class HeightDigest:
    height: int
    block_hash: str
    txs: int
    events: int
    checksum: str


def _norm(value: Any) -> Any:
    return value.timestamp() if isinstance(value, datetime) else value


def _event_key(row: Sequence[Any]) -> tuple[Any, ...]:
    phase, tx_index, event_index = row[0], row[1], row[2]
    return (phase, -1 if tx_index is None else tx_index, event_index)


def _digest(height: int, block: Sequence[Any] | None, txs: list[Any], events: list[Any]) -> HeightDigest:
    txs = sorted(txs)
    events = sorted(events, key=_event_key)
    payload = json.dumps(
        [[_norm(v) for v in block] if block else None, txs, events], sort_keys=True, default=str
    )
    return HeightDigest(
        height=height,
        block_hash=str(block[1]) if block else "",
        txs=len(txs),
        events=len(events),
        checksum=hashlib.sha256(payload.encode()).hexdigest(),
    )


def digests_from_source(items: Iterable[IndexedBlock]) -> dict[int, HeightDigest]:
    """Digests of what `blocks_commit` would write for these blocks (chain id column dropped)."""
    out: dict[int, HeightDigest] = {}
    for item in items:
        block = block_row(0, item)[1:]
        txs = [list(row[2:]) for row in tx_rows(0, item)]
        events = [list(row[2:]) for row in event_rows(0, item, encode=False)]
        out[item.height] = _digest(item.height, block, txs, events)
    return out


def digests_stored(*, chain: Chain, first: int, last: int) -> dict[int, HeightDigest]:
    """Digests of the stored rows in [first, last]: three range scans on the identity indexes."""
    blocks = {
        row[0]: row
        for row in Block.objects.filter(chain=chain, height__range=(first, last)).values_list(
            "height", "hash", "parent_hash", "time", "proposer", "tx_count"
        )
    }
    txs: dict[int, list[Any]] = defaultdict(list)
    for tx in Transaction.objects.filter(chain=chain, height__range=(first, last)).values_list(
        "height", "index", "hash", "code", "gas_wanted", "gas_used"
    ):
        txs[tx[0]].append(list(tx[1:]))
    events: dict[int, list[Any]] = defaultdict(list)
    for row in Event.objects.filter(chain=chain, height__range=(first, last)).values_list(
        "height", "phase", "tx_index", "event_index", "type", "attributes"
    ):
        events[row[0]].append(list(row[1:]))
    heights = set(blocks) | set(txs) | set(events)
    return {h: _digest(h, blocks.get(h), txs[h], events[h]) for h in sorted(heights)}


def range_checksum(digests: Iterable[HeightDigest]) -> str:
    """One checksum for a whole range, in height order."""
    h = hashlib.sha256()
    for digest in sorted(digests, key=lambda d: d.height):
        h.update(f"{digest.height}:{digest.checksum};".encode())
    return h.hexdigest()
