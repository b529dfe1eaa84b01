from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from fleetops.audit.actors import Actor
from fleetops.lib.commands import OperatorCommand
from fleetops.lib.errors import DomainError
from fleetops.observability.context import bound
from migrations_app.models import MigrationStatus
from migrations_app.protocols.services import chain_for_setup, protocol_classify, protocol_register


class Command(OperatorCommand):
    help = (
        "Register protocols (SEP41, SEP50, …) on a chain and classify the contracts seen in the events "
        "indexed so far; classification status in_progress -> success | failed. Safe to re-run."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--protocol-id",
            nargs="+",
            action="extend",
            required=True,
            dest="protocol_ids",
            help="one or more protocol ids (repeatable)",
        )
        parser.add_argument(
            "--chain",
            default=None,
            help="chain slug (needed when there are several; a protocol is set up per chain)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        actor = Actor.system("command:protocol_setup")
        failed = []
        with bound(actor=actor.id):
            try:
                chain = chain_for_setup(slug=options["chain"])
                protocols = [
                    protocol_register(protocol_id=pid, chain=chain, actor=actor)
                    for pid in dict.fromkeys(options["protocol_ids"])
                ]
            except DomainError as exc:
                raise CommandError(exc.message) from exc
            for protocol in protocols:
                try:
                    result = protocol_classify(protocol=protocol, actor=actor)
                except DomainError as exc:
                    raise CommandError(exc.message) from exc
                if result.status == MigrationStatus.SUCCESS:
                    rejected = f", {len(result.rejected)} rejected" if result.rejected else ""
                    accepted = len(result.accepted)
                    self.stdout.write(
                        f"{protocol.protocol_id} on {chain.slug}: classified, {accepted} contracts{rejected}"
                    )
                else:
                    failed.append(protocol.protocol_id)
                    self.stderr.write(
                        f"{protocol.protocol_id} on {chain.slug}: classification failed: {result.error}"
                    )
        if failed:
            raise CommandError(f"classification failed for {', '.join(failed)}")
