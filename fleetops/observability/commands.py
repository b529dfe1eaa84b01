"""The base of the commands that run one tick of a loop (`--once`) or a tick every `--interval`
seconds (`--loop`), as an alternative to the beat schedule. SIGTERM and SIGINT end the loop after
the current tick; the sleep between ticks is cut into short steps so a stop is prompt."""

from __future__ import annotations

import signal
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from fleetops.observability.context import bound


class TickCommand(BaseCommand):
    actor: str  # the log context of every tick, e.g. "command:curtailment_reconcile"
    default_interval = 30.0

    def add_arguments(self, parser: CommandParser) -> None:
        mode = parser.add_mutually_exclusive_group(required=True)
        mode.add_argument("--once", action="store_true", help="one tick, then exit")
        mode.add_argument("--loop", action="store_true", help="a tick every --interval seconds")
        parser.add_argument("--interval", type=float, default=self.default_interval)
        self.add_tick_arguments(parser)

    def add_tick_arguments(self, parser: CommandParser) -> None:
        """Extra arguments of the subclass."""

    def tick(self, options: dict[str, Any]) -> str:
        """Run one tick; returns the line to print about it."""
        raise NotImplementedError

    def handle(self, *args: Any, **options: Any) -> None:
        stopping = False

        def stop(signum: int, frame: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        while True:
            started = time.monotonic()
            with bound(actor=self.actor):
                line = self.tick(options)
            self.stdout.write(line)
            if options["once"] or stopping:
                return
            while not stopping and time.monotonic() - started < options["interval"]:
                time.sleep(min(0.1, options["interval"]))
            if stopping:
                return
