"""B5 (console part): every big-table changelist, the dashboard and its live fragments at 1M rows.

Seeds `--rows` rows (default 1,000,000, the documented figure) set-based (`INSERT ... SELECT ...
FROM generate_series`, one statement per table) into each table that grows without bound:
curtailment events and targets, keys and stake transactions, the audit log, indexer enrichments and
the outbox; indexer blocks, transactions and events are bulk-loaded with the events loader of
`bench.b5_reads` (`--rows` events). Then VACUUM ANALYZE (what autovacuum would have done) and a day
of `MetricSample` history (what the platform tick samples every 5 minutes).

Logged in as an operator of the organization that owns the rows (a staff user with an operator
membership, not a superuser: the org-scoped querysets are what is measured), each page is fetched
`--samples` times after two warm-ups with Django's test Client: changelists unfiltered, filtered and
searched (the audit log searched for "rollback", filtered by actor and time range), the change pages
that list stake transactions and curtailment targets, the dashboard and every live fragment (the
dashboard cards, the event, chain and protocol fragments, the keys changelist rows).

For every page the queries of one request are captured (CaptureQueriesContext) and checked:
- no exact COUNT(*) over a big table (a count over a LIMITed subquery, or over one parent's rows
  through an index, is bounded and allowed);
- no sequential scan on a big table in the plan (EXPLAIN of each captured query).
Goal (BENCHMARKS.md B5, the admin part): p95 <= 300 ms on every page, neither of the above.

    python -m bench.b5_console [--rows 1000000] [--samples 20] [--only audit,keys] [--db NAME]
    python -m bench.b5_console --reuse --db NAME   # measure again without re-seeding (~5 min saved)
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from datetime import timedelta
from typing import Any

from bench._indexer import percentile
from bench.common import Timer, result_line, setup_django

GOAL_SECONDS = 0.3
TARGETS_PER_EVENT = 1_000
LIVE_EVENTS = 5
BIG_KEY_TXS = 10_000
AUDIT_DAYS = 30
EXACT_COUNT = re.compile(r"\bCOUNT\(\*\)", re.IGNORECASE)
SEQ_SCAN = re.compile(r"Seq Scan on (\w+)")


def _seed(model: Any, n: int, exprs: dict[str, str], **defaults: Any) -> tuple[int, int]:
    """INSERT n rows in one statement: columns in `exprs` are SQL over `g` (1..n); the others take
    the value of a model instance built with `defaults` (its field defaults otherwise). Returns the
    first and last id written (one statement into an identity column: contiguous)."""
    from django.db import connection

    obj = model(**defaults)
    columns, selects, params = [], [], []
    for field in model._meta.concrete_fields:
        if field.primary_key:
            continue
        columns.append(f'"{field.column}"')
        if field.column in exprs:
            selects.append(exprs[field.column])
        else:
            selects.append("%s")
            params.append(field.get_db_prep_save(field.pre_save(obj, add=True), connection))
    table = model._meta.db_table
    sql = (
        f'INSERT INTO "{table}" ({", ".join(columns)}) SELECT {", ".join(selects)} '
        f"FROM generate_series(1, {int(n)}) AS g RETURNING id"
    )
    with connection.cursor() as cur:
        cur.execute(f"WITH ins AS ({sql}) SELECT min(id), max(id) FROM ins", params)
        first, last = cur.fetchone()
    return int(first), int(last)


def _skip_fk_triggers() -> None:
    """The seeded ids are consistent by construction: skip the deferred foreign-key checks (minutes
    at COMMIT for millions of rows) when the role may (a superuser, as in CI); else keep them."""
    from django.db import DatabaseError, connection, transaction

    try:
        with transaction.atomic(), connection.cursor() as cur:
            cur.execute("SET LOCAL session_replication_role = replica")
    except DatabaseError:
        print("  (not a superuser: foreign keys checked at COMMIT, slower)")


def seed(rows: int, conninfo: dict[str, Any]) -> dict[str, Any]:
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction

    from bench.b5_reads import load_events
    from curtailment.models import CurtailmentEvent, CurtailmentTarget, Device
    from fleetops.access.models import Membership, Organization, Role
    from fleetops.audit.models import AuditEvent
    from fleetops.lib import clock
    from fleetops.observability.history import SAMPLE_EVERY, TICK
    from fleetops.observability.models import MetricSample
    from fleetops.outbox.models import OutboxMessage
    from indexer.models import Chain, Enrichment, IndexerState
    from migrations_app.models import Protocol
    from migrations_app.models.keys import AddressGroup, Key, StakeTransaction

    User = get_user_model()
    org = Organization.objects.get_or_create(slug="demo", defaults={"name": "Demo Fleet Co"})[0]
    operator = User.objects.create_user(username="b5-operator", password="x" * 16, is_staff=True)
    Membership.objects.create(user=operator, org=org, role=Role.OPERATOR)
    chain = Chain.objects.create(
        org=org, slug="sim", chain_id="fleetops-sim-1", expected_block_time_seconds=1.0
    )
    IndexerState.objects.create(chain=chain)
    protocol = Protocol.objects.create(chain=chain, protocol_id="b5proto", name="B5 protocol")
    groups = [AddressGroup.objects.create(org=org, name=f"group-{i}") for i in range(10)]
    now = clock.now()
    n = rows
    out: dict[str, Any] = {"org": org, "operator": operator, "chain": chain, "protocol": protocol}

    with Timer() as t, transaction.atomic():
        _skip_fk_triggers()
        dev0, _ = _seed(
            Device,
            TARGETS_PER_EVENT,
            {"identifier": "'dev-' || g", "name": "'Device ' || g"},
            org=org,
            rated_power_w=3000,
        )
        print(f"  seeding {n:,} rows per table (set-based INSERT ... SELECT generate_series)")
        _, ev1 = _seed(
            CurtailmentEvent,
            n,
            {
                "uuid": "gen_random_uuid()",
                "state": f"CASE WHEN g > {n - LIVE_EVENTS} THEN 'active' ELSE 'completed' END",
                "reason": "'Seeded curtailment ' || g",
                "created_at": f"now() - ({n} - g) * interval '1 minute'",
                "updated_at": f"now() - ({n} - g) * interval '1 minute'",
                "started_at": f"now() - ({n} - g) * interval '1 minute'",
                "ended_at": f"CASE WHEN g > {n - LIVE_EVENTS} THEN NULL "
                f"ELSE now() - ({n} - g) * interval '1 minute' + interval '30 seconds' END",
            },
            org=org,
            created_by=operator,
            target_kw=100.0,
            restore_batch_size=50,
            effective_batch_size=50,
            max_duration_seconds=3600,
            source_actor_type="user",
            source_actor_id=str(operator.pk),
        )
        # Targets: the newest n / 1,000 events have 1,000 each; the newest (live) event's are live.
        _seed(
            CurtailmentTarget,
            n,
            {
                "event_id": f"{ev1} - (g - 1) / {TARGETS_PER_EVENT}",
                "device_id": f"{dev0} + mod(g - 1, {TARGETS_PER_EVENT})",
                "device_identifier": f"'dev-' || (1 + mod(g - 1, {TARGETS_PER_EVENT}))",
                "state": f"CASE WHEN g <= {TARGETS_PER_EVENT} THEN 'confirmed' ELSE 'resolved' END",
                "added_at": "now() - g * interval '1 second'",
            },
            desired_state="curtailed",
            event_id=ev1,
            device_id=dev0,
        )
        status = (
            "CASE WHEN mod(g, 100) = 0 THEN 'failed' WHEN mod(g, 100) < 3 THEN 'retrying' "
            "WHEN mod(g, 100) < 6 THEN 'scheduled' WHEN mod(g, 100) < 50 THEN 'succeeded' ELSE 'none' END"
        )
        k0, k1 = _seed(
            Key,
            n,
            {
                "address": "'pokt1b5' || lpad(g::text, 12, '0')",
                "public_key": "md5(g::text) || md5((g + 1)::text)",
                "owner_address": "'pokt1owner' || mod(g, 1000)",
                "migration_status": status,
                "migration_attempts": "mod(g, 5)::smallint",
                "migration_max_attempts": "5::smallint",
                "migration_next_attempt_at": "CASE WHEN mod(g, 100) BETWEEN 1 AND 5 "
                "THEN now() + mod(g, 600) * interval '1 second' END",
                "migration_scheduled_at": "CASE WHEN mod(g, 100) BETWEEN 1 AND 5 "
                "THEN now() - mod(g, 600) * interval '1 second' END",
                "migration_updated_at": "now() - g * interval '1 second'",
                "migration_last_error": "CASE WHEN mod(g, 100) = 0 THEN 'CheckTx code 5: insufficient funds' "
                "ELSE '' END",
                "address_group_id": f"{groups[0].pk} + mod(g, 10)",
                "created_at": f"now() - ({n} - g) * interval '1 second'",
            },
            org=org,
            state="staked",
        )
        # Stake txs: the newest key has BIG_KEY_TXS (years of retries), the rest spread one a key.
        _seed(
            StakeTransaction,
            n,
            {
                "key_id": f"CASE WHEN g <= {BIG_KEY_TXS} THEN {k1} ELSE {k0} + mod(g, {n}) END",
                "round": "g",
                "attempt": "0::smallint",
                "status": "CASE WHEN mod(g, 10) = 0 THEN 'failure' ELSE 'success' END",
                "broadcast_state": "'sent'",
                "hash": "upper(md5(g::text) || md5((-g)::text))",
                "created_at": f"now() - ({n} - g) * interval '1 second'",
                "claimed_at": f"now() - ({n} - g) * interval '1 second'",
                "resolved_at": f"now() - ({n} - g) * interval '1 second'",
            },
            reason="1006",
            key_id=k1,
        )
        actions = (
            "'{curtailment.event.started,curtailment.event.stopped,keys.migration.scheduled,"
            "keys.migration.retried,indexer.chain.paused,indexer.chain.resumed,access.login,"
            "protocols.history.started}'::text[]"
        )
        _seed(
            AuditEvent,
            n,
            {
                "at": f"now() - ({n} - g) * interval '{AUDIT_DAYS * 86400 * 1_000_000 // n} microseconds'",
                "actor_type": "CASE WHEN mod(g, 4) = 0 THEN 'user' ELSE 'scheduler' END",
                "actor_id": f"CASE WHEN mod(g, 4) = 0 THEN '{operator.pk}' "
                "ELSE (ARRAY['fleet_sync','key_restake','indexer_verify'])[1 + mod(g, 3)] END",
                "actor_label": "CASE WHEN mod(g, 4) = 0 THEN 'b5-operator' ELSE 'scheduler' END",
                # Rollbacks and reorgs are rare (one row in 500 each), as in production.
                "action": f"CASE WHEN mod(g, 500) = 0 THEN 'indexer.chain.rollback' "
                f"WHEN mod(g, 500) = 1 THEN 'indexer.chain.reorg' ELSE ({actions})[1 + mod(g, 8)] END",
                "target_type": "'migrations_app.key'",
                "target_id": "(1 + mod(g, 100000))::text",
                "target_label": "'pokt1b5' || lpad((1 + mod(g, 100000))::text, 12, '0')",
                "reason": "CASE WHEN mod(g, 500) = 0 THEN 'Operator rolled the chain back after a reorg' "
                "ELSE 'Scheduled pass ' || g END",
                "request_id": "md5(g::text)",
            },
            org=org,
            actor_type="user",
        )
        _seed(
            Enrichment,
            n,
            {
                "height": "1 + g / 100",
                "tx_index": "mod(g, 100)",
                "status": f"CASE WHEN g > {n - 1000} THEN 'pending' WHEN mod(g, 1000) = 0 THEN 'failed' "
                "ELSE 'ok' END",
                "payload": "md5(g::text)",
                "updated_at": f"now() - ({n} - g) * interval '1 second'",
            },
            chain=chain,
            phase="tx",
            event_index=0,
            encoding="base64",
        )
        _seed(
            OutboxMessage,
            n,
            {
                "task": "(ARRAY['curtailment.tasks.reconcile','migrations_app.keys.tasks.restake',"
                "'indexer.tasks.enrich','fleetops.notifications.tasks.deliver'])[1 + mod(g, 4)]",
                "status": f"CASE WHEN g > {n - 100} THEN 'pending' ELSE 'sent' END",
                "created_at": f"now() - ({n} - g) * interval '1 second'",
                "available_at": f"now() - ({n} - g) * interval '1 second'",
                "sent_at": f"CASE WHEN g > {n - 100} THEN NULL "
                f"ELSE now() - ({n} - g) * interval '1 second' END",
                "request_id": "md5(g::text)",
            },
            created_at=now,
            available_at=now,
        )
        # A day of sampled history, as the platform tick writes it every 5 minutes.
        series = [
            TICK,
            "keys.scheduled",
            "keys.retrying",
            "keys.failed",
            "curtailment.live_events",
            "indexer.enrichment_backlog",
        ]
        samples = [
            MetricSample(series=s, org_id=None if s == TICK else org.pk, at=now - i * SAMPLE_EVERY, value=i)
            for i in range(288)
            for s in series
        ]
        MetricSample.objects.bulk_create(samples)
    print(f"  set-based seeding: {t.elapsed:.0f}s")
    with Timer() as t:
        load_events(conninfo, chain.pk, 1, n)
    print(f"  indexer blocks/txs/events (binary COPY, {n:,} events): {t.elapsed:.0f}s")
    with Timer() as t:
        connection.close()
        import psycopg

        with psycopg.connect(**conninfo, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
    print(f"  VACUUM ANALYZE: {t.elapsed:.0f}s")
    out.update(
        live_event=ev1,
        big_key=k1,
        failed_key=k0 + 99,
    )
    return out


def pages(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(group, label, url) for every page measured."""
    chain, protocol = data["chain"], data["protocol"]
    ev, key, op = data["live_event"], data["big_key"], data["operator"].pk
    from fleetops.observability import registry

    out = [("dashboard", "dashboard /admin/", "/admin/")]
    out += [
        ("dashboard", f"card fragment {card.key}", f"/admin/live/card/{card.key}/")
        for card in registry.cards()
    ]
    ce = "/admin/curtailment/curtailmentevent/"
    out += [
        ("curtailment", "events", ce),
        ("curtailment", "events ?state=active", ce + "?state=active"),
        ("curtailment", "events ?priority=normal", ce + "?priority=normal"),
        ("curtailment", "events search 'Seeded curtailment 999'", ce + "?q=Seeded+curtailment+999"),
        ("curtailment", "live event page (1,000 targets)", f"{ce}{ev}/change/"),
        ("curtailment", "live event fragment", f"{ce}{ev}/live/"),
    ]
    k = "/admin/migrations_app/key/"
    out += [
        ("keys", "keys", k),
        ("keys", "keys ?migration_status=failed", k + "?migration_status__exact=failed"),
        ("keys", "keys ?stuck=yes", k + "?stuck=yes"),
        ("keys", "keys ?stuck=overdue", k + "?stuck=overdue"),
        ("keys", "keys ?state=staked", k + "?state__exact=staked"),
        ("keys", "keys search =address", k + "?q=pokt1b5000000500000"),
        ("keys", "keys rows fragment", k + "live/"),
        (
            "keys",
            "keys rows fragment ?migration_status=retrying",
            k + "live/?migration_status__exact=retrying",
        ),
        ("keys", f"key page ({BIG_KEY_TXS:,} stake txs)", f"{k}{key}/change/"),
        ("keys", "key page, stake txs page 400", f"{k}{key}/change/?tx_page=400"),
    ]
    a = "/admin/audit/auditevent/"
    out += [
        ("audit", "audit log", a),
        ("audit", "audit search 'rollback'", a + "?q=rollback"),
        ("audit", "audit search 'reorg'", a + "?q=reorg"),
        ("audit", "audit search 'rolled back' (2 words)", a + "?q=rolled+back"),
        ("audit", "audit search 'pass' (common word)", a + "?q=pass"),
        ("audit", "audit ?actor=operator", a + f"?actor=user:{op}"),
        ("audit", "audit ?actor=process", a + "?actor=process:fleet_sync"),
        ("audit", "audit ?since=24h", a + "?since=24h"),
        ("audit", "audit ?since=7d&actor=operator", a + f"?since=7d&actor=user:{op}"),
        ("audit", "audit ?since..until (a day, 10 days ago)", a + "?" + _range(10)),
        ("audit", "audit 'rollback' + since=7d", a + "?q=rollback&since=7d"),
        ("audit", "audit ?action=indexer.chain.rollback", a + "?action__exact=indexer.chain.rollback"),
    ]
    i = "/admin/indexer/"
    out += [("indexer", f"{m}s", f"{i}{m}/") for m in ("block", "transaction", "event", "enrichment")] + [
        ("indexer", f"{m}s ?chain", f"{i}{m}/?chain={chain.pk}") for m in ("block", "transaction", "event")
    ]
    out += [
        ("indexer", "events search height", f"{i}event/?q=1500"),
        ("indexer", "events search type 'transfer'", f"{i}event/?q=transfer"),
        ("indexer", "transactions search hash", f"{i}transaction/?q={'AB' * 32}"),
        ("indexer", "enrichments search height", f"{i}enrichment/?q=1500"),
        ("indexer", "enrichments ?status=failed", f"{i}enrichment/?status__exact=failed"),
        ("indexer", "enrichments ?status=pending", f"{i}enrichment/?status__exact=pending"),
        ("indexer", "chain page", f"{i}chain/{chain.pk}/change/"),
        ("indexer", "chain fragment", f"{i}chain/{chain.pk}/live/"),
        ("protocols", "protocol page", f"/admin/migrations_app/protocol/{protocol.pk}/change/"),
        ("protocols", "protocol fragment", f"/admin/migrations_app/protocol/{protocol.pk}/live/"),
    ]
    o = "/admin/outbox/outboxmessage/"
    out += [
        ("outbox", "outbox", o),
        ("outbox", "outbox ?status=pending", o + "?status__exact=pending"),
        ("outbox", "outbox search request id", o + "?q=c4ca4238a0b923820dcc509a6f75849b"),
        ("outbox", "outbox ?task=…restake", o + "?task__exact=migrations_app.keys.tasks.restake"),
    ]
    return out


