from __future__ import annotations

import signal
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from curtailment.reconciler import reconcile_tick
from fleetops.observability.context import bound


class Command(BaseCommand):
    help = "Run the curtailment reconciler: one tick (--once) or a tick every --interval seconds (--loop)."

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
            self.stdout.write("stopping after the current tick")

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        while True:
            started = time.monotonic()
            with bound(actor="command:curtailment_reconcile"):
                result = reconcile_tick()
            self.stdout.write(
                f"tick: ran={result.ran} live_events={result.live_events} failures={result.failures} "
                f"races_lost={result.races_lost} duration={result.duration:.3f}s"
            )
            if options["once"] or stopping:
                return
            # Sleep in short steps so SIGTERM ends the loop promptly.
            while not stopping and time.monotonic() - started < options["interval"]:
                time.sleep(0.2)
            if stopping:
                return
