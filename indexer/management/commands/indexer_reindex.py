from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from fleetops.observability.leases import lease_release, lease_renew
from indexer.commands_common import (
    COMMAND_LEASE_TTL,
    batches,
    chain_or_error,
    indexed_range,
    take_writer_lease,
)
from indexer.ingest import blocks_rewrite
from indexer.runner import fetch_blocks, rpc_for
from indexer.verify import HeightDigest, digests_from_source, digests_stored, range_checksum

REORG_FOUND = (
    "block {height} on the source is {source}…, the stored one is {stored}…: that is a reorg, not "
    "damage. Roll back with `manage.py indexer_rollback --chain {chain} --to {to}` (or let the "
    "indexer do it) instead."
)


class Command(BaseCommand):
    help = (
        "Re-index already indexed heights from the source: heights whose stored rows differ are "
        "rewritten atomically, identical heights are left alone (idempotent; rows end identical)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--chain", required=True)
        parser.add_argument("--from", dest="first", type=int, default=None, help="default: oldest indexed")
        parser.add_argument("--to", dest="last", type=int, default=None, help="default: last indexed")
        parser.add_argument("--batch", type=int, default=None, help="heights per transaction")

    def handle(self, *args: Any, **options: Any) -> None:
        chain = chain_or_error(options["chain"])
        first, last = indexed_range(chain, options["first"], options["last"])
        size = options["batch"] or chain.catchup_batch_size
        if size < 1:
            raise CommandError("--batch must be at least 1")
        grant = take_writer_lease(chain, "indexer_reindex")
        started = time.monotonic()
        checked = rewritten = 0
        digests: list[HeightDigest] = []
        try:
            with rpc_for(chain) as rpc:
                for heights in batches(first, last, size):
                    items = fetch_blocks(rpc, heights, max_in_flight=chain.max_in_flight)
                    source = digests_from_source(items)
                    stored = digests_stored(chain=chain, first=heights[0], last=heights[-1])
                    for item in items:
                        mine = stored.get(item.height)
                        if mine is not None and mine.block_hash and mine.block_hash != item.block.hash:
                            raise CommandError(
                                REORG_FOUND.format(
                                    height=item.height, source=item.block.hash[:16],
                                    stored=mine.block_hash[:16], chain=chain.slug, to=item.height - 1,
                                )
                            )  # fmt: skip
                    differ = [i for i in items if stored.get(i.height) != source[i.height]]
                    if differ:
                        renewed = lease_renew(grant=grant, ttl=COMMAND_LEASE_TTL)
                        if renewed is None:
                            raise CommandError("lost the writer lease; nothing more was written")
                        grant = renewed
                        rewritten += blocks_rewrite(chain=chain, blocks=differ, lease=grant)
                    checked += len(items)
                    digests.extend(source.values())
                    self._progress(checked, last - first + 1, rewritten, started)
        finally:
            lease_release(grant=grant)
        self.stdout.write(
            self.style.SUCCESS(
                f"re-indexed {first}-{last}: {checked} heights checked, {rewritten} rewritten, "
                f"checksum {range_checksum(digests)}"
            )
        )

    def _progress(self, done: int, total: int, rewritten: int, started: float) -> None:
        elapsed = max(time.monotonic() - started, 1e-6)
        rate = done / elapsed
        eta = (total - done) / rate if rate else 0
        self.stdout.write(
            f"{done}/{total} heights ({done * 100 // total}%), {rewritten} rewritten, "
            f"{rate:,.1f} heights/s, ETA {eta:,.0f}s"
        )
