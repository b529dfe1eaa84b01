"""TickCommand: `--loop` survives failed ticks (database, broker, bugs) and says why in its heartbeat;
arguments are validated with a one-line error. The process-level chaos test, with a real PostgreSQL
stopped and restarted under a running loop, is in tests/fleetops/test_outages.py."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from typing import Any

import kombu.exceptions
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError, CommandParser
from django.db import OperationalError, connection

from fleetops.lib.commands import NUMBER_OUT_OF_RANGE
from fleetops.observability.commands import TickCommand
from fleetops.observability.models import Heartbeat
from fleetops.observability.outages import BROKER_UNAVAILABLE, DATABASE_UNAVAILABLE
from tests.processes import ROOT, subprocess_env


class ScriptedCommand(TickCommand):
    """Each tick plays the next step: an exception to raise, a callable to run, or "ok"."""

    actor = "command:scripted"

    def __init__(self, steps: list[Any]) -> None:
        super().__init__()
        self.steps = steps
        self.ticks = 0

    def add_tick_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--batch-size", type=int, default=None)

    def tick(self, options: dict[str, Any]) -> str:
        step = self.steps[min(self.ticks, len(self.steps) - 1)]
        self.ticks += 1
        if isinstance(step, BaseException):
            raise step
        if callable(step):
            step()
        return f"tick {self.ticks}"


def stop_the_loop() -> None:
    # What systemd does: SIGTERM. The loop finishes this tick and returns.
    os.kill(os.getpid(), signal.SIGTERM)


def _loop(command: ScriptedCommand) -> None:
    call_command(command, "--loop", "--interval", "0.01", "--max-backoff", "0.01", stdout=io.StringIO())


@pytest.mark.django_db(transaction=True)
def test_a_loop_survives_database_errors_and_its_heartbeat_says_why():
    down = OperationalError('connection failed: connection to server at "127.0.0.1", port 5432 failed')
    command = ScriptedCommand([down, down, "ok", stop_the_loop])

    _loop(command)

    assert command.ticks == 4
    beat = Heartbeat.objects.get(name="loop.scripted")
    # Here only the tick fails; the database itself answers, so the failures are written too.
    assert (beat.beats, beat.failures) == (4, 2)
    assert beat.last_success_at == beat.last_beat_at
    outage = beat.details["last_outage"]
    assert outage["reason"] == DATABASE_UNAVAILABLE
    assert outage["failed_ticks"] == 2
    assert outage["first_error"].startswith("OperationalError: connection failed")
    assert outage["since"] <= outage["until"]


@pytest.mark.django_db(transaction=True)
def test_a_failed_tick_closes_the_database_connection_so_the_next_one_reconnects():
    seen: list[Any] = []

    def remember_the_connection() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            seen.append(cursor.fetchone()[0])

    command = ScriptedCommand(
        [remember_the_connection, OperationalError("server closed the connection"), remember_the_connection]
    )
    command.steps.append(stop_the_loop)

    _loop(command)

    assert len(seen) == 2 and seen[0] != seen[1]


@pytest.mark.django_db(transaction=True)
def test_a_broker_outage_is_in_the_heartbeat_while_it_lasts():
    observed: list[Heartbeat] = []
    command = ScriptedCommand(
        [
            kombu.exceptions.OperationalError("[Errno 111] Connection refused"),
            lambda: observed.append(Heartbeat.objects.get(name="loop.scripted")),
            stop_the_loop,
        ]
    )

    _loop(command)

    during = observed[0]
    assert during.failures == 1 and during.last_success_at is None
    assert during.last_error.startswith(f"{BROKER_UNAVAILABLE}: OperationalError")
    assert during.details["outage"]["reason"] == BROKER_UNAVAILABLE
    after = Heartbeat.objects.get(name="loop.scripted")
    assert after.details["last_outage"]["reason"] == BROKER_UNAVAILABLE


@pytest.mark.django_db(transaction=True)
def test_a_bug_in_a_tick_is_logged_and_the_loop_goes_on(caplog):
    command = ScriptedCommand([ZeroDivisionError("division by zero"), "ok", stop_the_loop])

    _loop(command)

    assert command.ticks == 3
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)
    assert Heartbeat.objects.get(name="loop.scripted").details["last_outage"]["reason"] == "tick_failed"


def test_once_turns_an_outage_into_a_one_line_command_error():
    command = ScriptedCommand([OperationalError("connection refused\nis the server running?")])
    with pytest.raises(CommandError, match=r"^database_unavailable: OperationalError: connection refused is"):
        call_command(command, "--once")


@pytest.mark.parametrize(
    ("args", "option", "value"),
    [
        (["--interval", "0"], "interval", "0"),
        (["--interval", "-5"], "interval", "-5"),
        (["--interval", "nan"], "interval", "nan"),
        (["--max-backoff", "0"], "max-backoff", "0"),
    ],
)
def test_bad_numbers_are_refused_before_anything_runs(args, option, value):
    command = ScriptedCommand(["ok"])
    with pytest.raises(CommandError) as refused:
        call_command(command, "--loop", *args)
    why = NUMBER_OUT_OF_RANGE.format(bounds="greater than 0", value=value)
    assert str(refused.value) == f"Error: argument --{option}: {why}"
    assert command.ticks == 0


@pytest.mark.parametrize(
    ("argv", "refusal"),
    [
        (["curtailment_reconcile", "--loop", "--interval", "0"], "argument --interval: "),
        (["keys_restake", "--once", "--batch-size", "-1"], "argument --batch-size: "),
        (["keys_verify", "--loop", "--max-backoff", "0"], "argument --max-backoff: "),
    ],
)
def test_the_loop_commands_refuse_bad_numbers_in_one_line_without_a_traceback(argv, refusal):
    result = subprocess.run(
        [sys.executable, "manage.py", *argv],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"manage.py {argv[0]}: error: {refusal}must be ")
