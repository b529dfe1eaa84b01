from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from django.core.management.base import CommandError, CommandParser

from fleetops.audit.actors import Actor
from fleetops.lib.commands import OperatorCommand, height, positive_float
from fleetops.lib.errors import DomainError
from fleetops.observability.context import bound
from migrations_app.protocols.current_state import current_state_migrate
from migrations_app.protocols.history import (
    DEFAULT_WINDOW_SIZE,
    MAX_WORKERS,
    NOTHING_TO_DO,
    Progress,
    RunResult,
    history_migrate,
)


class Command(OperatorCommand):
    help = (
        "Backfill protocol data on one chain and hand off to live ingestion. `history`: state changes "
        "from the oldest indexed height; `current-state`: balances / owners from --start-height. Each "
        "runs to the tip, waits there until live ingestion takes over, and exits; a re-run resumes at "
        "cursor + 1."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="migration", required=True)
        history = sub.add_parser("history", help="backfill protocol state changes")
        history.add_argument(
            "--protocol-id",
            nargs="+",
            action="extend",
            required=True,
            dest="protocol_ids",
            help="one or more protocol ids",
        )
        history.add_argument(
            "--workers",
            type=int,
            default=1,
            help=(
                f"windows read and classified in parallel (worker processes), committed in order "
                f"(1-{MAX_WORKERS}, default 1)"
            ),
        )
        current = sub.add_parser("current-state", help="build balances / owners from a start height")
        current.add_argument("--protocol-id", required=True, dest="protocol_id")
        current.add_argument("--start-height", type=height, required=True)
        for p in (history, current):
            p.add_argument(
                "--chain",
                default=None,
                help="chain slug (needed when the protocols are registered on several chains)",
            )
            p.add_argument(
                "--window-size",
                type=int,
                default=DEFAULT_WINDOW_SIZE,
                help=f"heights per commit (default {DEFAULT_WINDOW_SIZE})",
            )
            p.add_argument(
                "--poll", type=positive_float, default=1.0, help="seconds between checks at the tip"
            )
            p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")

    def handle(self, *args: Any, **options: Any) -> None:
        stop = threading.Event()

        def on_signal(*_: Any) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        progress = None if options["no_progress"] else Progress(sys.stderr)
        common = {
            "window_size": options["window_size"],
            "progress": progress,
            "stop": stop,
            "poll_seconds": options["poll"],
            "chain": options["chain"],
        }
        try:
            if options["migration"] == "history":
                actor = Actor.system("command:protocol_migrate history")
                with bound(actor=actor.id):
                    result = history_migrate(
                        protocol_ids=options["protocol_ids"],
                        actor=actor,
                        workers=options["workers"],
                        **common,
                    )
            else:
                actor = Actor.system("command:protocol_migrate current-state")
                with bound(actor=actor.id):
                    result = current_state_migrate(
                        protocol_id=options["protocol_id"],
                        start_height=options["start_height"],
                        actor=actor,
                        **common,
                    )
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        self._report(result)

    def _report(self, result: RunResult) -> None:
        if result.skipped:
            self.stdout.write(NOTHING_TO_DO.format(ids=", ".join(result.skipped)))
        for pid in result.handed_off:
            self.stdout.write(
                f"{pid} on {result.chain}: {result.migration} migration complete: "
                f"{result.heights.get(pid, 0)} heights, "
                f"{result.rows.get(pid, 0)} rows; handed off to live ingestion at height "
                f"{result.handoff_heights.get(pid)}"
            )
        if result.failed:
            raise CommandError(
                f"{result.migration} migration did not complete for {', '.join(result.failed)} "
                "(its status was changed by another process; see the audit log)"
            )
