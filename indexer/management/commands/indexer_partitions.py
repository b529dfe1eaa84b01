from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from fleetops.lib.commands import OperatorCommand
from indexer import partitions
from indexer.commands_common import chain_or_error, command_actor
from indexer.retention import partitions_maintain


class Command(OperatorCommand):
    help = (
        "Create the height-range partitions ahead of each chain's indexed tip and drop the ranges "
        "wholly below its retention horizon (Chain.retain_heights; one audit row per range dropped). "
        "What the periodic task indexer.partitions runs; --list shows the ranges instead."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--chain", help="one chain (default: every chain)")
        parser.add_argument("--list", action="store_true", help="list the range partitions, change nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        chains = [chain_or_error(options["chain"])] if options["chain"] else None
        if options["list"]:
            from indexer.models import Chain

            for chain in chains or list(Chain.objects.all()):
                for model in partitions.PARTITIONED:
                    table = model._meta.db_table
                    for part in partitions.range_partitions(chain_pk=chain.pk, table=table):
                        self.stdout.write(
                            f"{chain.slug:<20} {part.name:<44} heights {part.start}-{part.end - 1} "
                            f"~{max(part.rows, 0):,} rows"
                        )
            return
        result = partitions_maintain(chains=chains, actor=command_actor("indexer_partitions"))
        for slug, created in result.created.items():
            for name in created:
                self.stdout.write(f"{slug}: created {name}")
        for slug, dropped in result.dropped.items():
            for item in dropped:
                self.stdout.write(
                    f"{slug}: dropped heights {item.start}-{item.end - 1} "
                    f"({', '.join(item.partitions)}; ~{item.rows:,} rows)"
                )
        if result.failed:
            raise CommandError("; ".join(f"{slug}: {error}" for slug, error in result.failed.items()))
        self.stdout.write(self.style.SUCCESS("partitions up to date"))
