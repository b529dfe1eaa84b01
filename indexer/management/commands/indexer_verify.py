from __future__ import annotations

import time
from typing import Any

from django.core.management.base import CommandError, CommandParser

from fleetops.lib.commands import OperatorCommand, height, non_negative_int, positive_int
from indexer.commands_common import batches, chain_or_error, indexed_range
from indexer.runner import fetch_blocks, rpc_for
from indexer.verify import digests_from_source, digests_stored, range_checksum


class Command(OperatorCommand):
    help = (
        "Compare stored heights with the source: counts of blocks, transactions and events and a "
        "checksum per height. Read-only; exits non-zero when anything differs."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--chain", required=True)
        parser.add_argument("--from", dest="first", type=height, default=None, help="default: oldest indexed")
        parser.add_argument("--to", dest="last", type=height, default=None, help="default: last indexed")
        parser.add_argument("--batch", type=positive_int, default=100)
        parser.add_argument(
            "--show", type=non_negative_int, default=20, help="how many differing heights to list"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        chain = chain_or_error(options["chain"])
        first, last = indexed_range(chain, options["first"], options["last"])
        started = time.monotonic()
        counts = {"stored": [0, 0, 0], "source": [0, 0, 0]}
        ours, theirs, differing = [], [], []
        with rpc_for(chain) as rpc:
            for heights in batches(first, last, max(1, options["batch"])):
                source = digests_from_source(fetch_blocks(rpc, heights, max_in_flight=chain.max_in_flight))
                stored = digests_stored(chain=chain, first=heights[0], last=heights[-1])
                for height in heights:
                    s, o = source[height], stored.get(height)
                    theirs.append(s)
                    counts["source"] = [
                        a + b for a, b in zip(counts["source"], (1, s.txs, s.events), strict=True)
                    ]
                    if o is not None:
                        ours.append(o)
                        counts["stored"] = [
                            a + b for a, b in zip(counts["stored"], (1, o.txs, o.events), strict=True)
                        ]
                    if o != s:
                        differing.append((height, o, s))
                done = heights[-1] - first + 1
                rate = done / max(time.monotonic() - started, 1e-6)
                self.stdout.write(f"{done}/{last - first + 1} heights verified, {rate:,.1f} heights/s")
        for label in ("stored", "source"):
            b, t, e = counts[label]
            self.stdout.write(f"{label:>6}: {b} blocks, {t} txs, {e} events")
        self.stdout.write(f"stored checksum {range_checksum(ours)}")
        self.stdout.write(f"source checksum {range_checksum(theirs)}")
        if differing:
            for height, o, s in differing[: options["show"]]:
                mine = f"{o.txs} txs, {o.events} events, block {o.block_hash[:12]}" if o else "missing"
                self.stdout.write(
                    f"  height {height}: stored {mine}; source {s.txs} txs, {s.events} events, "
                    f"block {s.block_hash[:12]}"
                )
            raise CommandError(
                f"{len(differing)} of {last - first + 1} heights differ from the source; "
                f"`manage.py indexer_reindex --chain {chain.slug} --from {differing[0][0]} --to "
                f"{differing[-1][0]}` rewrites them (a different block hash means a reorg: roll back instead)"
            )
        self.stdout.write(self.style.SUCCESS(f"{first}-{last}: identical to the source"))
