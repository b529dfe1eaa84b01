"""The base of the commands that run one tick of a loop (`--once`) or a tick every `--interval`
seconds (`--loop`), as an alternative to the beat schedule.

A `--loop` outlives its dependencies and exits only on SIGTERM or SIGINT:

1. A tick that raises is logged, never fatal. A database error (the server restarted, the network
   dropped) closes this process's connections so the next tick reconnects; a broker error leaves
   kombu to reconnect on the next publish.
2. The next try waits a full-jitter exponential backoff (1 s doubling up to `--max-backoff`), so a
   fleet of loops does not hammer a database that is coming back.
3. The loop's own heartbeat row (`loop.<command>`) is written after every tick. A failed tick writes
   it with the reason (`database_unavailable`, `broker_unavailable`, `tick_failed`) when the
   database still answers; while the database is down nothing can be written, so the first beat
   after it is back says what happened in `last_outage` (reason, first and last error, since,
   until, failed ticks), and every later beat keeps it.
4. SIGTERM and SIGINT end the loop after the current tick; every sleep is cut into short steps so a
   stop is prompt, during a backoff too.

`--once` runs one tick; a database or broker outage there is a one-line CommandError (exit 1).
Bad numbers (`--interval -1`, `--batch-size 0`) are refused while the arguments are parsed, by the
`type=` callables of `fleetops.lib.commands`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.db import close_old_connections

from fleetops.lib import clock
from fleetops.lib.backoff import backoff_delay
from fleetops.lib.commands import OperatorCommand, positive_float
from fleetops.observability.context import bound
from fleetops.observability.heartbeats import heartbeat_beat
from fleetops.observability.outages import (
    BROKER_ERRORS,
    DATABASE_ERRORS,
    TICK_FAILED,
    close_db_connections,
    one_line,
    outage_reason,
)

log = logging.getLogger(__name__)

ONCE_UNAVAILABLE = "{reason}: {error}"

BACKOFF_BASE_SECONDS = 1.0
STOP_CHECK_SECONDS = 0.1


@dataclass
class Outage:
    """Consecutive failed ticks, from the first failure until a tick succeeds again."""

    reason: str
    first_error: str
    since: str
    failed_ticks: int = 0
    last_error: str = ""

    def as_details(self, *, until: str | None = None) -> dict[str, Any]:
        details: dict[str, Any] = {
            "reason": self.reason,
            "first_error": self.first_error,
            "last_error": self.last_error,
            "since": self.since,
            "failed_ticks": self.failed_ticks,
        }
        if until is not None:
            details["until"] = until
        return details


class TickCommand(OperatorCommand):
    actor: str  # the log context of every tick, e.g. "command:curtailment_reconcile"
    default_interval = 30.0
    default_max_backoff = 30.0

    def add_arguments(self, parser: CommandParser) -> None:
        mode = parser.add_mutually_exclusive_group(required=True)
        mode.add_argument("--once", action="store_true", help="one tick, then exit")
        mode.add_argument("--loop", action="store_true", help="a tick every --interval seconds")
        parser.add_argument(
            "--interval", type=positive_float, default=self.default_interval, help="seconds (> 0)"
        )
        parser.add_argument(
            "--max-backoff",
            type=positive_float,
            default=self.default_max_backoff,
            help="longest wait in seconds before retrying a failed tick (full jitter, from 1 s up)",
        )
        self.add_tick_arguments(parser)

    def add_tick_arguments(self, parser: CommandParser) -> None:
        """Extra arguments of the subclass."""

    def tick(self, options: dict[str, Any]) -> str:
        """Run one tick; returns the line to print about it."""
        raise NotImplementedError

    @property
    def loop_name(self) -> str:
        """The loop's heartbeat row: `loop.curtailment_reconcile` for `command:curtailment_reconcile`."""
        return "loop." + self.actor.partition(":")[2]

    def handle(self, *args: Any, **options: Any) -> None:
        if options["once"]:
            try:
                with bound(actor=self.actor):
                    line = self.tick(options)
            except (*DATABASE_ERRORS, *BROKER_ERRORS) as exc:
                raise CommandError(ONCE_UNAVAILABLE.format(reason=outage_reason(exc), error=one_line(exc)))
            self.stdout.write(line)
            return
        self.run_loop(options)

    def run_loop(self, options: dict[str, Any]) -> None:
        stopping = False

        def stop(signum: int, frame: Any) -> None:
            nonlocal stopping
            stopping = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._loop(options, stopped=lambda: stopping)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self, options: dict[str, Any], *, stopped: Callable[[], bool]) -> None:
        interval: float = options["interval"]
        max_backoff: float = options["max_backoff"]
        outage: Outage | None = None
        last_outage: dict[str, Any] | None = None

        def sleep(seconds: float) -> None:
            until = time.monotonic() + seconds
            while not stopped() and (left := until - time.monotonic()) > 0:
                time.sleep(min(STOP_CHECK_SECONDS, left))

        while not stopped():
            started = time.monotonic()
            try:
                with bound(actor=self.actor):
                    line = self.tick(options)
                    details: dict[str, Any] = {
                        "pid": os.getpid(),
                        "host": socket.gethostname(),
                        "interval": interval,
                    }
                    if outage is not None:
                        last_outage = outage.as_details(until=clock.now().isoformat())
                    if last_outage is not None:
                        details["last_outage"] = last_outage
                    heartbeat_beat(
                        name=self.loop_name, ok=True, duration=time.monotonic() - started, details=details
                    )
            except Exception as exc:
                reason = outage_reason(exc)
                error = one_line(exc)
                if outage is None:
                    outage = Outage(reason=reason, first_error=error, since=clock.now().isoformat())
                outage.failed_ticks += 1
                outage.last_error = error
                if reason == TICK_FAILED:
                    log.exception("%s: tick failed", self.loop_name)
                else:
                    log.warning("%s: %s: %s", self.loop_name, reason, error)
                close_db_connections()
                self._beat_failure(outage, reason=reason, error=error, duration=time.monotonic() - started)
                base = min(BACKOFF_BASE_SECONDS, max_backoff)
                sleep(backoff_delay(outage.failed_ticks, base=base, cap=max_backoff))
                continue
            if outage is not None:
                log.warning(
                    "%s: recovered after %d failed tick(s) (%s)",
                    self.loop_name,
                    outage.failed_ticks,
                    outage.reason,
                )
                outage = None
            self.stdout.write(line)
            # Like the end of a web request: drop a connection past CONN_MAX_AGE or left unusable.
            close_old_connections()
            sleep(interval - (time.monotonic() - started))

    def _beat_failure(self, outage: Outage, *, reason: str, error: str, duration: float) -> None:
        """Say why in the heartbeat while the database still answers (a broker outage, a bug); during
        a database outage this fails too, and the first beat after it tells the story."""
        try:
            heartbeat_beat(
                name=self.loop_name,
                ok=False,
                duration=duration,
                error=f"{reason}: {error}",
                details={"pid": os.getpid(), "host": socket.gethostname(), "outage": outage.as_details()},
            )
        except Exception:
            close_db_connections()
