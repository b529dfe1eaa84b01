from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from multiprocessing.util import Finalize
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.db import connection, connections

from fleetops.lib.commands import OperatorCommand, height, positive_int
from fleetops.observability.leases import LeaseGrant, lease_release, lease_renew
from indexer.blocks import ingest_gc, tune_gc_for_ingest
from indexer.commands_common import (
    COMMAND_LEASE_TTL,
    batches,
    chain_or_error,
    indexed_range,
    take_writer_lease,
)
from indexer.ingest import blocks_rewrite
from indexer.models import Chain
from indexer.rpc.client import CometRpc, SourceConfig
from indexer.runner import fetch_blocks, rpc_for
from indexer.verify import (
    HeightDigest,
    digests_from_source,
    digests_stored,
    heights_really_differ,
    range_checksum,
)

REORG_FOUND = (
    "block {height} on the source is {source}…, the stored one is {stored}…: that is a reorg, not "
    "damage. Roll back with `manage.py indexer_rollback --chain {chain} --to {to}` (or let the "
    "indexer do it) instead."
)
# Renew the writer lease at least this often while nothing needs rewriting (the TTL is 5 minutes).
RENEW_EVERY = 60.0
MAX_DEFAULT_WORKERS = 4

Checked = tuple[range, dict[int, HeightDigest], dict[int, HeightDigest]]

# --- the checking workers --------------------------------------------------------------------------------
# Checking a height (fetch /block + /block_results, parse, checksum; the stored side's checksums come
# from PostgreSQL) reads only, so batches are checked in worker processes side by side: one process
# parses ~40-60 blocks/s, whatever the database does. Only heights whose checksums differ come back
# to the command, which re-checks them value by value and rewrites them under the writer lease.

_worker_rpc: CometRpc | None = None
_worker_chain: Chain | None = None


def _worker_start(chain_pk: int, configs: Sequence[SourceConfig]) -> None:
    global _worker_rpc, _worker_chain
    import django

    django.setup()  # a no-op after fork; needed under spawn
    for conn in connections.all(initialized_only=True):
        conn.connection = None  # never touch the parent's socket (it closed them before forking)
    _worker_rpc = CometRpc(list(configs))
    _worker_chain = Chain.objects.get(pk=chain_pk)
    tune_gc_for_ingest()
    Finalize(None, _worker_stop, exitpriority=10)


def _worker_stop() -> None:
    if _worker_rpc is not None:
        _worker_rpc.close()
    connections.close_all()


def _worker_check(heights: range) -> Checked:
    assert _worker_rpc is not None
    assert _worker_chain is not None
    return _check(_worker_rpc, _worker_chain, heights)


def _check(rpc: CometRpc, chain: Chain, heights: range) -> Checked:
    items = fetch_blocks(rpc, heights, max_in_flight=chain.max_in_flight)
    source = digests_from_source(items)
    stored = digests_stored(chain=chain, first=heights[0], last=heights[-1])
    return heights, source, stored


class Command(OperatorCommand):
    help = (
        "Re-index already indexed heights from the source: heights whose stored rows differ are "
        "rewritten atomically, identical heights are left alone (idempotent; rows end identical)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--chain", required=True)
        parser.add_argument("--from", dest="first", type=height, default=None, help="default: oldest indexed")
        parser.add_argument("--to", dest="last", type=height, default=None, help="default: last indexed")
        parser.add_argument("--batch", type=positive_int, default=None, help="heights per transaction")
        parser.add_argument(
            "--workers",
            type=positive_int,
            default=None,
            help=f"processes checking batches side by side (default: CPUs, at most {MAX_DEFAULT_WORKERS}; "
            "1 checks in this process)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        with ingest_gc():
            self._handle(options)

    def _handle(self, options: dict[str, Any]) -> None:
        chain = chain_or_error(options["chain"])
        first, last = indexed_range(chain, options["first"], options["last"])
        size = options["batch"] or chain.catchup_batch_size
        if size < 1:
            raise CommandError("--batch must be at least 1")
        workers = options["workers"] or min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS)
        if workers < 1:
            raise CommandError("--workers must be at least 1")
        grant = take_writer_lease(chain, "indexer_reindex")
        renewed_at = started = time.monotonic()
        checked = rewritten = 0
        digests: list[HeightDigest] = []
        ranges = list(batches(first, last, size))
        pool = self._pool(chain, workers, len(ranges))
        try:
            with rpc_for(chain) as rpc:
                for heights, source, stored in self._checked(pool, rpc, chain, ranges):
                    for height in heights:
                        mine, theirs = stored.get(height), source[height]
                        if mine is not None and mine.block_hash and mine.block_hash != theirs.block_hash:
                            raise CommandError(
                                REORG_FOUND.format(
                                    height=height, source=theirs.block_hash[:16],
                                    stored=mine.block_hash[:16], chain=chain.slug, to=height - 1,
                                )
                            )  # fmt: skip
                    flagged = [h for h in heights if stored.get(h) != source[h]]
                    differ = []
                    if flagged:
                        items = fetch_blocks(rpc, flagged, max_in_flight=chain.max_in_flight)
                        differ = heights_really_differ(chain=chain, items=items)
                    if differ or time.monotonic() - renewed_at > RENEW_EVERY:
                        grant = self._renew(grant)
                        renewed_at = time.monotonic()
                    if differ:
                        rewritten += blocks_rewrite(chain=chain, blocks=differ, lease=grant)
                    checked += len(heights)
                    digests.extend(source.values())
                    self._progress(checked, last - first + 1, rewritten, started)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            lease_release(grant=grant)
        self.stdout.write(
            self.style.SUCCESS(
                f"re-indexed {first}-{last}: {checked} heights checked, {rewritten} rewritten, "
                f"checksum {range_checksum(digests)}"
            )
        )

    @staticmethod
    def _pool(chain: Chain, workers: int, batch_count: int) -> Executor | None:
        if workers < 2 or batch_count < 2 or connection.in_atomic_block:
            return None  # one batch, or inside a caller's transaction the workers could not see
        configs = [
            SourceConfig(s.name, s.rpc_url, s.priority)
            for s in chain.sources.filter(enabled=True).order_by("priority")
        ]
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        # Forked children must not inherit open database sockets: close ours (they reopen lazily).
        connections.close_all()
        return ProcessPoolExecutor(
            max_workers=min(workers, batch_count),
            mp_context=context,
            initializer=_worker_start,
            initargs=(chain.pk, configs),
        )

    @staticmethod
    def _checked(
        pool: Executor | None, rpc: CometRpc, chain: Chain, ranges: list[range]
    ) -> Iterator[Checked]:
        if pool is None:
            for heights in ranges:
                yield _check(rpc, chain, heights)
        else:
            yield from pool.map(_worker_check, ranges)  # in height order, checked ahead in parallel

    @staticmethod
    def _renew(grant: LeaseGrant) -> LeaseGrant:
        renewed = lease_renew(grant=grant, ttl=COMMAND_LEASE_TTL)
        if renewed is None:
            raise CommandError("lost the writer lease; nothing more was written")
        return renewed

    def _progress(self, done: int, total: int, rewritten: int, started: float) -> None:
        elapsed = max(time.monotonic() - started, 1e-6)
        rate = done / elapsed
        eta = (total - done) / rate if rate else 0
        self.stdout.write(
            f"{done}/{total} heights ({done * 100 // total}%), {rewritten} rewritten, "
            f"{rate:,.1f} heights/s, ETA {eta:,.0f}s"
        )
