"""What every FleetOps management command shares: arguments checked while they are parsed, and
every refusal as one line on stderr with a non-zero exit, never a traceback.

1. Numbers, heights, ports and URLs are checked by the argparse `type=` callables below
   (`positive_int`, `height`, `http_url`, …). A bad value is a usage error before the command
   touches the database: exit 2, `manage.py <command>: error: argument --x: <why>`.
2. `OperatorCommand`, the base of every command, prints a usage error as that one line (argparse
   would print the whole usage first), turns a `DomainError` raised by a service into a
   `CommandError` (exit 1, `CommandError: <message>`), and folds any refusal onto one line.
3. `OperatorCommand.confirm` asks before a destructive step. Without a terminal (cron, CI, a pipe,
   `</dev/null`) there is nobody to ask, so it refuses unless `--yes` was given; end of input or
   Ctrl-C at the prompt is a "no".
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TextIO
from urllib.parse import urlsplit

from django.core.management.base import BaseCommand, CommandError, CommandParser, SystemCheckError

from fleetops.lib.errors import DomainError

NOT_AN_INTEGER = "must be an integer (got {value!r})"
NOT_A_NUMBER = "must be a number (got {value!r})"
INTEGER_OUT_OF_RANGE = "must be an integer {bounds} (got {value})"
NUMBER_OUT_OF_RANGE = "must be a finite number {bounds} (got {value})"
NOT_A_URL = "must be a URL with a host and the scheme {schemes}, e.g. {example} (got {value!r})"
IDS_INVALID = "must be comma-separated ids, positive integers such as 1,2,3 (got {value!r})"
USAGE_ERROR = "{prog}: error: {message} (see {prog} --help)\n"
CONFIRM_NEEDS_YES = "stdin is not a terminal, so nobody can confirm: pass --yes to {what}"
CONFIRM_DECLINED = "nothing done: not confirmed"
YES_HELP = "do not ask for confirmation (required when stdin is not a terminal)"

ArgumentType = Callable[[str], Any]


def one_line(text: str) -> str:
    """Any message on one line: newlines and runs of spaces become single spaces."""
    return " ".join(text.split())


# --- argument types ----------------------------------------------------------------------------------


def _bounds(low: float | None, high: float | None, *, low_open: bool = False) -> str:
    def show(bound: float) -> str:
        return f"{bound:g}" if isinstance(bound, float) else str(bound)

    if low is not None and high is not None:
        return f"from {show(low)} to {show(high)}"
    if low is not None:
        return f"greater than {show(low)}" if low_open else f"of at least {show(low)}"
    if high is not None:
        return f"of at most {show(high)}"
    return ""


def _named(function: ArgumentType, name: str) -> ArgumentType:
    # argparse names the type in some messages (`invalid positive_int value`) and in --help.
    function.__name__ = function.__qualname__ = name
    return function


def int_between(low: int | None = None, high: int | None = None, *, name: str = "") -> ArgumentType:
    """An argparse type: a decimal integer with `low <= value <= high` (either bound optional)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except (TypeError, ValueError):  # also a digit string past Python's 4300-digit limit
            raise argparse.ArgumentTypeError(NOT_AN_INTEGER.format(value=text))
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                INTEGER_OUT_OF_RANGE.format(bounds=_bounds(low, high), value=value)
            )
        return value

    return _named(parse, name or f"int_between_{low}_{high}")


