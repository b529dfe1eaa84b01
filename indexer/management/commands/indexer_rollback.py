from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from fleetops.lib.commands import YES_HELP, OperatorCommand, height
from fleetops.lib.errors import ValidationFailed
from fleetops.lib.reason import clean_reason
from fleetops.observability.leases import lease_release
from indexer.commands_common import chain_or_error, command_actor, take_writer_lease
from indexer.ingest import blocks_rollback
from indexer.metrics import ROLLED_BACK
from indexer.models import IndexerState


class Command(OperatorCommand):
    help = (
        "Delete every indexed row above --to (blocks, txs, events, enrichment, producers' rows and "
        "cursors) in one transaction, audited; the indexer re-ingests from there. Takes the writer "
        "lease: pause the chain first if indexer_run is running (or use the admin action instead)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--chain", required=True)
        parser.add_argument("--to", dest="to", type=height, required=True, help="keep heights up to this")
        parser.add_argument("--reason", required=True, help="why (goes into the audit log)")
        parser.add_argument("--yes", action="store_true", help=YES_HELP)

    def handle(self, *args: Any, **options: Any) -> None:
        chain = chain_or_error(options["chain"])
        try:
            reason = clean_reason(options["reason"])
        except ValidationFailed as exc:
            raise CommandError(f"--reason: {exc.message}") from exc
        state = IndexerState.objects.get(chain=chain)
        to = options["to"]
        last, oldest = state.last_indexed_height, state.oldest_indexed_height
        if last is None or oldest is None:
            raise CommandError(f"chain {chain.slug} has nothing indexed yet")
        if to >= last or to < oldest - 1:
            raise CommandError(f"--to must be between {oldest - 1} and {last - 1} (indexed: {oldest}-{last})")
        self.confirm(
            f"delete heights {to + 1}-{last} of {chain.slug} ({last - to} blocks)", yes=options["yes"]
        )
        grant = take_writer_lease(chain, "indexer_rollback")
        try:
            removed = blocks_rollback(
                chain=chain, to_height=to, lease=grant, actor=command_actor("indexer_rollback"), reason=reason
            )
        finally:
            lease_release(grant=grant)
        ROLLED_BACK.labels(chain=chain.slug).inc(removed)
        self.stdout.write(self.style.SUCCESS(f"rolled {chain.slug} back to {to}: {removed} blocks removed"))
