from __future__ import annotations

import os
import signal
import socket
import threading
import time
from datetime import timedelta
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.db import close_old_connections, connection
from django.db.backends.signals import connection_created

from fleetops.lib import clock
from fleetops.lib.commands import OperatorCommand, port, positive_float, positive_int
from fleetops.observability.context import bound
from fleetops.observability.models import Lease
from indexer.blocks import ingest_gc, lease_name
from indexer.models import Chain, IndexerState, Mode
from indexer.runner import LEASE_TTL, IndexerRunner, StepResult, head_watcher_for, rpc_for

READY_STALE_SECONDS = 60
# No transaction of this process waits on anything outside PostgreSQL, so one that sits idle for
# long is a frozen process (SIGSTOP, a VM pause, a swap storm) holding row locks a standby's takeover
# would wait on. PostgreSQL ends such a session; the fencing token already refuses its late commit.
STATEMENT_TIMEOUT_SECONDS = 120


# Seconds between the writer's progress lines (the demo indexes a block a second).
REPORT_EVERY_SECONDS = 30.0


class SessionGuard:
    """Set the timeouts on this process's sessions while the command runs (the current one and
    every one opened meanwhile, e.g. by the enrichment thread), and take them off again after, so
    an in-process `call_command` leaves its caller's session as it was."""

    def __init__(self, lease_ttl: float):
        self.idle = max(5, int(lease_ttl / 2))

    def _configure(self, sender: Any = None, connection: Any = connection, **kwargs: Any) -> None:
        with connection.cursor() as cursor:
            cursor.execute(f"SET idle_in_transaction_session_timeout = '{self.idle}s'")
            cursor.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT_SECONDS}s'")

    def __enter__(self) -> SessionGuard:
        connection_created.connect(self._configure, weak=False)
        if not connection.in_atomic_block:
            self._configure(connection=connection)
        return self

    def __exit__(self, *exc: object) -> None:
        connection_created.disconnect(self._configure)
        if connection.connection is not None and connection.is_usable():
            with connection.cursor() as cursor:
                cursor.execute("RESET idle_in_transaction_session_timeout")
                cursor.execute("RESET statement_timeout")


