"""Native PostgreSQL partitioning of the indexer's forever tables (blocks, transactions, events).

Each of the three tables is partitioned twice (migration `0005_partitioned_forever_tables`)::

    indexer_event                        PARTITION BY LIST (chain_id)
    ├── indexer_event_c7                 FOR VALUES IN (7)   PARTITION BY RANGE (height)
    │   ├── indexer_event_c7_h0          FROM (0) TO (100000)
    │   ├── indexer_event_c7_h100000     FROM (100000) TO (200000)
    │   └── indexer_event_c7_default     DEFAULT: heights no range partition covers yet
    └── indexer_event_default            DEFAULT: rows of a chain that has no partition yet

Why LIST by chain, then RANGE by height (rather than one RANGE on (chain_id, height)):
- every query of the portal names one chain, so it touches that chain's partitions only, and the
  DDL of one chain (a new range, a retention drop) locks that chain's partition, not the others';
- each chain has its own DEFAULT range partition: creating a range only checks (and empties) that
  chain's overflow, never a default shared by every chain;
- within a chain a height predicate prunes whole ranges (rollback, reindex, verify, the API's height
  filters); a keyset page without one (newest events by id) merges one index descent per range of
  the chain (Merge Append), so its cost grows with the chain's number of ranges, never with rows.

Range partitions hold `settings.FLEETOPS_INDEXER_PARTITION_HEIGHTS` heights (default 100,000): at
the ~300 events per block of B3/B5 that is ~30M events (~10 GB with indexes) per event partition,
a week of blocks at 6 s; a chain 20M heights tall has 200 of them, so an unpruned query still plans
a bounded number of partitions, and retention frees space a week at a time. A changed size applies
to ranges created afterwards; existing ranges stay (`partitions_ensure` fills only the gaps).

Ranges are created ahead of ingest (`partitions_ahead`, called by the writer before each commit,
and `partitions_maintain` from the beat task), idempotently, under a per-chain advisory lock, each
table in its own short transaction with a lock timeout. A row no range covers lands in a DEFAULT
partition, so an insert never fails; creating the range later moves those rows into it.

The primary key is (id, chain_id, height) in the database: a key of a partitioned table must hold
the partition key. `id` stays the model's primary key for Django (from one sequence, so still
unique); the identity constraints already lead with (chain_id, height).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import Model

from indexer.models import Block, Chain, Event, Transaction

log = logging.getLogger(__name__)

# The models whose tables are partitioned, in the order every transaction touches them (the
# writer's order: blocks, transactions, events), so two transactions never wait on each other
# in opposite orders.
PARTITIONED: tuple[type[Model], ...] = (Block, Transaction, Event)
# pg_advisory_xact_lock(class, chain id): one partition DDL of a chain at a time (ensure, retention).
LOCK_CLASS = 0x1D3E
# DDL waits at most this long for a lock (a long read on the partition): it is retried next time
# rather than queueing every reader of the table behind it.
LOCK_TIMEOUT = "5s"
_BOUND = re.compile(r"FROM \('?(-?\d+)'?\) TO \('?(-?\d+)'?\)")


def partition_heights() -> int:
    return int(getattr(settings, "FLEETOPS_INDEXER_PARTITION_HEIGHTS", 100_000))


def chain_partition(table: str, chain_pk: int) -> str:
    return f"{table}_c{int(chain_pk)}"


def range_partition(table: str, chain_pk: int, start: int) -> str:
    return f"{chain_partition(table, chain_pk)}_h{int(start)}"


def _q(name: str) -> str:
    return connection.ops.quote_name(name)


def _columns(model: type[Model]) -> str:
    return ", ".join(_q(str(f.column)) for f in model._meta.concrete_fields)


@dataclass(frozen=True)
class RangePartition:
    table: str
    name: str
    start: int
    end: int  # exclusive
    rows: int  # the planner's estimate (pg_class.reltuples), -1 before the first ANALYZE


def range_partitions(*, chain_pk: int, table: str) -> list[RangePartition]:
    """The height ranges of one chain's partition of `table`, lowest first (the DEFAULT one left out)."""
    with connection.cursor() as cur:
        cur.execute(
            """
            SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), c.reltuples::bigint
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = to_regclass(%s)
            """,
            [chain_partition(table, chain_pk)],
        )
        rows = cur.fetchall()
    out = []
    for name, bound, tuples in rows:
        match = _BOUND.search(bound or "")
        if match:
            out.append(RangePartition(table, name, int(match[1]), int(match[2]), int(tuples)))
    return sorted(out, key=lambda p: p.start)


def _exists(name: str) -> bool:
    with connection.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", [name])
        row = cur.fetchone()
    return bool(row and row[0])


