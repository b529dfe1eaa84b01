"""B5's rows: blocks, transactions and events of realistic shape, bulk-loaded with binary COPY, and
the concurrent writer that keeps appending blocks while the reads are measured (bench.b5_reads,
bench.b5_console, bench.b5_scale and bench.b6_load share them)."""

from __future__ import annotations

import json
import signal
from typing import Any

TXS_PER_BLOCK = 100
EVENTS_PER_TX = 3
BLOCK_EVENTS = 3
EVENTS_PER_BLOCK = BLOCK_EVENTS + TXS_PER_BLOCK * EVENTS_PER_TX


# --- rows ----------------------------------------------------------------------------------------------


def _attribute_pool() -> dict[str, list[str]]:
    """Realistic attribute lists (~150-250 bytes of JSON), pre-serialized: loading is COPY-bound."""
    import random

    rng = random.Random(5)

    def addr() -> str:
        return "sim1" + "".join(rng.choice("023456789acdefghjklmnpqrstuvwxyz") for _ in range(38))

    def attrs(*pairs: tuple[str, str]) -> str:
        return json.dumps([{"key": k, "value": v, "index": True} for k, v in pairs])

    pool: dict[str, list[str]] = {}
    for _ in range(200):
        pool.setdefault("transfer", []).append(
            attrs(("sender", addr()), ("recipient", addr()), ("amount", f"{rng.randint(1, 10**6)}utok"))
        )
        pool.setdefault("message", []).append(
            attrs(
                ("action", rng.choice(["transfer", "mint", "nft_transfer"])),
                ("module", "sim"),
                ("sender", addr()),
            )
        )
        pool.setdefault("coin_spent", []).append(
            attrs(("spender", addr()), ("amount", f"{rng.randint(1, 10**4)}utok"))
        )
        pool.setdefault("coin_received", []).append(
            attrs(("receiver", addr()), ("amount", f"{rng.randint(1, 10**4)}utok"))
        )
        pool.setdefault("coinbase", []).append(
            attrs(("minter", addr()), ("amount", f"{rng.randint(1, 10**4)}utok"))
        )
        pool.setdefault("fee_market", []).append(
            attrs(("base_fee", str(rng.randint(1000, 2000))), ("mode", "EndBlock"))
        )
    return pool


TX_EVENT_TYPES = ("message", "transfer", "coin_spent")
BLOCK_EVENT_TYPES = ("coin_received", "coinbase", "fee_market")


def _block_rows(
    chain_pk: int, height: int, pool: dict[str, list[str]]
) -> tuple[list[Any], list[Any], list[Any]]:
    import hashlib
    from datetime import UTC, datetime, timedelta

    from psycopg.types.json import Jsonb

    block_hash = hashlib.sha256(f"b5|{height}".encode()).hexdigest().upper()
    parent = hashlib.sha256(f"b5|{height - 1}".encode()).hexdigest().upper() if height > 1 else ""
    at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=height)
    blocks = [(chain_pk, height, block_hash, parent, at, "AB" * 20, TXS_PER_BLOCK)]
    txs = [
        (
            chain_pk,
            height,
            i,
            hashlib.sha256(f"{block_hash}{i}".encode()).hexdigest().upper(),
            0,
            150_000,
            90_000,
        )
        for i in range(TXS_PER_BLOCK)
    ]
    k = height * 7
    events: list[Any] = []
    for i, kind in enumerate(BLOCK_EVENT_TYPES):
        events.append(
            (chain_pk, height, "finalize_block", None, i, kind, Jsonb(pool[kind][k % 200], dumps=_same))
        )
    for tx in range(TXS_PER_BLOCK):
        for i, kind in enumerate(TX_EVENT_TYPES):
            k += 1
            events.append((chain_pk, height, "tx", tx, i, kind, Jsonb(pool[kind][k % 200], dumps=_same)))
    return blocks, txs, events


def _same(text: str) -> str:
    return text


COLUMNS = {
    "indexer_block": ("chain_id", "height", "hash", "parent_hash", "time", "proposer", "tx_count"),
    "indexer_transaction": ("chain_id", "height", "index", "hash", "code", "gas_wanted", "gas_used"),
    "indexer_event": ("chain_id", "height", "phase", "tx_index", "event_index", "type", "attributes"),
}


def _copy_heights(conn: Any, oids: dict[str, list[int]], chain_pk: int, heights: range, pool: Any) -> int:
    blocks: list[Any] = []
    txs: list[Any] = []
    events: list[Any] = []
    for height in heights:
        b, t, e = _block_rows(chain_pk, height, pool)
        blocks += b
        txs += t
        events += e
    with conn.cursor() as cur:
        for table, rows in (
            ("indexer_block", blocks),
            ("indexer_transaction", txs),
            ("indexer_event", events),
        ):
            with cur.copy(f"COPY {table} ({', '.join(COLUMNS[table])}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(oids[table])
                for row in rows:
                    copy.write_row(row)
    return len(events)


def _oids(conn: Any) -> dict[str, list[int]]:
    out = {}
    for table, columns in COLUMNS.items():
        rows = dict(
            conn.execute(
                "SELECT attname, atttypid::int FROM pg_attribute"
                " WHERE attrelid = %s::regclass AND attnum > 0",
                [table],
            ).fetchall()
        )
        out[table] = [rows[c] for c in columns]
    return out


def load_events(conninfo: dict[str, Any], chain_pk: int, first_height: int, events: int) -> int:
    """COPY heights from `first_height` until `events` more events exist; returns the last height."""
    import psycopg

    pool = _attribute_pool()
    heights = -(-events // EVENTS_PER_BLOCK)
    last = first_height + heights - 1
    with psycopg.connect(**conninfo) as conn:
        oids = _oids(conn)
        step = 500  # ~150k events per transaction
        for start in range(first_height, last + 1, step):
            _copy_heights(conn, oids, chain_pk, range(start, min(start + step, last + 1)), pool)
            conn.commit()
        conn.execute(
            "UPDATE indexer_indexerstate SET last_indexed_height = %s, oldest_indexed_height = 1, "
            "head_height = %s, mode = 'normal' WHERE chain_id = %s",
            [last, last, chain_pk],
        )
        conn.commit()
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        for table in COLUMNS:
            conn.execute(f"VACUUM ANALYZE {table}")
    return last


def writer(conninfo: dict[str, Any], chain_pk: int, first_height: int, stop: Any, written: Any) -> None:
    """The concurrent writer: one block of ~303 events every 100 ms, each in its own transaction."""
    import psycopg

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pool = _attribute_pool()
    height = first_height
    with psycopg.connect(**conninfo) as conn:
        oids = _oids(conn)
        while not stop.is_set():
            written.value += _copy_heights(conn, oids, chain_pk, range(height, height + 1), pool)
            conn.execute(
                "UPDATE indexer_indexerstate SET last_indexed_height = %s WHERE chain_id = %s",
                [height, chain_pk],
            )
            conn.commit()
            height += 1
            stop.wait(0.1)
