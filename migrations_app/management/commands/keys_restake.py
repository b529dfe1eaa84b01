from __future__ import annotations

import signal
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from fleetops.observability.context import bound
from migrations_app.keys.schedule import restake_tick
from migrations_app.keys.verification import verify_tick


class Command(BaseCommand):
    help = (
        "Run the key re-stake schedule: one pass (--once) or a pass every --interval seconds (--loop). "
        "--with-verify also runs a verification pass after each re-stake pass."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        mode = parser.add_mutually_exclusive_group(required=True)
        mode.add_argument("--once", action="store_true")
        mode.add_argument("--loop", action="store_true")
        parser.add_argument("--interval", type=float, default=30.0)
        parser.add_argument("--batch-size", type=int, default=None)
        parser.add_argument("--with-verify", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        stopping = False

        def stop(signum: int, frame: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        while True:
            started = time.monotonic()
            with bound(actor="command:keys_restake"):
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
            self.stdout.write(line)
            if options["once"] or stopping:
                return
            # Sleep in short steps so SIGTERM ends the loop promptly.
            while not stopping and time.monotonic() - started < options["interval"]:
                time.sleep(min(0.1, options["interval"]))
            if stopping:
                return
