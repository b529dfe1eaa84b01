from __future__ import annotations

import signal
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from fleetops.observability.context import bound
from migrations_app.keys.verification import verify_tick


class Command(BaseCommand):
    help = "Verify pending stake transactions against the chain: one pass (--once) or --loop."

    def add_arguments(self, parser: CommandParser) -> None:
        mode = parser.add_mutually_exclusive_group(required=True)
        mode.add_argument("--once", action="store_true")
        mode.add_argument("--loop", action="store_true")
        parser.add_argument("--interval", type=float, default=30.0)

    def handle(self, *args: Any, **options: Any) -> None:
        stopping = False

        def stop(signum: int, frame: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        while True:
            started = time.monotonic()
            with bound(actor="command:keys_verify"):
                result = verify_tick()
            self.stdout.write(
                f"verify: checked={result.checked} confirmed={result.confirmed} absent={result.absent} "
                f"unavailable={result.unavailable} expired={result.expired} succeeded={result.succeeded} "
                f"failed={result.failed} duration={result.duration:.3f}s"
            )
            if options["once"] or stopping:
                return
            while not stopping and time.monotonic() - started < options["interval"]:
                time.sleep(min(0.1, options["interval"]))
            if stopping:
                return
