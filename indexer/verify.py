"""Checksums of indexed heights, computed the same way from the source's blocks and from the stored
rows, so `indexer_verify` can prove a range equals the chain and `indexer_reindex` rewrites only the
heights that differ (a re-index of a correct range writes nothing and is therefore fast).

A height's checksum covers its block row, its transactions and its events (identity, type and
attributes). It is built from one canonical text per table that both sides produce without
re-reading anything into Python objects:

- stored rows: PostgreSQL renders them (`string_agg` of `concat_ws('|', ...)` with the attributes as
  `jsonb::text` and the type as a JSON string) and returns only a SHA-256 per height, so no event
  row crosses the wire or is decoded in Python;
- source blocks: the same text in Python, with attributes serialised the way `jsonb_out` prints
  them (keys in jsonb's order `key`, `index`, `value`; `", "` and `": "`; non-ASCII as is; the same
  escapes for quotes, backslashes and control characters).

Attribute keys and values are the parser's one canonical text for their bytes (the text, or `b64:` +
base64 where the bytes are not NUL-free UTF-8; `indexer.rpc.parse`), so a 0.34 source (base64) and a
0.37+ source (text) give the same checksum for the same chain, and the text never holds what jsonb
cannot (NUL, lone surrogates).

Equal texts mean equal values (each text parses back to its value), so a match is exact. A text
that differs only in formatting (a future jsonb change, an attribute shape an old node sent) would
read as "differs"; `indexer_reindex` therefore re-checks such heights with `heights_really_differ`,
a value-by-value comparison of the rows, before it rewrites anything.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from json.encoder import encode_basestring
from typing import Any

from django.db import connection

from indexer.blocks import IndexedBlock
from indexer.ingest import block_row, event_rows, tx_rows
from indexer.models import Block, Chain, Event, Transaction
from indexer.rpc import parse

EMPTY = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class HeightDigest:
    height: int
    block_hash: str
    txs: int
    events: int
    checksum: str


def _norm(value: Any) -> Any:
    return value.timestamp() if isinstance(value, datetime) else value


def _checksum(block: Sequence[Any] | None, tx_digest: str, event_digest: str) -> str:
    head = json.dumps([_norm(v) for v in block] if block else None, default=str)
    return hashlib.sha256(f"{head}\n{tx_digest}\n{event_digest}".encode()).hexdigest()


# --- the source side -----------------------------------------------------------------------------------


def _attributes_text(attributes: Sequence[parse.Attribute]) -> str:
    # jsonb_out's rendering of [{"key", "value", "index"}]: object keys by length, then bytes.
    return (
        "["
        + ", ".join(
            f'{{"key": {encode_basestring(a.key)}, "index": {"true" if a.index else "false"}, '
            f'"value": {encode_basestring(a.value)}}}'
            for a in attributes
        )
        + "]"
    )


def _source_texts(item: IndexedBlock) -> tuple[int, str, int, str]:
    """(tx count, tx text, event count, event text) as `_STORED_SQL` renders the stored rows."""
    txs = sorted(tx_rows(0, item), key=lambda r: r[2])
    tx_text = "\n".join(f"{r[2]}|{r[3]}|{r[4]}|{r[5]}|{r[6]}" for r in txs)
    results = item.results
    events: list[tuple[str, int, int, str, Sequence[parse.Attribute]]] = []
    for phase, phase_events in (
        ("begin_block", results.begin_block_events),
        ("end_block", results.end_block_events),
        ("finalize_block", results.finalize_block_events),
    ):
        for i, event in enumerate(phase_events):
            events.append((phase, -1, i, event.type[:200], event.attributes))
    for tx in results.txs:
        for i, event in enumerate(tx.events):
            events.append(("tx", tx.index, i, event.type[:200], event.attributes))
    # PostgreSQL orders by phase COLLATE "C" (bytes), tx_index NULLS FIRST, event_index.
    events.sort(key=lambda e: (e[0], e[1], e[2]))
    event_text = "\n".join(
        f"{p}|{t}|{i}|{encode_basestring(kind)}|{_attributes_text(attrs)}" for p, t, i, kind, attrs in events
    )
    return len(txs), tx_text, len(events), event_text


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest() if text else EMPTY


def digest_from_source(item: IndexedBlock) -> HeightDigest:
    """The digest of what `blocks_commit` would write for this block (chain id column dropped)."""
    n_txs, tx_text, n_events, event_text = _source_texts(item)
    block = block_row(0, item)[1:]
    return HeightDigest(
        height=item.height,
        block_hash=str(block[1]),
        txs=n_txs,
        events=n_events,
        checksum=_checksum(block, _sha(tx_text), _sha(event_text)),
    )


def digests_from_source(items: Iterable[IndexedBlock]) -> dict[int, HeightDigest]:
    return {item.height: digest_from_source(item) for item in items}


# --- the stored side -----------------------------------------------------------------------------------

# Three range scans on the identity indexes; PostgreSQL renders and hashes each height's rows.
_TX_SQL = """
SELECT height, count(*),
       encode(sha256(convert_to(string_agg(concat_ws('|', "index", hash, code, gas_wanted, gas_used),
                                           E'\\n' ORDER BY "index"), 'UTF8')), 'hex')