def _range(days_ago: int) -> str:
    from urllib.parse import urlencode

    from django.utils import timezone

    from fleetops.lib import clock

    end = timezone.localtime(clock.now() - timedelta(days=days_ago))
    start = end - timedelta(days=1)
    fmt = "%Y-%m-%d %H:%M:%S"
    return urlencode({"since": start.strftime(fmt), "until": end.strftime(fmt)})


def big_tables(threshold: int = 100_000) -> set[str]:
    """Tables the planner estimates at `threshold` rows or more (after the VACUUM ANALYZE)."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(
            "SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace "
            "AND reltuples >= %s",
            [threshold],
        )
        return {r[0] for r in cur.fetchall()}


# An exact count of one parent's rows (`WHERE "t"."event_id" = 42` and nothing else): index-bounded.
ONE_PARENT = re.compile(r'WHERE "\w+"\."\w+_id" = \d+\s*$')


def inspect_queries(captured: list[dict[str, Any]], big: set[str]) -> tuple[list[str], list[str], list[str]]:
    """Exact counts over a big table; sequential scans of a big table in a query without LIMIT
    (unbounded); and those under a LIMIT (bounded: reported, judged by the page's time)."""
    from django.db import connection

    counts: list[str] = []
    scans: list[str] = []
    bounded: list[str] = []
    for q in captured:
        sql = q["sql"]
        head = sql.lstrip().split(" ", 1)[0].upper()
        if head not in ("SELECT", "WITH"):
            continue
        tables = {t for t in big if f'"{t}"' in sql or f" {t} " in sql}
        if not tables:
            continue
        limited = "LIMIT" in sql.upper()
        if EXACT_COUNT.search(sql) and not limited and not ONE_PARENT.search(sql):
            counts.append(sql[:240])
        with connection.cursor() as cur:
            cur.execute("EXPLAIN " + sql)
            plan = "\n".join(r[0] for r in cur.fetchall())
        for table in SEQ_SCAN.findall(plan):
            if table in big:
                (bounded if limited else scans).append(f"Seq Scan on {table}: {sql[:240]}")
    return counts, scans, bounded


def measure(client: Any, url: str, samples: int, big: set[str]) -> dict[str, Any]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    times = []
    for i in range(samples + 2):
        with Timer() as t:
            response = client.get(url)
        assert response.status_code == 200, (url, response.status_code, response.content[:300])
        if i >= 2:
            times.append(t.elapsed)
    with CaptureQueriesContext(connection) as queries:
        client.get(url)
    captured = list(queries.captured_queries)
    counts, scans, bounded = inspect_queries(captured, big)
    slowest = max(captured, key=lambda q: float(q["time"]), default=None)
    return {
        "p50": percentile(times, 0.5),
        "p95": percentile(times, 0.95),
        "queries": len(captured),
        "counts": counts,
        "scans": scans,
        "bounded": bounded,
        "slowest": (float(slowest["time"]), slowest["sql"][:160]) if slowest else (0.0, ""),
    }


def _reuse_django(db_name: str) -> None:
    import os

    import django
    from django.core.management import call_command

    from fleetops.devtools.services import with_database

    os.environ["DATABASE_URL"] = with_database(os.environ["DATABASE_URL"], db_name)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fleetops.settings.test")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    django.setup()
    call_command("migrate", verbosity=0)


def seeded() -> dict[str, Any]:
    """The objects `seed` returned, looked up again."""
    from django.contrib.auth import get_user_model
    from django.db.models import Max

    from curtailment.models import CurtailmentEvent
    from indexer.models import Chain
    from migrations_app.models import Protocol
    from migrations_app.models.keys import Key

    keys = Key.objects.aggregate(last=Max("id"))["last"]
    return {
        "operator": get_user_model().objects.get(username="b5-operator"),
        "chain": Chain.objects.get(slug="sim"),
        "protocol": Protocol.objects.get(protocol_id="b5proto"),
        "live_event": CurtailmentEvent.objects.aggregate(last=Max("id"))["last"],
        "big_key": keys,
        "rows": keys,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per big table (1M: the goal)")
    parser.add_argument("--samples", type=int, default=20, help="requests per page after 2 warm-ups")
    parser.add_argument("--only", default="", help="comma-separated groups (dashboard,keys,audit,...)")
    parser.add_argument("--db", default="fleetops_bench_b5_console")
    parser.add_argument(
        "--reuse", action="store_true", help="measure the database a previous run seeded (migrated first)"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined,unused-ignore]
    if args.reuse:
        _reuse_django(args.db)
    else:
        server = setup_django(args.db)  # noqa: F841 - keeps an embedded server alive

    from django.db import connection
    from django.test import Client

    connection.settings_dict["CONN_MAX_AGE"] = 60  # persistent connections, as in production
    params = connection.get_connection_params()
    conninfo = {k: v for k, v in params.items() if isinstance(v, str | int) and not isinstance(v, bool)}
    if args.reuse:
        data = seeded()
        print(f"=== reusing {args.db}: {data['rows']:,} keys")
    else:
        print(f"=== seeding {args.rows:,} rows per big table")
        data = seed(args.rows, conninfo)
    client = Client()
    client.force_login(data["operator"])
    only = {g for g in args.only.split(",") if g}
    big = big_tables()
    print(f"big tables (>= 100,000 rows by the planner's estimate): {', '.join(sorted(big))}")
    worst, failures = 0.0, []
    print(f"\n=== pages as operator {data['operator'].username} ({args.samples} samples each)")
    for group, label, url in pages(data):
        if only and group not in only:
            continue
        r = measure(client, url, args.samples, big)
        ok = r["p95"] <= GOAL_SECONDS and not r["counts"] and not r["scans"]
        worst = max(worst, r["p95"])
        flags = ("" if ok else "  <-- MISSES") + (
            f"  exact COUNT(*) x{len(r['counts'])}" if r["counts"] else ""
        )
        flags += f"  seq scans x{len(r['scans'])}" if r["scans"] else ""
        flags += f"  (seq scan under LIMIT x{len(r['bounded'])})" if r["bounded"] else ""
        print(
            f"{group:<11} {label:<44} p50 {r['p50'] * 1000:7.1f} ms  p95 {r['p95'] * 1000:7.1f} ms  "
            f"{r['queries']:>3} queries, slowest {r['slowest'][0] * 1000:6.1f} ms{flags}"
        )
        if not ok:
            failures.append(label)
            for sql in r["counts"]:
                print(f"    EXACT COUNT: {sql}")
            for scan in r["scans"] + r["bounded"]:
                print(f"    {scan}")
            if r["p95"] > GOAL_SECONDS:
                print(f"    slowest query: {r['slowest'][1]}")
        print(
            result_line(
                "b5_console_" + re.sub(r"[^a-z0-9]+", "_", f"{group} {label}".lower()).strip("_"),
                r["p95"] / GOAL_SECONDS,
                "1.00 (p95 / 300 ms; no exact COUNT(*), no seq scan of a big table)",
                ok,
            )
        )
    print(
        result_line(
            f"b5_console_{args.rows / 1e6:g}m",
            worst / GOAL_SECONDS,
            f"1.00 (worst p95 {worst * 1000:.0f} ms / 300 ms; pages missing: {len(failures)})",
            not failures,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
