from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from fleetops.lib.commands import OperatorCommand, positive_int
from fleetops.outbox.services import RELAY_BATCH, outbox_relay


class Command(OperatorCommand):
    help = (
        "Send the due pending outbox messages now (what the `outbox.relay` beat task does every 10 s), "
        "pass after pass until none is due. Safe alongside the beat: relays claim with SKIP LOCKED."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--limit", type=positive_int, default=RELAY_BATCH, help="messages per pass")

    def handle(self, *args: Any, **options: Any) -> None:
        sent = 0
        while True:
            result = outbox_relay(limit=options["limit"])
            sent += result.sent
            if result.error:
                raise CommandError(f"sent {sent}; the broker refused a send: {result.error}")
            if result.claimed < options["limit"]:
                break
        self.stdout.write(self.style.SUCCESS(f"outbox: {sent} sent"))
