"""B2: the key re-stake schedule over 100,000 due keys with 1, 2 and 4 concurrent workers.

Claim throughput (the ratio): each worker process runs the portal's `claim_batch` (the exact
function the schedule runs: one statement that locks due keys with SKIP LOCKED, increments the
attempt and inserts the pending transaction, committed per batch) until no key is due; the raw
baseline runs the same CLAIM_SQL text through plain psycopg at the same batch size and
concurrency, on the same rows and schema, in the same run. Median of --runs after a warm-up.

End to end (figures, and the double checks): the real `restake_tick` in each worker process
(claim + attempt increment + pending tx + broadcast over loopback HTTP to the chain simulator, which
accepts instantly), then verification passes until every key has its verdict. Exactly 0 double
attempts (one transaction row per key, every key on attempt 1) and 0 double broadcasts (the
simulator's broadcast count equals the attempts broadcast) are required.

    python -m bench.b2_keys [--keys 100000] [--runs 3] [--workers 1,2,4] [--batch 100] [--e2e-keys N]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

from bench.common import median_of, result_line, setup_django

DB_NAME = "fleetops_bench_b2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sim_state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/control/state", timeout=10) as response:
        return dict(json.loads(response.read()))


def worker(mode: str, batch: int) -> None:
    """One worker process: claim (portal or raw) or run the real schedule pass (e2e)."""
    import django

    django.setup()
    if mode == "raw":
        import psycopg

        # The statement text and its constant parameters (the states read from the machines) only:
        # the raw worker talks to PostgreSQL through plain psycopg.
        from migrations_app.keys.schedule import CLAIM_CONSTANTS, CLAIM_SQL

        url = os.environ["DATABASE_URL"]
        from datetime import UTC, datetime

        with psycopg.connect(url, autocommit=False) as conn:
            while True:
                with conn.cursor() as cursor:
                    cursor.execute(
                        CLAIM_SQL,
                        {**CLAIM_CONSTANTS, "now": datetime.now(UTC), "limit": batch, "token": "raw"},
                        prepare=False,
                    )
                    rows = cursor.fetchall()
                conn.commit()
                if not rows:
                    return
    from migrations_app.keys.schedule import claim_batch, new_token, restake_tick

    if mode == "portal":
        token = new_token()
        while claim_batch(token=token, limit=batch):
            pass
    else:
        restake_tick(batch_size=batch)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument(
        "--e2e-keys", type=int, default=None, help="keys for the end-to-end runs (default --keys)"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--worker", choices=["portal", "raw", "e2e"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.batch)
        return 0

    server = setup_django(DB_NAME)  # noqa: F841 - keeps an embedded server alive
    from django.db import connection

    from fleetops.access.models import Organization
    from migrations_app.keys.verification import verify_tick
    from migrations_app.models.keys import AddressGroup, Key, OrgKeyConfig, StakeTransaction

    counts = [int(x) for x in args.workers.split(",")]
    n = args.keys
    port = free_port()
    chain_url = f"http://127.0.0.1:{port}"
    chain = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulators.chain",
            "--port",
            str(port),
            "--block-interval",
            "0.5",
            "--txs-per-block",
            "0",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                sim_state(chain_url)
                break
            except OSError:
                time.sleep(0.1)
        org = Organization.objects.create(name="Bench", slug="bench")
        OrgKeyConfig.objects.create(org=org, rpc_url=chain_url)
        group = AddressGroup.objects.create(org=org, name="target", services=["anvil"])
        started = time.perf_counter()
        with connection.cursor() as cursor:
            cursor.execute(
                f"""
                INSERT INTO {Key._meta.db_table} (org_id, address, public_key, owner_address,
                    address_group_id,
                    state, migration_status, migration_attempts, migration_max_attempts, migration_last_error,
                    migration_manual_retries, migration_round, created_at)
                SELECT %s, 'pokt1bench' || g, 'pk' || g, 'owner', %s, 'staked', 'none', 0, 5, '', 0, 1, now()
                FROM generate_series(1, %s) g
                """,
                [org.pk, group.pk, n],
            )
        print(f"seeded {n} keys in {time.perf_counter() - started:.1f}s", flush=True)

        def reset(count: int) -> None:
            with connection.cursor() as cursor:
                cursor.execute(f"TRUNCATE {StakeTransaction._meta.db_table}")
                cursor.execute(
                    f"UPDATE {Key._meta.db_table} SET migration_status = CASE WHEN id <= "
                    f"(SELECT min(id) FROM {Key._meta.db_table}) + %s - 1 THEN 'scheduled' ELSE 'none' END, "
                    "migration_attempts = 0, migration_next_attempt_at = now() - interval '1 second', "
                    "migration_max_attempts = 5",
                    [count],
                )
                cursor.execute(f"VACUUM ANALYZE {Key._meta.db_table}")

        def run_workers(mode: str, workers: int) -> float:
            env = dict(os.environ)
            begun = time.perf_counter()
            procs = [
                subprocess.Popen(
                    [sys.executable, "-m", "bench.b2_keys", "--worker", mode, "--batch", str(args.batch)],
                    env=env,
                )
                for _ in range(workers)
            ]
            for proc in procs:
                if proc.wait() != 0:
                    raise SystemExit(f"{mode} worker failed")
            return time.perf_counter() - begun

        def doubles() -> tuple[int, int]:
            with connection.cursor() as cursor:
                cursor.execute(
                    f"SELECT count(*) FILTER (WHERE migration_attempts > 1), "
                    "(SELECT count(*) - count(DISTINCT (key_id, round, attempt)) "
                    f"FROM {StakeTransaction._meta.db_table}) "
                    f"FROM {Key._meta.db_table}"
                )
                row = cursor.fetchone()
            return int(row[0]), int(row[1])

        ratios: list[float] = []
        report: list[str] = []
        double_attempts = 0
        for workers in counts:

            def timed(mode: str, workers: int = workers) -> float:
                nonlocal double_attempts
                reset(n)
                elapsed = run_workers(mode, workers)
                claimed = StakeTransaction.objects.count()
                if claimed != n:
                    raise SystemExit(f"{mode}: {claimed} claims for {n} due keys")
                double_attempts += sum(doubles())
                return elapsed

            portal, portal_runs = median_of(args.runs, lambda: timed("portal"))
            raw, raw_runs = median_of(args.runs, lambda: timed("raw"))
            ratio = raw / portal
            ratios.append(ratio)
            report.append(
                f"claims, {workers} worker(s): "
                f"portal {n / portal:,.0f}/s {[round(x, 2) for x in portal_runs]} s, "
                f"raw {n / raw:,.0f}/s {[round(x, 2) for x in raw_runs]} s, ratio {ratio:.2f}"
            )
            print(report[-1], flush=True)

        e2e = args.e2e_keys or n
        double_broadcasts = 0
        for workers in counts:
            reset(e2e)
            before = sim_state(chain_url)["broadcasts"]
            schedule = run_workers("e2e", workers)
            sent = StakeTransaction.objects.exclude(hash="").count()
            broadcasts = sim_state(chain_url)["broadcasts"] - before
            double_broadcasts += broadcasts - sent
            begun = time.perf_counter()
            from django.test import override_settings

            with override_settings(FLEETOPS_KEYS_VERIFY_BATCH=5000, FLEETOPS_KEYS_VERIFY_MIN_GAP_SECONDS=1):
                while StakeTransaction.objects.filter(status="pending").exists():
                    if verify_tick().checked == 0:
                        time.sleep(0.5)
            verify = time.perf_counter() - begun
            succeeded = Key.objects.filter(migration_status="succeeded").count()
            attempts, rows = doubles()
            double_attempts += attempts + rows
            report.append(
                f"end to end, {workers} worker(s), {e2e} keys: claim+broadcast {e2e / schedule:,.0f} keys/s "
                f"({schedule:.1f}s), verification {verify:.1f}s, succeeded {succeeded}, "
                f"broadcasts {broadcasts} for {sent} attempts"
            )
            print(report[-1], flush=True)
            if succeeded != e2e:
                raise SystemExit(f"only {succeeded} of {e2e} keys succeeded")
    finally:
        chain.terminate()
        chain.wait(10)

    print(f"double attempts: {double_attempts}; double broadcasts: {double_broadcasts}")
    worst = min(ratios)
    ok = worst >= 0.5 and double_attempts == 0 and double_broadcasts == 0
    print(result_line("b2_keys", worst, ">=0.50 (lowest over 1/2/4 workers), 0 doubles", ok))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
