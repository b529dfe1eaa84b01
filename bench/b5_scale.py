"""B5 at scale: the events API and the admin changelists over partitioned forever tables, flat from
1M to 20M events (BENCHMARKS.md B5: "p95 at 20M within 1.2x of 1M (partitioned tables)").

One database per size (`<db>_<size>`, e.g. fleetops_bench_b5s_1m and ..._20m), each seeded inside
PostgreSQL: the chain's height ranges created by `indexer.partitions.partitions_ensure` (what the
writer does ahead of ingest), then `INSERT ... SELECT ... FROM generate_series` of blocks, 100 txs
and 303 events per height (the row shapes and attribute pool of `bench.b5_reads`), chunked, with
the foreign-key triggers skipped (superuser), then VACUUM ANALYZE. `--reuse` keeps a database that
is already seeded to its size (20M events take ~10 min to seed; the disk needs ~15 GB for them).

The measurements alternate between the sizes in `--rounds` rounds, so the machine's load drifts
into both alike. Per round and size, after a warm-up:
- API: `GET /api/v1/indexer/chains/sim/events?page_size=50` (viewer token, in-process APIClient) at
  pages 1, 100, 1,000 and 10,000 (cursors minted through the pagination's signing for the keyset
  position found in SQL, as `bench.b5_reads` does), `--samples` each; beside each request the raw
  keyset SQL + json.dumps (`bench.b5_reads._raw_page`) for reference;
- admin: the block, transaction and event changelists (superuser), unfiltered and ?chain=<id>.
Goal: pooled p95 of the largest size within 1.2x of the smallest, for the API and for the admin.

    python -m bench.b5_scale [--events 1000000,20000000] [--rounds 3] [--samples 20] [--reuse]
    python -m bench.b5_scale --events 200000,2000000          # a quick check (~2 min to seed)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

from bench._indexer import percentile
from bench.b5_reads import (
    BLOCK_EVENT_TYPES,
    EVENTS_PER_BLOCK,
    TX_EVENT_TYPES,
    TXS_PER_BLOCK,
    _attribute_pool,
    _first_cursor,
    _raw_page,
)
from bench.common import Timer, result_line

GOAL = 1.2
PAGE_SIZE = 50
TARGET_PAGES = (1, 100, 1_000, 10_000)
ADMIN_PAGES = ("block", "transaction", "event")
CHUNK_HEIGHTS = 2_000  # ~600k events per statement


def _label(size: int) -> str:
    return f"{size / 1e6:g}m".replace(".", "_")


# --- databases -------------------------------------------------------------------------------------


def _use(db: str) -> None:
    """Point Django's default connection at `db` (closed first; reopened on the next query)."""
    from django.db import connection

    connection.close()
    connection.settings_dict["NAME"] = db


def _database_exists(base_url: str, db: str) -> bool:
    import psycopg

    from fleetops.devtools.services import _libpq, with_database

    with psycopg.connect(_libpq(with_database(base_url, "postgres")), autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [db]).fetchone() is not None


def _seeded_events(db: str) -> int:
    from django.db import DatabaseError, connection

    _use(db)
    try:
        with connection.cursor() as cur:
            cur.execute(
                "SELECT s.last_indexed_height FROM indexer_indexerstate s JOIN indexer_chain c "
                "ON c.id = s.chain_id WHERE c.slug = 'sim'"
            )
            row = cur.fetchone()
    except DatabaseError:
        return 0
    return int(row[0] or 0) * EVENTS_PER_BLOCK if row else 0


