"""Helpers shared by the indexer benchmarks (B3 catch-up/reindex/rollback/kill, B5 reads).

Django must be set up (bench.common.setup_django) before anything here that touches the database.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.b1_reconciler import free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]
INDEXER_TABLES = ("indexer_enrichment", "indexer_event", "indexer_transaction", "indexer_block")


# --- the chain simulator, as its own process (the indexer gets the other core) -----------------------


class ChainSim:
    def __init__(self, *, txs_per_block: int, extra_tx_events: int, seed: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "simulators.chain",
                "--port",
                str(self.port),
                "--seed",
                str(seed),
                "--block-interval",
                "0",
                "--txs-per-block",
                str(txs_per_block),
                "--extra-tx-events",
                str(extra_tx_events),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        wait_http(f"{self.url}/control/state")

    def control(self, path: str, body: dict[str, Any] | None = None, timeout: float = 600) -> Any:
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def produce(self, blocks: int) -> int:
        """Grow the chain by `blocks` (the control endpoint takes at most 10,000 per call)."""
        state = self.control("/control/state")
        while blocks > 0:
            step = min(blocks, 10_000)
            state = self.control("/control/produce", {"blocks": step})
            blocks -= step
        return int(state["head"])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


# --- rows --------------------------------------------------------------------------------------------


def bench_org(slug: str = "bench", name: str = "Bench") -> Any:
    from fleetops.access.models import Organization

    return Organization.objects.get_or_create(slug=slug, defaults={"name": name})[0]


def make_chain(*, org: Any, slug: str, chain_id: str, rpc_url: str = "http://127.0.0.1:9") -> Any:
    from indexer.models import Chain, IndexerState, SyncSource

    chain = Chain.objects.create(org=org, slug=slug, chain_id=chain_id, expected_block_time_seconds=1.0)
    IndexerState.objects.create(chain=chain)
    SyncSource.objects.create(chain=chain, name="primary", rpc_url=rpc_url, priority=1)
    return chain


def truncate_indexed_rows() -> None:
    """Empty the indexed tables (every chain): fresh files, so repeated runs start equal."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(f"TRUNCATE {', '.join(INDEXER_TABLES)}")


def reset_state(chain: Any) -> None:
    from indexer.models import Chain, IndexerState

    IndexerState.objects.filter(chain=chain).update(
        last_indexed_height=None,
        oldest_indexed_height=None,
        mode="catching_up",
        poison_height=None,
        poison_attempts=0,
        last_error="",
    )
    Chain.objects.filter(pk=chain.pk).update(fingerprint="")
    chain.fingerprint = ""


def column_oids(table: str, columns: Sequence[str]) -> list[int]:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(
            "SELECT attname, atttypid::int FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0",
            [table],
        )
        oids = dict(cur.fetchall())
    return [oids[c] for c in columns]


def copy_binary(
    table: str, columns: Sequence[str], oids: Sequence[int], rows: Iterable[Sequence[Any]]
) -> int:
    """Binary COPY over Django's connection (so it shares the caller's transaction)."""
    from django.db import connection

    count = 0
    with connection.cursor() as cursor:
        raw = cursor.cursor
        with raw.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(list(oids))
            for row in rows:
                copy.write_row(row)
                count += 1
    return count


def _md5_sql(table: str, columns: str, order: str, where: str) -> str:
    # Per-height digests first, then a digest of those in height order: the same as one md5 over
    # all ordered rows for comparing runs, without building one multi-hundred-MB string.
    return (
        f"SELECT count(*), coalesce(sum(n), 0), md5(string_agg(h, '' ORDER BY height)) FROM ("
        f"  SELECT height, count(*) AS n,"
        f"    md5(string_agg(concat_ws('|', {columns}), E'\\n' ORDER BY {order})) AS h"
        f"  FROM {table} WHERE {where} GROUP BY height) per_height"
    )


CHECKSUM_SPECS = {
    "blocks": ("indexer_block", "height, hash, parent_hash, time, proposer, tx_count", "height"),
    "txs": ("indexer_transaction", "index, hash, code, gas_wanted, gas_used", "index"),
    "events": (
        "indexer_event",
        "phase, coalesce(tx_index, -1), event_index, type, attributes::text",
        "phase, tx_index NULLS FIRST, event_index",
    ),
    # Identity and payload only: next_attempt_at is "now" at commit time, so it differs per run.
    "enrichments": (
        "indexer_enrichment",
        "phase, coalesce(tx_index, -1), event_index, encoding, payload, status",
        "phase, tx_index NULLS FIRST, event_index",
    ),
}


def checksums(chain: Any, *, max_height: int | None = None) -> dict[str, tuple[int, str]]:
    """{table: (rows, md5 over its rows ordered by identity)} for one chain (ids and chain excluded)."""
    from django.db import connection

    where = "chain_id = %s" + (" AND height <= %s" if max_height is not None else "")
    params = [chain.pk] + ([max_height] if max_height is not None else [])
    out = {}
    with connection.cursor() as cur:
        for name, (table, columns, order) in CHECKSUM_SPECS.items():
            cur.execute(_md5_sql(table, columns, order, where), params)
            _heights, rows, digest = cur.fetchone()
            out[name] = (int(rows), digest or "")
    return out


def total_rows(sums: dict[str, tuple[int, str]]) -> int:
    return sum(rows for rows, _ in sums.values())


# --- processes and timing ----------------------------------------------------------------------------


def manage(*args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    """`manage.py <args>` against the benchmark's database (DATABASE_URL as set_up_django left it)."""
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "fleetops.settings.test")
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    return subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def run_manage(*args: str, log: Path | None = None, timeout: float = 3600) -> float:
    started = time.perf_counter()
    process = manage(*args, log=log)
    code = process.wait(timeout)
    if code != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} exited {code} (log: {log})")
    return time.perf_counter() - started


def run_indexer(chain: Any, *args: str, log: Path | None = None, timeout: float = 3600) -> float:
    """`manage.py indexer_run --chain <slug> <args>` to completion; fails fast (killing it) when the
    writer halts or parks on a poison height instead of looping until the timeout."""
    from indexer.models import IndexerState

    started = time.perf_counter()
    process = manage("indexer_run", "--chain", chain.slug, *args, log=log)
    while process.poll() is None:
        state = IndexerState.objects.get(chain=chain)
        stuck = state.mode == "halted" or state.poison_attempts >= 3
        if stuck or time.perf_counter() - started > timeout:
            process.kill()
            process.wait()
            raise RuntimeError(f"indexer_run {chain.slug} stopped making progress: {state.last_error[:500]}")
        time.sleep(0.25)
    if process.returncode != 0:
        raise RuntimeError(f"indexer_run {chain.slug} exited {process.returncode} (log: {log})")
    return time.perf_counter() - started


def paired_medians(
    runs: int, portal: Callable[[], float], raw: Callable[[], float], *, warmup: int = 1
) -> tuple[float, list[float], float, list[float]]:
    """Median of `runs` after `warmup`, the two paths alternating (raw first, so the portal's rows
    are what stays behind) so that the machine's noise hits both alike."""
    for _ in range(warmup):
        raw()
        portal()
    portal_samples, raw_samples = [], []
    for _ in range(runs):
        raw_samples.append(raw())
        portal_samples.append(portal())
    return (
        statistics.median(portal_samples),
        portal_samples,
        statistics.median(raw_samples),
        raw_samples,
    )


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def fmt_runs(samples: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    return "[" + ", ".join(f"{s * scale:.{digits}f}" for s in samples) + "]"