def _gaps(low: int, high: int, size: int, taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The size-aligned ranges covering [low, high] minus the ranges already `taken` (their
    remainders when an old size makes them overlap)."""
    first = (low // size) * size
    wanted: list[tuple[int, int]] = []
    for start in range(first, high + 1, size):
        pieces = [(start, start + size)]
        for t_start, t_end in taken:
            cut: list[tuple[int, int]] = []
            for s, e in pieces:
                if t_end <= s or t_start >= e:
                    cut.append((s, e))
                    continue
                if s < t_start:
                    cut.append((s, t_start))
                if t_end < e:
                    cut.append((t_end, e))
            pieces = cut
        wanted += pieces
    return wanted


def _begin(cur: Any, chain_pk: int) -> None:
    """Inside the DDL's transaction: one partition change of the chain at a time, bounded waits."""
    cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", [LOCK_CLASS, int(chain_pk)])
    cur.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")


def _ensure_table(model: type[Model], chain_pk: int, low: int, high: int, size: int) -> list[str]:
    table = model._meta.db_table
    parent = chain_partition(table, chain_pk)
    cols = _columns(model)
    created: list[str] = []
    with transaction.atomic(), connection.cursor() as cur:
        _begin(cur, chain_pk)
        if not _exists(parent):
            # 1. The chain's LIST partition with its DEFAULT and the wanted ranges, built detached
            #    (no lock on the shared table yet); 2. the chain's rows that waited in the table's
            #    DEFAULT move in (writes to it blocked meanwhile); 3. ATTACH, which only takes SHARE
            #    UPDATE EXCLUSIVE on the table (readers and the writer go on) and finds the
            #    DEFAULT already emptied of this chain.
            cur.execute(
                f"CREATE TABLE {_q(parent)} (LIKE {_q(table)} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
                f" PARTITION BY RANGE (height)"
            )
            cur.execute(f"CREATE TABLE {_q(parent + '_default')} PARTITION OF {_q(parent)} DEFAULT")
            for start, end in _gaps(low, high, size, []):
                name = range_partition(table, chain_pk, start)
                cur.execute(
                    f"CREATE TABLE {_q(name)} PARTITION OF {_q(parent)} FOR VALUES FROM ({start}) TO ({end})"
                )
                created.append(name)
            cur.execute(f"LOCK TABLE {_q(table)} IN SHARE UPDATE EXCLUSIVE MODE")
            cur.execute(f"LOCK TABLE {_q(table + '_default')} IN EXCLUSIVE MODE")
            cur.execute(
                f"WITH moved AS (DELETE FROM {_q(table + '_default')} WHERE chain_id = %s RETURNING *) "  # noqa: S608 - names from the models
                f"INSERT INTO {_q(parent)} ({cols}) SELECT {cols} FROM moved",
                [chain_pk],
            )
            cur.execute(
                f"ALTER TABLE {_q(table)} ATTACH PARTITION {_q(parent)} FOR VALUES IN ({int(chain_pk)})"
            )
            return [parent, *created]
        taken = [(p.start, p.end) for p in range_partitions(chain_pk=chain_pk, table=table)]
        gaps = _gaps(low, high, size, taken)
        if not gaps:
            return []
        default = parent + "_default"
        cur.execute(f"LOCK TABLE {_q(parent)} IN SHARE UPDATE EXCLUSIVE MODE")
        cur.execute(f"LOCK TABLE {_q(default)} IN EXCLUSIVE MODE")
        for start, end in gaps:
            name = range_partition(table, chain_pk, start)
            cur.execute(
                f"CREATE TABLE {_q(name)} (LIKE {_q(table)} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
            )
            # Rows the chain's DEFAULT caught for this range (ingest outran the ranges) move in first:
            # ATTACH refuses a DEFAULT that still holds rows of the new range.
            cur.execute(
                f"WITH moved AS (DELETE FROM {_q(default)} WHERE height >= %s AND height < %s RETURNING *) "  # noqa: S608
                f"INSERT INTO {_q(name)} ({cols}) SELECT {cols} FROM moved",
                [start, end],
            )
            cur.execute(
                f"ALTER TABLE {_q(parent)} ATTACH PARTITION {_q(name)} FOR VALUES FROM ({start}) TO ({end})"
            )
            created.append(name)
    return created


def partitions_ensure(*, chain: Chain | int, up_to_height: int, from_height: int | None = None) -> list[str]:
    """Create the missing range partitions of `chain` covering [from_height, up_to_height] in every
    forever table (from_height None: from the chain's lowest range, or `up_to_height`'s own range
    when it has none). Idempotent and safe to run concurrently. Returns the partitions created."""
    chain_pk = chain.pk if isinstance(chain, Chain) else int(chain)
    size = partition_heights()
    created: list[str] = []
    for model in PARTITIONED:
        low = from_height
        if low is None:
            existing = range_partitions(chain_pk=chain_pk, table=model._meta.db_table)
            low = existing[0].start if existing else up_to_height
        created += _ensure_table(model, chain_pk, max(0, min(low, up_to_height)), up_to_height, size)
    if created:
        log.info("indexer partitions created", extra={"chain": chain_pk, "partitions": created})
    return created


def covered_until(*, chain_pk: int) -> int | None:
    """The first height no range partition of the chain covers in some table (None: none yet)."""
    ends = []
    for model in PARTITIONED:
        ranges = range_partitions(chain_pk=chain_pk, table=model._meta.db_table)
        if not ranges:
            return None
        ends.append(ranges[-1].end)
    return min(ends)


# chain pk -> the first height not covered, as this process last saw it (the writer's fast path).
_covered: dict[int, int] = {}


def partitions_ahead(chain: Chain, height: int) -> None:
    """The writer's hook before a commit that reaches `height`: keep at least half a partition of
    ranges ahead of it, creating the next one when the headroom runs short. Costs nothing (no
    query) while the headroom lasts. A failure (a lock timeout behind a long read) is logged and
    left for the next call: the DEFAULT partitions take the rows meanwhile."""
    size = partition_heights()
    if _covered.get(chain.pk, -1) - height > size // 2:
        return
    try:
        partitions_ensure(chain=chain, up_to_height=height + size, from_height=height)
        _covered[chain.pk] = covered_until(chain_pk=chain.pk) or 0
    except DatabaseError:
        log.warning("indexer partitions not created ahead", exc_info=True, extra={"chain": chain.slug})
        connection.close_if_unusable_or_obsolete()


def partitions_forget() -> None:
    """Drop the writer's cached coverage (tests; after a retention drop or a restore)."""
    _covered.clear()