def _seed(db: str, size: int, base_url: str) -> None:
    from django.core.management import call_command
    from django.db import connection

    from fleetops.devtools.services import drop_database, ensure_database, with_database

    url = with_database(base_url, db)
    drop_database(url)
    ensure_database(url)
    _use(db)
    call_command("migrate", verbosity=0)
    from django.contrib.auth import get_user_model

    from fleetops.access.models import Membership, Organization, Role
    from indexer import partitions
    from indexer.models import Chain, IndexerState

    org = Organization.objects.create(slug="demo", name="Demo Fleet Co")
    chain = Chain.objects.create(
        org=org, slug="sim", chain_id="fleetops-sim-1", expected_block_time_seconds=1
    )
    IndexerState.objects.create(chain=chain)
    User = get_user_model()
    viewer = User.objects.create_user(username="b5-viewer", password="x" * 16)
    Membership.objects.create(user=viewer, org=org, role=Role.VIEWER)
    User.objects.create_superuser(username="b5-admin", password="x" * 16, email="b5@example.com")
    heights = -(-size // EVENTS_PER_BLOCK)
    partitions.partitions_ensure(chain=chain, up_to_height=heights, from_height=1)
    tables = ("indexer_block", "indexer_transaction", "indexer_event")
    ranges = {t: partitions.range_partitions(chain_pk=chain.pk, table=t) for t in tables}
    pool = _attribute_pool()
    started = time.monotonic()
    with connection.cursor() as cur:
        cur.execute("SET session_replication_role = replica")  # FK checks: consistent by construction
        # Bulk load: each range is detached and loaded without indexes, then attached again, which
        # builds its indexes by sorting once (~5x faster than maintaining five B-trees row by row).
        for table in tables:
            parent = partitions.chain_partition(table, chain.pk)
            for part in ranges[table]:
                cur.execute(f"ALTER TABLE {parent} DETACH PARTITION {part.name}")
                cur.execute(f"DROP TABLE {part.name}")
                cur.execute(
                    f"CREATE TABLE {part.name} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
                )
        for i, part in enumerate(ranges["indexer_block"]):
            names = {t: ranges[t][i].name for t in tables}
            for first in range(max(1, part.start), min(part.end - 1, heights) + 1, CHUNK_HEIGHTS):
                last = min(first + CHUNK_HEIGHTS - 1, part.end - 1, heights)
                _insert_heights(cur, names, chain.pk, first, last, pool)
                done = last * EVENTS_PER_BLOCK
                rate = done / (time.monotonic() - started)
                print(f"  {db}: {done:,} events ({rate:,.0f}/s)", end="\r", flush=True)
        loaded = time.monotonic() - started
        for table in tables:
            parent = partitions.chain_partition(table, chain.pk)
            for part in ranges[table]:
                cur.execute(
                    f"ALTER TABLE {parent} ATTACH PARTITION {part.name} "
                    f"FOR VALUES FROM ({part.start}) TO ({part.end})"
                )
        cur.execute("SET session_replication_role = DEFAULT")
        cur.execute(
            "UPDATE indexer_indexerstate SET last_indexed_height = %s, oldest_indexed_height = 1, "
            "head_height = %s, mode = 'normal' WHERE chain_id = %s",
            [heights, heights, chain.pk],
        )
        for table in tables:
            cur.execute(f"VACUUM ANALYZE {table}")
    print(
        f"\n  {db}: seeded {heights * EVENTS_PER_BLOCK:,} events in {time.monotonic() - started:.0f}s "
        f"(rows {loaded:.0f}s, then indexes on attach and VACUUM ANALYZE)"
    )


def _insert_heights(
    cur: Any, names: dict[str, str], chain_pk: int, first: int, last: int, pool: dict[str, list[str]]
) -> None:
    """Blocks, txs and events of heights [first, last] into the tables `names` maps the three to
    (here: detached range partitions), one INSERT ... SELECT each (autocommit)."""
    span = [chain_pk, first, last]
    cur.execute(
        f"INSERT INTO {names['indexer_block']} "
        "(chain_id, height, hash, parent_hash, time, proposer, tx_count) "
        "SELECT %s, h, upper(encode(sha256(('b5|' || h)::bytea), 'hex')), "
        "upper(encode(sha256(('b5|' || (h - 1))::bytea), 'hex')), "
        "timestamptz '2026-01-01' + h * interval '1 second', repeat('AB', 20), %s "
        "FROM generate_series(%s::bigint, %s::bigint) h",
        [chain_pk, TXS_PER_BLOCK, first, last],
    )
    cur.execute(
        f"INSERT INTO {names['indexer_transaction']} "
        "(chain_id, height, index, hash, code, gas_wanted, gas_used) "
        "SELECT %s, h, i, upper(md5(h || '-' || i) || md5(i || '-' || h)), 0, 150000, 90000 "
        f"FROM generate_series(%s::bigint, %s::bigint) h, generate_series(0, {TXS_PER_BLOCK - 1}) i",
        span,
    )
    block_pools = [pool[kind] for kind in BLOCK_EVENT_TYPES]
    tx_pools = [pool[kind] for kind in TX_EVENT_TYPES]
    cur.execute(
        f"INSERT INTO {names['indexer_event']} "
        "(chain_id, height, phase, tx_index, event_index, type, attributes) "
        "SELECT %s, h, 'finalize_block', NULL, e, (%s::text[])[e + 1], "
        "(%s::jsonb[])[e * 200 + 1 + (h * 7) %% 200] "
        "FROM generate_series(%s::bigint, %s::bigint) h, generate_series(0, 2) e",
        [chain_pk, list(BLOCK_EVENT_TYPES), [a for p in block_pools for a in p], first, last],
    )
    cur.execute(
        f"INSERT INTO {names['indexer_event']} "
        "(chain_id, height, phase, tx_index, event_index, type, attributes) "
        "SELECT %s, h, 'tx', t, e, (%s::text[])[e + 1], "
        "(%s::jsonb[])[e * 200 + 1 + (h * 7 + t * 3 + e) %% 200] "
        f"FROM generate_series(%s::bigint, %s::bigint) h, generate_series(0, {TXS_PER_BLOCK - 1}) t, "
        "generate_series(0, 2) e",
        [chain_pk, list(TX_EVENT_TYPES), [a for p in tx_pools for a in p], first, last],
    )


# --- measuring -------------------------------------------------------------------------------------


class Target:
    """One seeded database: its clients and the cursors of the sampled pages."""

    def __init__(self, db: str, size: int):
        from django.core import signing
        from django.db import connection
        from django.test import Client
        from rest_framework.test import APIClient

        from fleetops.access.models import Organization, Role
        from fleetops.access.services import api_token_create
        from fleetops.api import pagination
        from fleetops.audit.actors import Actor
        from indexer import partitions
        from indexer.models import Chain

        _use(db)
        self.db, self.size = db, size
        self.chain = Chain.objects.get(slug="sim")
        from django.contrib.auth import get_user_model

        User = get_user_model()
        viewer = User.objects.get(username="b5-viewer")
        token = api_token_create(
            user=viewer,
            org=Organization.objects.get(slug="demo"),
            token_role=Role.VIEWER,
            name=f"b5-scale-{time.time_ns()}",
            actor=Actor.for_user(viewer),
        )
        self.api = APIClient()
        self.api.credentials(HTTP_AUTHORIZATION=f"Bearer {token.plaintext}")
        self.admin = Client()
        self.admin.force_login(User.objects.get(username="b5-admin"))
        self.path = f"/api/v1/indexer/chains/{self.chain.slug}/events"
        binding = signing.loads(_first_cursor(self.api, self.path, PAGE_SIZE), salt=pagination._SALT)["b"]
        self.pages: dict[int, tuple[str | None, int | None]] = {1: (None, None)}
        with connection.cursor() as cur:
            cur.execute("SELECT count(*) FROM indexer_event WHERE chain_id = %s", [self.chain.pk])
            self.events = int(cur.fetchone()[0])
            for page in TARGET_PAGES[1:]:
                if page * PAGE_SIZE > self.events:
                    continue
                cur.execute(
                    "SELECT id FROM indexer_event WHERE chain_id = %s ORDER BY id DESC OFFSET %s LIMIT 1",
                    [self.chain.pk, (page - 1) * PAGE_SIZE - 1],
                )
                position = int(cur.fetchone()[0])
                cursor = signing.dumps({"p": [position], "b": binding}, salt=pagination._SALT, compress=True)
                self.pages[page] = (str(cursor), position)
        self.ranges = len(partitions.range_partitions(chain_pk=self.chain.pk, table="indexer_event"))
        self.reset()

    def reset(self) -> None:
        self.api_samples: dict[int, list[float]] = {p: [] for p in self.pages}
        self.raw_samples: dict[int, list[float]] = {p: [] for p in self.pages}
        self.admin_samples: dict[str, list[float]] = {}

    def measure(self, samples: int) -> None:
        from django.core.cache import cache
        from django.db import connection

        _use(self.db)
        connection.settings_dict["CONN_MAX_AGE"] = 60
        cache.clear()
        for page, (cursor, position) in self.pages.items():
            query = {"page_size": PAGE_SIZE} | ({"cursor": cursor} if cursor else {})
            for i in range(samples + 2):
                with Timer() as t:
                    response = self.api.get(self.path, query)
                assert response.status_code == 200, response.content[:300]
                with Timer() as r:
                    _raw_page(connection, self.chain.pk, position, PAGE_SIZE)
                if i >= 2:  # warm-up
                    self.api_samples[page].append(t.elapsed)
                    self.raw_samples[page].append(r.elapsed)
        for name in ADMIN_PAGES:
            for suffix in ("", f"?chain={self.chain.pk}"):
                label = f"{name}{'?chain' if suffix else ''}"
                for i in range(max(samples // 2, 3) + 1):
                    with Timer() as t:
                        got = self.admin.get(f"/admin/indexer/{name}/{suffix}")
                    assert got.status_code == 200, (label, got.status_code)
                    if i:
                        self.admin_samples.setdefault(label, []).append(t.elapsed)

    def api_all(self) -> list[float]:
        return [s for v in self.api_samples.values() for s in v]

    def admin_all(self) -> list[float]:
        return [s for v in self.admin_samples.values() for s in v]


def _ms(samples: list[float], q: float) -> str:
    return f"{percentile(samples, q) * 1000:7.2f}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", default="1000000,20000000", help="comma-separated sizes, ascending")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=20, help="API requests per page and round")
    parser.add_argument("--db", default="fleetops_bench_b5s", help="database name prefix")
    parser.add_argument("--reuse", action="store_true", help="keep databases already seeded to their size")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.events.split(",") if s.strip())
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined,unused-ignore]

    from fleetops.devtools.services import ensure_database, start_embedded_postgres, with_database

    embedded = None
    base = os.environ.get("DATABASE_URL")
    if not base:
        embedded, base = start_embedded_postgres()
    dbs = {size: f"{args.db}_{_label(size)}" for size in sizes}
    first_url = with_database(base, dbs[sizes[0]])
    ensure_database(first_url)
    os.environ["DATABASE_URL"] = first_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fleetops.settings.test")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django

    django.setup()
    from django.conf import settings
    from rest_framework.throttling import SimpleRateThrottle

    SimpleRateThrottle.THROTTLE_RATES = {"anon": "1000000/min", "user": "1000000/min"}
    print(
        f"cache for the throttles: {settings.CACHES['default']['BACKEND']}; "
        f"range partitions of {settings.FLEETOPS_INDEXER_PARTITION_HEIGHTS:,} heights"
    )
    for size, db in dbs.items():
        have = _seeded_events(db) if _database_exists(base, db) else 0
        if args.reuse and have >= size:
            print(f"=== {db}: reusing {have:,} events")
            continue
        print(f"=== {db}: seeding {size:,} events")
        _seed(db, size, base)

    targets = [Target(db, size) for size, db in dbs.items()]
    for t in targets:
        print(f"{t.db}: {t.events:,} events in {t.ranges} height range(s); pages {sorted(t.pages)}")
    for t in targets:  # a warm-up round, not recorded: caches, connections, the first plans
        t.measure(3)
        t.reset()
    for n in range(args.rounds):
        for t in targets:
            with Timer() as tm:
                t.measure(args.samples)
            print(f"round {n + 1}/{args.rounds} {t.db}: {tm.elapsed:.0f}s")

    print(f"\n{'':<26}{'p50 ms':>8}{'p95 ms':>8}   (events API page_size={PAGE_SIZE}; admin changelists)")
    for t in targets:
        for page in t.pages:
            print(
                f"{_label(t.size):>6} API page {page:>6,}  {_ms(t.api_samples[page], 0.5)} "
                f"{_ms(t.api_samples[page], 0.95)}   raw keyset SQL + json.dumps "
                f"{_ms(t.raw_samples[page], 0.5)} {_ms(t.raw_samples[page], 0.95)}"
            )
        for label, samples in t.admin_samples.items():
            print(f"{_label(t.size):>6} admin {label:<20}{_ms(samples, 0.5)} {_ms(samples, 0.95)}")
    small, big = targets[0], targets[-1]
    api_ratio = percentile(big.api_all(), 0.95) / percentile(small.api_all(), 0.95)
    admin_ratio = percentile(big.admin_all(), 0.95) / percentile(small.admin_all(), 0.95)
    raw_ratio = percentile([s for v in big.raw_samples.values() for s in v], 0.95) / percentile(
        [s for v in small.raw_samples.values() for s in v], 0.95
    )
    big_label, small_label = _label(big.size), _label(small.size)
    print(
        f"\npooled p95: API {_ms(small.api_all(), 0.95)} ms at {small.events:,} events, "
        f"{_ms(big.api_all(), 0.95)} ms at {big.events:,} (raw query's own ratio {raw_ratio:.2f}); "
        f"admin {_ms(small.admin_all(), 0.95)} ms vs {_ms(big.admin_all(), 0.95)} ms"
    )
    print(
        result_line(
            f"b5_scale_api_{big_label}_vs_{small_label}",
            api_ratio,
            f"{GOAL:.2f} (events API pooled p95 at {big.events:,} / at {small.events:,} events)",
            api_ratio <= GOAL,
        )
    )
    print(
        result_line(
            f"b5_scale_admin_{big_label}_vs_{small_label}",
            admin_ratio,
            f"{GOAL:.2f} (admin changelists pooled p95 at {big.events:,} / at {small.events:,} events)",
            admin_ratio <= GOAL,
        )
    )
    del embedded  # kept alive until here
    return 0


if __name__ == "__main__":
    sys.exit(main())
