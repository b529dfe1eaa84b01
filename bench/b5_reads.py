"""B5: reads over millions of indexed events (the events API and the admin changelists).

Rows (`bench._b5_rows`) are bulk-loaded with binary COPY straight into indexer_block / indexer_transaction /
indexer_event for the chain `sim` of the demo organization (~100 txs and ~303 events per height),
then VACUUM ANALYZE (what autovacuum would have done). While the measurements run, a writer
process keeps appending one block (~303 events) every 100 ms to the same chain.

(a) `GET /api/v1/indexer/chains/sim/events?page_size=50|200` through DRF's APIClient in-process
    (API token of a viewer of the org; throttles on), once for each throttle-counter store named by
    `--caches`: `db` (the embedded default: no CACHE_URL, counters in PostgreSQL) and `redis`
    (CACHE_URL=`--redis-url`, counters in Redis),
    at page 1, 100, 1,000 and 10,000. Pages up to 1,000 are reached by walking `next`; deeper pages
    by a cursor minted through the pagination's own signing for the keyset position found in SQL
    (checked against walked cursors). Baseline, same page, same run, alternating with the API:
    the raw keyset SQL `WHERE chain_id=%s AND id < %s ORDER BY id DESC LIMIT n+1` on psycopg +
    json.dumps of the same fields. Goals: API p95 <= 5x raw, page 10,000 (p50) within 1.5x page 1,
    <= 3 queries per authenticated page (the queries of every sampled page are counted).
(b) the admin changelists of blocks, transactions and events (superuser, test Client), unfiltered
    and filtered by chain, with list_per_page 20 and 100: no exact COUNT(*) over the table, the same
    number of queries for 20 and 100 rows, p95 <= 300 ms.

    python -m bench.b5_reads [--events 1000000,5000000] [--samples 30] [--walk 1000]
        [--caches db,redis] [--redis-url redis://127.0.0.1:6379/9] [--no-admin] [--db fleetops_bench_b5]

The rest of the console (keys, curtailment, audit, outbox, enrichments, the dashboard and its live
fragments, as an operator) is measured by `bench.b5_console` at 1M rows per table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import signal
import statistics
import sys
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from bench._b5_rows import (  # noqa: F401 - re-exported for the other B5/B6 benchmarks
    BLOCK_EVENT_TYPES,
    EVENTS_PER_BLOCK,
    TX_EVENT_TYPES,
    TXS_PER_BLOCK,
    _attribute_pool,
    load_events,
    writer,
)
from bench._indexer import fmt_runs, percentile
from bench.common import Timer, result_line, setup_django

TARGET_PAGES = (1, 100, 1_000, 10_000)
ADMIN_MODELS = ("block", "transaction", "event")
API_FIELDS = ("id", "height", "phase", "tx_index", "event_index", "type", "attributes")


# --- measurement helpers ---------------------------------------------------------------------------


def _cursor_of(next_url: str | None) -> str | None:
    if not next_url:
        return None
    return parse_qs(urlsplit(next_url).query)["cursor"][0]


def _summary(samples: list[float]) -> str:
    return f"p50 {percentile(samples, 0.5) * 1000:6.2f} ms  p95 {percentile(samples, 0.95) * 1000:6.2f} ms"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", default="1000000,5000000", help="comma-separated sizes, ascending")
    parser.add_argument("--samples", type=int, default=30, help="requests per sampled page")
    parser.add_argument("--walk", type=int, default=1_000, help="pages walked by following `next`")
    parser.add_argument("--admin-samples", type=int, default=15)
    parser.add_argument("--no-admin", action="store_true", help="measure the events API only")
    parser.add_argument(
        "--caches", default="db,redis", help="throttle-counter stores to measure the API with: db, redis"
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("CACHE_URL") or "redis://127.0.0.1:6379/9", help="for `redis`"
    )
    parser.add_argument("--db", default="fleetops_bench_b5", help="database to (re)create on the server")
    args = parser.parse_args()
    stores = [c.strip() for c in args.caches.split(",") if c.strip()]
    if not stores or set(stores) - {"db", "redis"}:
        parser.error("--caches takes db and/or redis")
    sizes = [int(s) for s in args.events.split(",") if s.strip()]
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined,unused-ignore]
    # The test settings (DEBUG off), as the other benchmarks; the project package's import would
    # otherwise default to the development settings.
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fleetops.settings.test")
    os.environ.pop("CACHE_URL", None)  # the stores are chosen per measurement below
    server = setup_django(args.db)  # noqa: F841 - keeps an embedded server alive

    from django.contrib.admin import site as admin_site
    from django.contrib.auth import get_user_model
    from django.core import signing
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext, override_settings
    from rest_framework.settings import api_settings
    from rest_framework.test import APIClient

    from fleetops.access.models import Membership, Organization, Role
    from fleetops.access.services import api_token_create
    from fleetops.api import pagination
    from fleetops.audit.actors import Actor
    from fleetops.settings.env import env_cache
    from indexer.models import Block, Chain, Event, IndexerState, Transaction

    # Persistent connections as in production (DB_CONN_MAX_AGE defaults to 60 s); the test settings
    # this benchmark runs on use 0, i.e. a new PostgreSQL connection for every request.
    connection.settings_dict["CONN_MAX_AGE"] = 60
    # The walk sends thousands of requests a minute; keep the throttles' work, not their refusals.
    api_settings.DEFAULT_THROTTLE_RATES.update({"anon": "1000000/min", "user": "1000000/min"})  # type: ignore[dict-item]

    org = Organization.objects.get_or_create(slug="demo", defaults={"name": "Demo Fleet Co"})[0]
    chain = Chain.objects.create(
        org=org, slug="sim", chain_id="fleetops-sim-1", expected_block_time_seconds=1.0
    )
    IndexerState.objects.create(chain=chain)
    User = get_user_model()
    viewer = User.objects.create_user(username="b5-viewer", password="x" * 16)
    Membership.objects.create(user=viewer, org=org, role=Role.VIEWER)
    token = api_token_create(
        user=viewer, org=org, token_role=Role.VIEWER, name="b5", actor=Actor.for_user(viewer)
    )
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token.plaintext}")
    admin_user = User.objects.create_superuser(username="b5-admin", password="x" * 16, email="b5@example.com")
    admin_client = Client()
    admin_client.force_login(admin_user)

    params = connection.get_connection_params()
    conninfo = {k: v for k, v in params.items() if isinstance(v, str | int) and not isinstance(v, bool)}
    path = f"/api/v1/indexer/chains/{chain.slug}/events"
    loaded_events, next_height = 0, 1
    outcomes: list[dict[str, Any]] = []

    for size in sizes:
        with Timer() as t_load:
            last = load_events(conninfo, chain.pk, next_height, size - loaded_events)
        added = (last - next_height + 1) * EVENTS_PER_BLOCK
        loaded_events += added
        next_height = last + 1
        txs = Transaction.objects.filter(chain=chain).count()
        print(
            f"\n=== {loaded_events:,} events ({txs:,} txs, {last:,} blocks): loaded {added:,} events + their "
            f"txs and blocks with binary COPY + VACUUM ANALYZE in {t_load.elapsed:.0f}s "
            f"({added / t_load.elapsed:,.0f} events/s)"
        )

        ctx = multiprocessing.get_context("spawn")
        stop, written = ctx.Event(), ctx.Value("q", 0)
        proc = ctx.Process(target=writer, args=(conninfo, chain.pk, 10_000_000 + next_height, stop, written))
        proc.start()
        try:
            time.sleep(1.0)
            api_outs = {}
            for store in stores:
                url = args.redis_url if store == "redis" else ""
                with override_settings(CACHES={"default": env_cache(environ={"CACHE_URL": url})}):
                    print(f"\n--- API, throttle counters in {'Redis ' + url if url else 'PostgreSQL'}")
                    api_outs[store] = _measure_api(
                        api,
                        path,
                        chain,
                        args,
                        connection,
                        signing,
                        pagination,
                        loaded_events,
                        CaptureQueriesContext,
                    )
            admin_out = (
                None
                if args.no_admin
                else _measure_admin(admin_client, admin_site, chain, args, CaptureQueriesContext, connection)
            )
        finally:
            stop.set()
            proc.join(30)
        print(f"concurrent writer: {written.value:,} events inserted during the measurements")
        # The writer's heights sit far above; drop them so the next size loads contiguously.
        for model in (Event, Transaction, Block):
            model.objects.filter(chain=chain, height__gte=10_000_000).delete()
        outcomes.append({"events": loaded_events, "size": size, "api": api_outs, "admin": admin_out})

    worst_api, worst_flat, worst_admin, worst_queries = 0.0, 0.0, 0.0, 0
    api_ok = admin_ok = True
    for out in outcomes:
        label = f"{out['size'] / 1e6:g}m"
        for store, a in out["api"].items():
            print(
                result_line(
                    f"b5_api_{label}_{store}",
                    a["ratio"],
                    f"5.00 (worst deep page p50 = {a['flat']:.2f}x page 1, goal 1.50; "
                    f"{a['queries']} queries per page, goal <= 3)",
                    a["ok"],
                )
            )
            worst_api, worst_flat = max(worst_api, a["ratio"]), max(worst_flat, a["flat"])
            worst_queries = max(worst_queries, a["queries"])
            api_ok = api_ok and a["ok"]
        d = out["admin"]
        if d is None:
            continue
        print(
            result_line(
                f"b5_admin_{label}",
                d["p95"] / 0.3,
                f"1.00 (worst p95 {d['p95'] * 1000:.0f} ms / 300 ms; exact COUNT(*) {d['exact_counts']}; "
                f"query counts equal for 20/100 rows: {d['queries_flat']})",
                d["ok"],
            )
        )
        worst_admin = max(worst_admin, d["p95"])
        admin_ok = admin_ok and d["ok"]
    print(
        result_line(
            "b5_api",
            worst_api,
            f"5.00 (and page 10,000 within 1.5x of page 1: worst {worst_flat:.2f}x; "
            f"at most {worst_queries} queries per authenticated page, goal <= 3; "
            f"stores: {', '.join(stores)})",
            api_ok,
        )
    )
    if not args.no_admin:
        print(
            result_line(
                "b5_admin",
                worst_admin / 0.3,
                "1.00 (p95 / 300 ms; no exact COUNT(*); queries flat)",
                admin_ok,
            )
        )
    return 0


def _measure_api(
    api: Any,
    path: str,
    chain: Any,
    args: Any,
    connection: Any,
    signing: Any,
    pagination: Any,
    total: int,
    capture: Any,
) -> dict[str, Any]:
    worst_ratio, flat_values, ok = 0.0, [], True
    deep_label, most_queries = 0, 0
    for page_size in (50, 200):
        available = total // page_size
        targets = [p for p in TARGET_PAGES if p <= available]
        if TARGET_PAGES[-1] > available:
            targets.append(available)  # the deepest page this size has
        # Walk: real cursors, page after page; record the cursor leading to each target page.
        cursors: dict[int, str | None] = {1: None}
        walk_times: list[float] = []
        cursor: str | None = None
        walk_to = min(max(targets), args.walk)
        for page in range(1, walk_to + 1):
            if page in targets:
                cursors[page] = cursor
            query = {"page_size": page_size} | ({"cursor": cursor} if cursor else {})
            with Timer() as t:
                response = api.get(path, query)
            assert response.status_code == 200, (response.status_code, response.content[:300])
            walk_times.append(t.elapsed)
            body = response.json()
            cursor = _cursor_of(body["next"])
        binding = signing.loads(_first_cursor(api, path, page_size), salt=pagination._SALT)["b"]

        def mint(position: int, binding: str = binding) -> str:
            payload = {"p": [position], "b": binding}
            return str(signing.dumps(payload, salt=pagination._SALT, compress=True))

        # Minting through the pagination's own signing must land where walking does.
        for page, real in cursors.items():
            if real is None:
                continue
            position = signing.loads(real, salt=pagination._SALT)["p"][0]
            same = api.get(path, {"page_size": page_size, "cursor": mint(position)}).json()["results"][0]
            walked = api.get(path, {"page_size": page_size, "cursor": real}).json()["results"][0]
            assert same == walked, (page, same["id"], walked["id"])
        for page in targets:
            if page not in cursors:
                with connection.cursor() as cur:
                    cur.execute(
                        "SELECT id FROM indexer_event WHERE chain_id = %s ORDER BY id DESC OFFSET %s LIMIT 1",
                        [chain.pk, (page - 1) * page_size - 1],
                    )
                    cursors[page] = mint(cur.fetchone()[0])
        print(
            f"events API page_size={page_size}: walked {walk_to:,} pages following `next`: "
            f"{_summary(walk_times)} (deeper pages: cursors minted for the SQL keyset position)"
        )
        medians: dict[int, float] = {}
        raw_medians: dict[int, float] = {}
        for page in targets:
            cur_token = cursors[page]
            position = signing.loads(cur_token, salt=pagination._SALT)["p"][0] if cur_token else None
            query = {"page_size": page_size} | ({"cursor": cur_token} if cur_token else {})
            with capture(connection) as counted:
                api.get(path, query)
            queries = len(counted.captured_queries)
            most_queries = max(most_queries, queries)
            api_samples, raw_samples = [], []
            for i in range(args.samples + 2):
                with Timer() as t:
                    response = api.get(path, query)
                assert response.status_code == 200
                with Timer() as r:
                    payload = _raw_page(connection, chain.pk, position, page_size)
                if i >= 2:  # warm-up
                    api_samples.append(t.elapsed)
                    raw_samples.append(r.elapsed)
            assert len(json.loads(payload)["results"]) == len(response.json()["results"])
            ratio = percentile(api_samples, 0.95) / percentile(raw_samples, 0.95)
            worst_ratio = max(worst_ratio, ratio)
            medians[page] = statistics.median(api_samples)
            raw_medians[page] = statistics.median(raw_samples)
            print(
                f"  page {page:>6,}: API {_summary(api_samples)} | raw keyset SQL + json.dumps "
                f"{_summary(raw_samples)} | p95 ratio {ratio:.2f} | {queries} queries"
            )
        deep = max(targets)
        flat = medians[deep] / medians[1]
        deep_label = max(deep_label, deep)
        flat_values.append(flat)
        print(
            f"  flatness: page {deep:,} p50 = {flat:.2f}x page 1 (goal <= 1.5); the raw query's own: "
            f"{raw_medians[deep] / raw_medians[1]:.2f}x"
        )
        # Where an API page's time goes (reference only): its queries, and the same page without
        # the throttles (their counter: one statement, or one Redis round trip).
        deep_query = {"page_size": page_size} | ({"cursor": cursors[deep]} if cursors[deep] else {})
        with capture(connection) as queries:
            api.get(path, deep_query)
        kinds = [_query_kind(q["sql"]) for q in queries.captured_queries]
        from indexer.api.views import EventList

        saved = EventList.throttle_classes
        EventList.throttle_classes = []
        try:
            unthrottled = []
            for i in range(args.samples + 2):
                with Timer() as t:
                    api.get(path, deep_query)
                if i >= 2:
                    unthrottled.append(t.elapsed)
        finally:
            EventList.throttle_classes = saved
        print(
            f"  page {deep:,}: {len(kinds)} queries per API request ({', '.join(kinds)}); "
            f"without throttles: {_summary(unthrottled)}"
        )
    flat = max(flat_values)
    ok = worst_ratio <= 5 and flat <= 1.5 and most_queries <= 3
    return {"ratio": worst_ratio, "flat": flat, "deep": deep_label, "queries": most_queries, "ok": ok}


def _query_kind(sql: str) -> str:
    # The statement's own table, not a subquery's: drop parenthesised parts first.
    flat = sql
    while (stripped := re.sub(r"\([^()]*\)", "", flat)) != flat:
        flat = stripped
    match = re.search(r'(?:FROM|UPDATE|INTO)\s+"?(\w+)"?', flat)
    head = sql.split()[0].upper() if sql.split() else "?"
    if head in ("BEGIN", "COMMIT", "SAVEPOINT", "RELEASE"):
        return head
    return f"{head} {match.group(1) if match else ''}".strip()


def _first_cursor(api: Any, path: str, page_size: int) -> str:
    cursor = _cursor_of(api.get(path, {"page_size": page_size}).json()["next"])
    assert cursor
    return cursor


def _raw_page(connection: Any, chain_pk: int, before_id: int | None, page_size: int) -> bytes:
    """The baseline: the keyset query on psycopg, the same fields, json.dumps."""
    with connection.cursor() as cur:
        sql = f"SELECT {', '.join(API_FIELDS)} FROM indexer_event WHERE chain_id = %s"
        if before_id is None:
            cur.execute(sql + " ORDER BY id DESC LIMIT %s", [chain_pk, page_size + 1])
        else:
            cur.execute(sql + " AND id < %s ORDER BY id DESC LIMIT %s", [chain_pk, before_id, page_size + 1])
        rows = cur.fetchall()
    results = [dict(zip(API_FIELDS, row, strict=True)) for row in rows[:page_size]]
    for row in results:
        if isinstance(row["attributes"], str):  # Django hands jsonb over as text
            row["attributes"] = json.loads(row["attributes"])
    return json.dumps({"results": results, "next": None}).encode()


EXACT_COUNT = re.compile(r"count\(\*\)", re.IGNORECASE)


def _measure_admin(
    client: Any, admin_site: Any, chain: Any, args: Any, capture: Any, connection: Any
) -> dict[str, Any]:
    from indexer.models import Block, Event, Transaction

    models = {"block": Block, "transaction": Transaction, "event": Event}
    worst, exact, flat_ok = 0.0, [], True
    for name in ADMIN_MODELS:
        model = models[name]
        model_admin = admin_site._registry[model]
        table = model._meta.db_table
        original = model_admin.list_per_page
        for query in ({}, {"chain": str(chain.pk)}):
            counts = {}
            try:
                for per_page in (20, 100):
                    model_admin.list_per_page = per_page
                    url = f"/admin/indexer/{name}/"
                    samples = []
                    for i in range(args.admin_samples + 1):
                        with Timer() as t, capture(connection) as queries:
                            response = client.get(url, query)
                        assert response.status_code == 200, (url, response.status_code)
                        if i:
                            samples.append(t.elapsed)
                    counts[per_page] = len(queries)
                    for q in queries.captured_queries:
                        sql = q["sql"]
                        if EXACT_COUNT.search(sql) and table in sql and "LIMIT" not in sql.upper():
                            exact.append(sql[:200])
                    p95 = percentile(samples, 0.95)
                    worst = max(worst, p95)
                    label = f"/admin/indexer/{name}/" + ("?chain=<id>" if query else "")
                    print(
                        f"admin {label:<36} list_per_page {per_page:>3}: {_summary(samples)}, "
                        f"{len(queries)} queries {fmt_runs(sorted(samples)[-3:], 1000, 0)} ms slowest"
                    )
            finally:
                model_admin.list_per_page = original
            flat_ok = flat_ok and counts[20] == counts[100]
    for sql in exact:
        print(f"  EXACT COUNT: {sql}")
    return {
        "p95": worst,
        "exact_counts": len(exact),
        "queries_flat": flat_ok,
        "ok": worst <= 0.3 and not exact and flat_ok,
    }


if __name__ == "__main__":
    sys.exit(main())
