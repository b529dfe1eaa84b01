"""B4: the protocol history backfill over 1,000,000 state changes, window sizes 100 and 1,000 heights,
with 1, 2 and 4 parallel window workers (`protocol_migrate history --workers N`: windows read in
parallel, committed in order), with live ingestion running at the same time.

Set-up: the chain simulator (its own process) and `indexer_run` (its own process) index a chain of
`--heights` small blocks; then `--changes` synthetic SEP41 events are added to the stored events of
those heights (end-block events, so the chain's hashes and linkage stay the simulator's). While the
benchmark runs, the simulator produces `--live-rate` blocks/s and `indexer_run` keeps committing them
(the protocol producer inside its transactions: CAS, and rows once it owns the heights).

Portal path: `history_migrate` (the service behind `manage.py protocol_migrate history`): read the
stored events of a window, classify, and per window one transaction with the cursor CAS, the block
check, COPY of the rows and the span; with N workers, N windows are read and classified at once
(each worker on its own connection) and each commits when every window before it has. Timed
from the start to the moment the cursor reaches the tip seen at the start (the wait for the handoff
after that is not throughput). Raw baseline, same run, same rows, same table and indexes: psycopg
COPY of the precomputed rows with a commit per window.

Checked after every portal run: the spans tile [oldest, cursor] (0 gaps, 0 overlaps), the rows at
or below the starting tip are exactly the precomputed ones (0 duplicates, 0 missing), and a sampler
saw the cursor never move backwards.

One RESULT line per worker count (`b4_backfill_workers_N`: lowest ratio over the window sizes), the
goal line `b4_backfill` (one worker, as before), and the speed-up over one worker per worker count
(`b4_backfill_speedup_N`, goal 2 workers >= 1.5x). Each run also prints the CPU seconds spent in
this process and in the classification worker processes (their sum over the wall time shows how
much of the work ran in parallel). The speed-up needs free cores: on a machine already busy it is
bounded by the cores left over.

    python -m bench.b4_backfill [--changes 1000000] [--heights 10000] [--runs 5] [--workers 1,2,4]
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import result_line, setup_django

GOAL = 0.40
SPEEDUP_GOAL = {2: 1.5}  # portal rows/s with N workers over one worker


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--changes", type=int, default=1_000_000)
    parser.add_argument("--heights", type=int, default=10_000)
    parser.add_argument("--windows", default="100,1000")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workers", default="1,2,4", help="window worker counts to measure")
    parser.add_argument("--live-rate", type=float, default=2.0, help="live blocks per second")
    parser.add_argument("--database", default="fleetops_bench_b4", help="database name (dropped first)")
    args = parser.parse_args()
    server = setup_django(args.database)  # noqa: F841 - keeps an embedded server alive

    from django.db import connection, transaction

    from bench._indexer import ChainSim, bench_org, make_chain, manage
    from fleetops.audit.actors import Actor
    from indexer.models import IndexerState
    from migrations_app.models import Cursor, Protocol, ProtocolStateChange, ProtocolWriteSpan
    from migrations_app.protocols import registry, store
    from migrations_app.protocols.history import Progress, history_migrate

    log_dir = Path("var/bench")
    log_dir.mkdir(parents=True, exist_ok=True)
    sim = ChainSim(txs_per_block=1, extra_tx_events=0, seed=4)
    indexer = None
    halt = threading.Event()
    try:
        sim.produce(args.heights)
        chain = make_chain(org=bench_org(), slug="b4", chain_id="fleetops-sim-1", rpc_url=sim.url)
        indexer = manage(
            "indexer_run", "--chain", "b4", "--ingest-only", "--poll", "0.2", log=log_dir / "b4-indexer.log"
        )
        print(f"indexing {args.heights} simulator blocks …", flush=True)
        while (IndexerState.objects.get(chain=chain).last_indexed_height or 0) < args.heights:
            time.sleep(0.5)

        # 1M synthetic SEP41 events on the indexed heights (as if the chain had carried them).
        per_height = -(-args.changes // args.heights)
        print(f"adding {args.changes:,} SEP41 events ({per_height}/height) …", flush=True)
        accounts = [f"acct{i:04d}" for i in range(500)]
        written = 0
        with connection.cursor() as cur:
            raw = cur.cursor
            columns = "chain_id, height, phase, tx_index, event_index, type, attributes"
            with raw.copy(f"COPY indexer_event ({columns}) FROM STDIN") as copy:
                for h in range(1, args.heights + 1):
                    for i in range(per_height):
                        if written >= args.changes:
                            break
                        attrs = [
                            {"key": "sender", "value": accounts[(h + i) % 500], "index": True},
                            {"key": "recipient", "value": accounts[(h * 7 + i) % 500], "index": True},
                            {"key": "amount", "value": f"{1 + (h * i) % 9999}utok", "index": True},
                            {"key": "contract", "value": f"tok{i % 3}", "index": True},
                        ]
                        copy.write_row(
                            (chain.pk, h, "end_block", None, 1000 + i, "transfer", json.dumps(attrs))
                        )
                        written += 1
            cur.execute("ANALYZE indexer_event")

        from django.core.management import call_command

        call_command("protocol_setup", "--protocol-id", "SEP41", "--chain", "b4")
        protocol = Protocol.objects.select_related("chain").get(protocol_id="SEP41", chain=chain)
        spec = registry.get("SEP41")
        assert spec is not None

        live = threading.Thread(target=_produce_live, args=(sim.url, args.live_rate, halt), daemon=True)
        live.start()

        def reset() -> None:
            with transaction.atomic(), connection.cursor() as cur:
                # Cursor first: live ingestion produces nothing for a protocol without one.
                Cursor.objects.filter(
                    name__in=[protocol.history_cursor_name, protocol.current_state_cursor_name]
                ).delete()
                cur.execute(
                    f"TRUNCATE {ProtocolStateChange._meta.db_table}, {ProtocolWriteSpan._meta.db_table}"
                )
                Protocol.objects.filter(pk=protocol.pk).update(
                    history_migration_status="not_started",
                    history_handed_off_at=None,
                    history_handoff_height=None,
                )

        # The rows both paths write: every SEP41 change of the history, computed once.
        tip = IndexerState.objects.get(chain=chain).last_indexed_height or 0
        rows = store.classify_events(
            spec, store.read_events(chain_id=chain.pk, types=spec.event_types, low=1, high=tip)
        )
        print(f"history: heights 1..{tip}, {len(rows):,} state changes", flush=True)

        worker_counts = [int(w) for w in args.workers.split(",")]
        # (window, workers) -> (median portal rows/s, median raw rows/s of the same runs)
        results: dict[tuple[int, int], tuple[float, float]] = {}
        for window in [int(w) for w in args.windows.split(",")]:
            portal_rates: dict[int, list[float]] = {w: [] for w in worker_counts}
            raw_rates: list[float] = []
            for run in range(args.runs + 1):  # the first is the warm-up
                reset()
                raw_rate = _raw(rows, window, protocol.pk, chain.pk)
                if run:
                    raw_rates.append(raw_rate)
                for workers in worker_counts:
                    reset()
                    cpu_before = _cpu()
                    portal_rate, problems = _portal(
                        history_migrate, protocol, chain, rows, window, workers, Actor, Progress
                    )
                    cpu_self, cpu_pool = (a - b for a, b in zip(_cpu(), cpu_before, strict=True))
                    if problems:
                        print("INVARIANT BROKEN:", problems)
                        return 1
                    if run:
                        portal_rates[workers].append(portal_rate)
                    print(
                        f"  window {window:>5} workers {workers} run {run}"
                        f"{' (warm-up)' if not run else ''}: portal {portal_rate:,.0f} rows/s, "
                        f"raw COPY {raw_rate:,.0f} rows/s, gaps 0, duplicates 0, cursor never regressed; "
                        f"CPU s: this process {cpu_self:.1f}, classify processes {cpu_pool:.1f}",
                        flush=True,
                    )
            for workers in worker_counts:
                results[(window, workers)] = (
                    statistics.median(portal_rates[workers]),
                    statistics.median(raw_rates),
                )
    finally:
        halt.set()
        if indexer is not None:
            indexer.terminate()
            indexer.wait(20)
        sim.stop()

    for (window, workers), (portal, raw_median) in results.items():
        print(
            f"window {window}, {workers} worker(s): portal {portal:,.0f} rows/s, "
            f"raw COPY with a commit per window {raw_median:,.0f} rows/s, "
            f"ratio {portal / raw_median:.2f}"
        )
    by_workers: dict[int, float] = {}
    for (_, workers), (portal, raw_median) in results.items():
        by_workers[workers] = min(by_workers.get(workers, portal / raw_median), portal / raw_median)
    for workers, ratio in sorted(by_workers.items()):
        print(result_line(f"b4_backfill_workers_{workers}", ratio, f">={GOAL}", ratio >= GOAL))
    worst = by_workers.get(1, min(by_workers.values()))
    print(result_line("b4_backfill", worst, f">={GOAL} (one worker)", worst >= GOAL))
    windows = sorted({w for w, _ in results})
    for workers in sorted(by_workers):
        if workers > 1 and 1 in by_workers:  # speed-up over one worker: lowest over the window sizes
            speedup = min(results[(w, workers)][0] / results[(w, 1)][0] for w in windows)
            goal = SPEEDUP_GOAL.get(workers)
            print(
                result_line(
                    f"b4_backfill_speedup_{workers}",
                    speedup,
                    f">={goal}" if goal else "report",
                    goal is None or speedup >= goal,
                )
            )
    return 0


def _cpu() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its ended children (the classify pool's
    workers end with the run that started them)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


def _produce_live(url: str, rate: float, halt: threading.Event) -> None:
    while not halt.wait(1.0 / rate):
        request = urllib.request.Request(
            f"{url}/control/produce", data=b'{"blocks": 1}', headers={"Content-Type": "application/json"}
        )
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except OSError:
            pass


def _raw(rows: list[Any], window: int, protocol_pk: int, chain_id: int) -> float:
    """COPY the same rows into the same table, one transaction per window of heights."""
    from django.db import connection, transaction

    from migrations_app.models import ProtocolStateChange
    from migrations_app.protocols.store import STATE_CHANGE_COLUMNS

    table = ProtocolStateChange._meta.db_table
    by_window: dict[int, list[Any]] = {}
    for r in rows:
        by_window.setdefault((r.height - 1) // window, []).append(r)
    started = time.perf_counter()
    for key in sorted(by_window):
        sql = f"COPY {table} ({', '.join(STATE_CHANGE_COLUMNS)}) FROM STDIN"
        with transaction.atomic(), connection.cursor() as cur, cur.cursor.copy(sql) as copy:
            for r in by_window[key]:
                copy.write_row((protocol_pk, chain_id, *r))
    return len(rows) / (time.perf_counter() - started)


class _TipClock:
    """A Progress stand-in that notes when the cursor first reaches the starting tip."""

    def __init__(self, tip: int, first: int) -> None:
        self.total, self.first = tip - first, first
        self.reached: float | None = None

    def update(self, *, label: str, done: int, total: int, note: str = "") -> None:
        if self.reached is None and done >= self.total:
            self.reached = time.perf_counter()

    def close(self) -> None:
        pass


def _portal(
    history_migrate: Any,
    protocol: Any,
    chain: Any,
    rows: list[Any],
    window: int,
    workers: int,
    actor: Any,
    progress: Any,
) -> tuple[float, list[str]]:
    from django.db import connections

    from migrations_app.models import Cursor, ProtocolStateChange, ProtocolWriteSpan

    tip = max(r.height for r in rows)
    clock = _TipClock(tip, 0)
    problems: list[str] = []
    sampling = threading.Event()

    def sample() -> None:
        last = -1
        try:
            while not sampling.is_set():
                value = (
                    Cursor.objects.filter(name=protocol.history_cursor_name)
                    .values_list("height", flat=True)
                    .first()
                )
                if value is not None:
                    if value < last:
                        problems.append(f"cursor went back {last} -> {value}")
                    last = value
                time.sleep(0.05)
        finally:
            connections.close_all()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        history_migrate(
            protocol_ids=["SEP41"],
            chain=chain.slug,
            actor=actor.system("bench:b4"),
            window_size=window,
            workers=workers,
            progress=clock,
            poll_seconds=0.05,
        )
    finally:
        sampling.set()
        sampler.join()
    elapsed = (clock.reached or time.perf_counter()) - started
    cursor = Cursor.objects.get(name=protocol.history_cursor_name).height
    spans = list(
        ProtocolWriteSpan.objects.filter(protocol=protocol)
        .order_by("from_height")
        .values_list("from_height", "to_height")
    )
    if spans[0][0] != 1 or spans[-1][1] != cursor:
        problems.append(f"spans {spans[:3]}… do not cover [1, {cursor}]")
    for (_, end), (start, _) in itertools.pairwise(spans):
        if start != end + 1:
            problems.append(f"gap or overlap at {end}/{start}")
    stored = ProtocolStateChange.objects.filter(protocol=protocol, height__lte=tip).count()
    if stored != len(rows):
        problems.append(f"{stored} rows at or below {tip}, expected {len(rows)}")
    return len(rows) / elapsed, problems


if __name__ == "__main__":
    raise SystemExit(main())
