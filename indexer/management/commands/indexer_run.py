from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from indexer.models import Chain, IndexerState
from indexer.runner import IndexerRunner, StepResult, rpc_for


class Command(BaseCommand):
    help = "Index a chain forever (or up to --stop-at): one writer per chain, elected by a lease."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--chain", required=True, help="chain slug")
        parser.add_argument("--stop-at", type=int, default=None, help="stop once this height is indexed")
        parser.add_argument("--once", action="store_true", help="run one step and exit")
        parser.add_argument("--poll", type=float, default=1.0, help="seconds between steps when at the tip")

    def handle(self, *args: Any, **options: Any) -> None:
        chain = Chain.objects.filter(slug=options["chain"]).first()
        if chain is None:
            raise CommandError(f"no chain {options['chain']!r}")
        if not chain.sources.filter(enabled=True).exists():
            raise CommandError(f"chain {chain.slug} has no enabled sync source")
        IndexerState.objects.get_or_create(chain=chain)
        holder = f"{socket.gethostname()}:{os.getpid()}"
        with rpc_for(chain) as rpc:
            runner = IndexerRunner(chain, rpc, holder=holder, stop_at=options["stop_at"])
            if options["once"]:
                try:
                    self._report(runner.step(), time.monotonic(), [0])
                finally:
                    runner.release()
                return
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *a: stop.set())
            signal.signal(signal.SIGINT, lambda *a: stop.set())
            started, total = time.monotonic(), [0]
            runner.run(stop, poll=options["poll"], on_step=lambda r: self._report(r, started, total))
        self.stdout.write(self.style.SUCCESS(f"stopped; {total[0]} blocks indexed in this run"))

    def _report(self, result: StepResult, started: float, total: list[int]) -> None:
        total[0] += result.committed
        if not result.leader:
            self.stdout.write(f"standby: {result.note}")
            return
        if result.committed or result.note:
            lag = (result.head or 0) - (result.indexed or 0)
            rate = total[0] / max(time.monotonic() - started, 1e-6)
            self.stdout.write(
                f"indexed {result.indexed} / head {result.head} (lag {lag}) mode={result.mode} "
                f"+{result.committed} blocks, {rate:,.1f} blocks/s {result.note}".rstrip()
            )