def float_between(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, name: str = ""
) -> ArgumentType:
    """An argparse type: a finite number within the bounds; `low_open` excludes `low` itself
    (so `positive_float` refuses 0). NaN and infinities are refused: `--interval nan` would
    otherwise compare false with everything and slip past every check."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(NOT_A_NUMBER.format(value=text))
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and value > high
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(
                NUMBER_OUT_OF_RANGE.format(bounds=_bounds(low, high, low_open=low_open), value=text)
            )
        return value

    return _named(parse, name or f"float_between_{low}_{high}")


positive_int = int_between(1, name="positive_int")
non_negative_int = int_between(0, name="non_negative_int")
# A block height: 0 is "before the first block" (a rollback to 0 keeps nothing).
height = int_between(0, name="height")
port = int_between(1, 65535, name="port")
positive_float = float_between(0, low_open=True, name="positive_float")
non_negative_float = float_between(0, name="non_negative_float")


def url(*schemes: str, blank: bool = False, name: str = "") -> ArgumentType:
    """An argparse type: a URL with one of `schemes` and a host (`blank` also lets "" through, for
    an optional URL whose default is empty). Returned unchanged."""

    example = f"{schemes[0]}://127.0.0.1:26657"

    def parse(text: str) -> str:
        if blank and text == "":
            return text
        try:
            parts = urlsplit(text)
            scheme, host = parts.scheme, parts.hostname
            parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
        except ValueError:  # e.g. "http://[::1" or "http://host:99999"
            scheme, host = "", None
        if scheme not in schemes or not host or any(c.isspace() for c in text):
            raise argparse.ArgumentTypeError(
                NOT_A_URL.format(schemes=" or ".join(schemes), example=example, value=text)
            )
        return text

    return _named(parse, name or "url")


http_url = url("http", "https", name="http_url")
websocket_url_or_blank = url("ws", "wss", blank=True, name="websocket_url")
http_url_or_blank = url("http", "https", blank=True, name="http_url")


def id_list(text: str) -> list[int]:
    """An argparse type: `1,2,3` → [1, 2, 3] (at least one id, each a positive integer)."""
    items = [item.strip() for item in text.split(",")]
    try:
        ids = [int(item, 10) for item in items if item]
    except ValueError:
        raise argparse.ArgumentTypeError(IDS_INVALID.format(value=text))
    if not ids or any(i < 1 for i in ids):
        raise argparse.ArgumentTypeError(IDS_INVALID.format(value=text))
    return ids


# --- the base command --------------------------------------------------------------------------------


class OneLineParser(CommandParser):
    """A usage error as one line; `--help` still prints the full usage."""

    def error(self, message: str) -> NoReturn:
        if self.called_from_command_line:
            self.exit(2, USAGE_ERROR.format(prog=self.prog, message=one_line(message)))
        raise CommandError(f"Error: {one_line(message)}")


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    # BaseCommand always builds a plain CommandParser, and sub-commands (`protocol_migrate
    # history`) were built from its class while `add_arguments` ran: switch each to the subclass
    # that only changes `error` (same attributes, so the switch is safe).
    if type(parser) is CommandParser:
        parser.__class__ = OneLineParser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _one_line_errors(sub)


class OperatorCommand(BaseCommand):
    """The base of every FleetOps management command (see the module docstring)."""

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        _one_line_errors(parser)
        return parser

    def execute(self, *args: Any, **options: Any) -> str | None:
        try:
            return super().execute(*args, **options)
        except DomainError as exc:
            # A service refused (ValidationFailed, NotFound, IllegalTransition, …): its message is
            # written for people, so it is the whole error.
            raise CommandError(one_line(exc.message)) from exc
        except CommandError as exc:
            text = str(exc)
            # Django prints the system checks' report as it is, a line per check.
            if "\n" not in text or isinstance(exc, SystemCheckError):
                raise
            raise CommandError(one_line(text), returncode=exc.returncode) from exc

    def confirm(self, what: str, *, yes: bool, stdin: TextIO | None = None) -> None:
        """Return once the operator agreed to `what` ("delete heights 6-10 of sim"), at a terminal
        or with `--yes`; otherwise raise a one-line CommandError and do nothing."""
        if yes:
            return
        stream = sys.stdin if stdin is None else stdin
        if stream is None or stream.closed or not stream.isatty():
            raise CommandError(CONFIRM_NEEDS_YES.format(what=what))
        self.stdout.write(f"{what[:1].upper()}{what[1:]}? [y/N] ", ending="")
        self.stdout.flush()
        try:
            answer = stream.readline()  # "" at end of input (Ctrl-D): a no
        except KeyboardInterrupt:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            raise CommandError(CONFIRM_DECLINED)
