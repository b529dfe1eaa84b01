"""B3's raw pipeline: the least a script must do to index the simulator's blocks, as the baseline for
`indexer_run` end to end (fetch + parse + commit).

- fetch: `/block` + `/block_results` per height over keep-alive `http.client` connections (one per
  worker thread), `max_in_flight` heights at once, like the indexer;
- parse: orjson, and nothing checked: the rows are read straight out of the JSON tree (0.37+/0.38
  text attributes, the simulator's default shape); the attribute lists are written back as JSON by
  orjson as they came;
- commit: binary COPY of the same rows (blocks, transactions, events and pending enrichment rows) into
  the same tables, one transaction per `batch` blocks, while the worker threads fetch and parse the
  next heights.

The rows equal the indexer's (the benchmark compares checksums), so the difference in time is what
the indexer's guarantees and structure cost: strict parsing, the writer lease, linkage checks, the
state row, its process start-up.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import http.client
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

BYTEA_OID = 17
JSONB_OID = 3802
# Block-level phases in the indexer's order (`indexer.blocks.event_rows`); then the txs' events.
PHASES = ("begin_block", "end_block", "finalize_block")
Rows = tuple[tuple[Any, ...], list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]


def _time(text: str) -> datetime:
    head, _, rest = text.partition(".")
    if not rest:
        return datetime.fromisoformat(head.replace("Z", "+00:00"))
    digits = rest.rstrip("Z")
    zone = "+00:00" if rest.endswith("Z") else ""
    return datetime.fromisoformat(f"{head}.{digits[:6].ljust(6, '0')}{zone}")


def _jsonb(value: Any) -> bytes:
    # jsonb's binary COPY format: a version byte, then the JSON text.
    return b"\x01" + orjson.dumps(value)


class _Fetcher:
    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.local = threading.local()

    def get(self, path: str) -> Any:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        conn.request("GET", path)
        return orjson.loads(conn.getresponse().read())["result"]


def _rows(fetcher: _Fetcher, chain_pk: int, height: int, pending: str, now: datetime) -> Rows:
    block = fetcher.get(f"/block?height={height}")
    results = fetcher.get(f"/block_results?height={height}")
    header = block["block"]["header"]
    txs = block["block"]["data"]["txs"] or []
    block_row = (
        chain_pk,
        height,
        block["block_id"]["hash"].upper(),
        header["last_block_id"]["hash"].upper(),
        _time(header["time"]),
        header["proposer_address"].upper(),
        len(txs),
    )
    hashes = [hashlib.sha256(base64.b64decode(tx)).hexdigest().upper() for tx in txs]
    tx_rows = []
    events: list[tuple[Any, ...]] = []
    for phase in PHASES:
        for i, event in enumerate(results.get(f"{phase}_events") or ()):
            events.append((phase, None, i, event))
    for index, tx in enumerate(results["txs_results"] or ()):
        tx_rows.append(
            (
                chain_pk,
                height,
                index,
                hashes[index],
                tx.get("code", 0),
                int(tx["gas_wanted"]),
                int(tx["gas_used"]),
            )
        )
        for i, event in enumerate(tx.get("events") or ()):
            events.append(("tx", index, i, event))
    event_rows, enrichment_rows = [], []
    for phase, tx_index, i, event in events:
        attributes = event.get("attributes") or []
        event_rows.append((chain_pk, height, phase, tx_index, i, event["type"], _jsonb(attributes)))
        if event["type"] == "payload":
            values: dict[str, str] = {}
            for a in attributes:
                values.setdefault(a["key"], a["value"])
            if values.get("data"):
                enrichment_rows.append(
                    (chain_pk, height, phase, tx_index, i, values.get("encoding", "")[:40], values["data"],
                     pending, 0, now, "", None, now)
                )  # fmt: skip
    return block_row, tx_rows, event_rows, enrichment_rows


def raw_pipeline(
    *,
    url: str,
    chain_pk: int,
    heights: range,
    max_in_flight: int,
    batch: int,
    tables: Sequence[tuple[str, Sequence[str], Sequence[int]]],
) -> float:
    """Index `heights` from the simulator at `url` into the tables (block, transaction, event and, when
    a fourth is given, enrichment: (name, columns, type oids)). Returns the seconds it took."""
    from django.db import connection, transaction

    from indexer.models import EnrichmentStatus

    pending_status = EnrichmentStatus.PENDING.value
    fetcher = _Fetcher(url)
    now = datetime.now().astimezone()
    # jsonb columns take their binary form as bytes (declared as bytea for psycopg's dumper).
    oids = [[BYTEA_OID if oid == JSONB_OID else oid for oid in t[2]] for t in tables]
    previous = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=max_in_flight) as pool:
            pending: deque[Future[Rows]] = deque()
            ahead = iter(heights)
            for height in ahead:  # keep a batch and the workers' share in flight
                pending.append(pool.submit(_rows, fetcher, chain_pk, height, pending_status, now))
                if len(pending) >= batch + max_in_flight:
                    break
            done = 0
            while pending:
                parts: list[Rows] = []
                while pending and len(parts) < batch:
                    parts.append(pending.popleft().result())
                    following = next(ahead, None)
                    if following is not None:
                        pending.append(pool.submit(_rows, fetcher, chain_pk, following, pending_status, now))
                with transaction.atomic(), connection.cursor() as cursor:
                    columns: list[list[tuple[Any, ...]]] = [
                        [p[0] for p in parts],
                        [r for p in parts for r in p[1]],
                        [r for p in parts for r in p[2]],
                        [r for p in parts for r in p[3]],
                    ]
                    for (table, names, _), types, rows in zip(tables, oids, columns, strict=False):
                        sql = f"COPY {table} ({', '.join(names)}) FROM STDIN (FORMAT BINARY)"
                        with cursor.cursor.copy(sql) as copy:
                            copy.set_types(types)
                            for row in rows:
                                copy.write_row(row)
                done += len(parts)
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()
    assert done == len(heights), (done, len(heights))
    return time.perf_counter() - started