FROM indexer_transaction WHERE chain_id = %s AND height BETWEEN %s AND %s GROUP BY height
"""
_EVENT_SQL = """
SELECT height, count(*),
       encode(sha256(convert_to(string_agg(
           concat_ws('|', phase, coalesce(tx_index, -1), event_index, to_json(type)::text,
                     attributes::text),
           E'\\n' ORDER BY phase COLLATE "C", tx_index NULLS FIRST, event_index), 'UTF8')), 'hex')
FROM indexer_event WHERE chain_id = %s AND height BETWEEN %s AND %s GROUP BY height
"""


def digests_stored(*, chain: Chain, first: int, last: int) -> dict[int, HeightDigest]:
    """Digests of the stored rows in [first, last] (heights with any stored row)."""
    blocks = {
        row[0]: row
        for row in Block.objects.filter(chain=chain, height__range=(first, last)).values_list(
            "height", "hash", "parent_hash", "time", "proposer", "tx_count"
        )
    }
    params = [chain.pk, first, last]
    with connection.cursor() as cur:
        cur.execute(_TX_SQL, params)
        txs = {h: (int(n), digest) for h, n, digest in cur.fetchall()}
        cur.execute(_EVENT_SQL, params)
        events = {h: (int(n), digest) for h, n, digest in cur.fetchall()}
    out: dict[int, HeightDigest] = {}
    for h in sorted(set(blocks) | set(txs) | set(events)):
        block = blocks.get(h)
        n_txs, tx_digest = txs.get(h, (0, EMPTY))
        n_events, event_digest = events.get(h, (0, EMPTY))
        out[h] = HeightDigest(
            height=h,
            block_hash=str(block[1]) if block else "",
            txs=n_txs,
            events=n_events,
            checksum=_checksum(block, tx_digest, event_digest),
        )
    return out


def range_checksum(digests: Iterable[HeightDigest]) -> str:
    """One checksum for a whole range, in height order."""
    h = hashlib.sha256()
    for digest in sorted(digests, key=lambda d: d.height):
        h.update(f"{digest.height}:{digest.checksum};".encode())
    return h.hexdigest()


# --- the exact re-check --------------------------------------------------------------------------------


def _event_key(row: Sequence[Any]) -> tuple[Any, ...]:
    phase, tx_index, event_index = row[0], row[1], row[2]
    return (phase, -1 if tx_index is None else tx_index, event_index)


def _rows_of_source(item: IndexedBlock) -> tuple[Any, list[Any], list[Any]]:
    block = [_norm(v) for v in block_row(0, item)[2:]]  # as the stored row below: no height
    txs = sorted(list(row[2:]) for row in tx_rows(0, item))
    events = sorted((list(row[2:]) for row in event_rows(0, item, encode=False)), key=_event_key)
    return block, txs, events


def heights_really_differ(*, chain: Chain, items: Sequence[IndexedBlock]) -> list[IndexedBlock]:
    """The blocks whose stored rows differ from the source value by value (attributes as Python
    values, so no formatting question arises). For the few heights the checksums flag."""
    if not items:
        return []
    heights = [i.height for i in items]
    blocks = {
        row[0]: [_norm(v) for v in row[1:]]
        for row in Block.objects.filter(chain=chain, height__in=heights).values_list(
            "height", "hash", "parent_hash", "time", "proposer", "tx_count"
        )
    }
    txs: dict[int, list[Any]] = defaultdict(list)
    for tx in Transaction.objects.filter(chain=chain, height__in=heights).values_list(
        "height", "index", "hash", "code", "gas_wanted", "gas_used"
    ):
        txs[tx[0]].append(list(tx[1:]))
    events: dict[int, list[Any]] = defaultdict(list)
    for row in Event.objects.filter(chain=chain, height__in=heights).values_list(
        "height", "phase", "tx_index", "event_index", "type", "attributes"
    ):
        events[row[0]].append(list(row[1:]))
    differ = []
    for item in items:
        h = item.height
        stored = (blocks.get(h), sorted(txs[h]), sorted(events[h], key=_event_key))
        if stored != _rows_of_source(item):
            differ.append(item)
    return differ