class Command(OperatorCommand):
    help = (
        "Index a chain forever (or up to --stop-at): one writer per chain, elected by a lease; "
        "standbys wait and take over. Also runs the enrichment workers unless --ingest-only."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--chain", required=True, help="chain slug")
        only = parser.add_mutually_exclusive_group()
        only.add_argument("--ingest-only", action="store_true", help="no enrichment workers here")
        only.add_argument("--enrich-only", action="store_true", help="only the enrichment workers")
        parser.add_argument(
            "--stop-at", type=positive_int, default=None, help="stop once this height is indexed"
        )
        parser.add_argument("--once", action="store_true", help="run one ingest step and exit")
        parser.add_argument(
            "--poll", type=positive_float, default=1.0, help="seconds between steps at the tip"
        )
        parser.add_argument(
            "--health-port", type=port, default=None, help="serve /health/live, /health/ready, /metrics here"
        )
        parser.add_argument(
            "--health-host", default="127.0.0.1", help="address for --health-port (0.0.0.0: every interface)"
        )
        parser.add_argument("--no-websocket", action="store_true", help="poll /status only")
        parser.add_argument(
            "--lease-ttl",
            type=positive_float,
            default=LEASE_TTL.total_seconds(),
            help="writer lease TTL in seconds: a standby takes over this long after the writer dies",
        )

        parser.add_argument(
            "--report-every",
            type=positive_float,
            default=REPORT_EVERY_SECONDS,
            help="seconds between progress lines (-v 2: one per step); a new note or mode prints at once",
        )

    # What `_report` printed last: progress is summarized per interval so the terminal stays readable.
    report_every: float = REPORT_EVERY_SECONDS
    per_step = False
    _last_report_at = float("-inf")
    _last_said: tuple[str, str] = ("", "")
    _unreported = 0

    def handle(self, *args: Any, **options: Any) -> None:
        self.report_every = options.get("report_every", REPORT_EVERY_SECONDS)
        self.per_step = options.get("verbosity", 1) >= 2
        chain = Chain.objects.filter(slug=options["chain"]).first()
        if chain is None:
            known = ", ".join(Chain.objects.values_list("slug", flat=True)) or "none"
            raise CommandError(f"no chain {options['chain']!r} (known: {known})")
        if not chain.sources.filter(enabled=True).exists():
            raise CommandError(f"chain {chain.slug} has no enabled sync source")
        if options["lease_ttl"] < 1:
            raise CommandError("--lease-ttl must be at least 1 second")
        if options["stop_at"] is not None and options["stop_at"] < 1:
            raise CommandError("--stop-at must be a positive height")
        IndexerState.objects.get_or_create(chain=chain)
        with SessionGuard(options["lease_ttl"]), ingest_gc():
            self._run(chain, options)

    def _run(self, chain: Chain, options: dict[str, Any]) -> None:
        holder = f"{socket.gethostname()}:{os.getpid()}"
        stop = threading.Event()

        def on_signal(*_: Any) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

        with rpc_for(chain) as rpc, bound(actor=f"command:indexer_run:{chain.slug}"):
            watcher = None if options["no_websocket"] or options["enrich_only"] else head_watcher_for(chain)
            runner = IndexerRunner(
                chain,
                rpc,
                holder=holder,
                stop_at=options["stop_at"],
                watcher=watcher,
                lease_ttl=timedelta(seconds=options["lease_ttl"]),
            )
            if options["once"]:
                try:
                    self._report(runner.step(), time.monotonic(), [0])
                finally:
                    runner.release()
                return
            ingest = not options["enrich_only"]
            if options["health_port"] is not None:
                self._serve_health(options["health_host"], options["health_port"], chain, holder, ingest)
            threads = []
            if not options["ingest_only"] and chain.enrichment_enabled:
                threads.append(
                    threading.Thread(
                        target=self._enrich, args=(chain, stop), name="indexer-enrich", daemon=True
                    )
                )
            for thread in threads:
                thread.start()
            started, total = time.monotonic(), [0]
            if ingest:
                runner.run(stop, poll=options["poll"], on_step=lambda r: self._report(r, started, total))
                stop.set()
            else:
                stop.wait()
            for thread in threads:
                thread.join(timeout=10)
        self.stdout.write(self.style.SUCCESS(f"stopped; {total[0]} blocks indexed in this run"))

    def _enrich(self, chain: Chain, stop: threading.Event) -> None:
        from indexer.enrichment import decoder_for, enrichment_loop

        try:
            enrichment_loop(chain=chain, stop=stop, decoder_factory=lambda: decoder_for(chain))
        finally:
            close_old_connections()

    def _serve_health(self, host: str, port: int, chain: Chain, holder: str, ingest: bool) -> None:
        from indexer.health import HealthServer

        def ready() -> dict[str, str]:
            problems: dict[str, str] = {}
            state: Any = IndexerState.objects.filter(chain=chain).values("mode", "paused").first() or {}
            if state.get("mode") == Mode.HALTED:
                problems["mode"] = Mode.HALTED.value
            if not ingest:
                return problems
            lease = Lease.objects.filter(name=lease_name(chain)).values("holder", "expires_at").first()
            if state.get("paused"):
                return problems  # a paused chain gives its lease up on purpose
            if lease is None or lease["holder"] != holder or lease["expires_at"] <= clock.now():
                problems["lease"] = "standby: the writer lease is held elsewhere"
            fresh = chain.sources.filter(
                enabled=True, last_success_at__gt=clock.now() - timedelta(seconds=READY_STALE_SECONDS)
            )
            if not fresh.exists():
                problems["sources"] = f"no source answered in the last {READY_STALE_SECONDS} s"
            return problems

        server = HealthServer(port, ready, host=host)
        server.start()
        self.stdout.write(f"health on http://{host}:{port}/health/ready")

    def _report(self, result: StepResult, started: float, total: list[int]) -> None:
        total[0] += result.committed
        if not result.leader:
            self.stdout.write(f"standby: {result.note}")
            return
        self._unreported += result.committed
        if not (result.committed or result.note):
            return
        # A new note or mode prints at once; plain progress once per `report_every` (every step at -v 2).
        said = (str(result.mode), result.note)
        now = time.monotonic()
        if not self.per_step and said == self._last_said and now - self._last_report_at < self.report_every:
            return
        self._last_said, self._last_report_at = said, now
        lag = (result.head or 0) - (result.indexed or 0)
        rate = total[0] / max(now - started, 1e-6)
        eta = f", ETA {lag / rate:,.0f}s" if rate > 0 and lag > 0 else ""
        self.stdout.write(
            f"indexed {result.indexed} / head {result.head} (lag {lag}{eta}) mode={result.mode} "
            f"+{self._unreported} blocks, {rate:,.1f} blocks/s {result.note}".rstrip()
        )
        self._unreported = 0
