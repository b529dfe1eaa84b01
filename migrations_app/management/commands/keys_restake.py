from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from fleetops.lib.commands import positive_int
from fleetops.observability.commands import TickCommand
from migrations_app.keys.schedule import restake_tick
from migrations_app.keys.verification import verify_tick


class Command(TickCommand):
    help = (
        "Run the key re-stake schedule: one pass (--once) or a pass every --interval seconds (--loop). "
        "--with-verify also runs a verification pass after each re-stake pass."
    )
    actor = "command:keys_restake"

    def add_tick_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--batch-size", type=positive_int, default=None, help="keys per claim (> 0)")
        parser.add_argument("--with-verify", action="store_true")

    def tick(self, options: dict[str, Any]) -> str:
        result = restake_tick(batch_size=options["batch_size"])
        line = (
            f"restake: claimed={result.claimed} recovered={result.recovered} sent={result.sent} "
            f"rejected={result.rejected} unknown={result.unknown} "
            f"chain_unavailable={result.chain_unavailable} duration={result.duration:.3f}s"
        )
        if options["with_verify"]:
            verified = verify_tick()
            line += (
                f" | verify: checked={verified.checked} confirmed={verified.confirmed} "
                f"absent={verified.absent} unavailable={verified.unavailable} "
                f"expired={verified.expired}"
            )
        return line
