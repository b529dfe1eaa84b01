"""The argument types of `fleetops.lib.commands`: whatever an operator types, each returns a value
inside its bounds or raises `ArgumentTypeError` (a one-line usage error), never anything else; and
the base command's one-line refusals and confirmation, in process. Every command run as a process
with bad arguments: tests/test_commands.py."""

from __future__ import annotations

import argparse
import io
import math
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError, CommandParser
from hypothesis import example, given
from hypothesis import strategies as st

from fleetops.lib.commands import (
    CONFIRM_DECLINED,
    CONFIRM_NEEDS_YES,
    OperatorCommand,
    float_between,
    height,
    http_url,
    id_list,
    int_between,
    non_negative_float,
    non_negative_int,
    port,
    positive_float,
    positive_int,
    websocket_url_or_blank,
)
from fleetops.lib.errors import ValidationFailed

# What an operator might type: numbers in every spelling, and anything at all.
number_text = st.one_of(
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.decimals(allow_nan=False).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "0x10", "1_000", " 7 ", "+3", "", "-0", "٣", "9" * 5000]),
    st.text(),
)


def outcome(parse: Callable[[str], Any], text: str) -> Any:
    """The parsed value, or None when refused; any other exception fails the test."""
    try:
        return parse(text)
    except argparse.ArgumentTypeError as exc:
        why = str(exc)
    assert why and "\n" not in why  # argparse puts it after `argument --x: ` on the one line
    return None


@given(st.integers())
def test_integer_types_take_exactly_the_integers_in_range(n):
    for parse, low in ((positive_int, 1), (non_negative_int, 0), (height, 0)):
        assert outcome(parse, str(n)) == (n if n >= low else None)
    assert outcome(port, str(n)) == (n if 1 <= n <= 65535 else None)


@given(number_text)
@example("-5")
@example("0")
def test_integer_types_never_return_anything_out_of_range(text):
    for parse, low in ((positive_int, 1), (non_negative_int, 0), (height, 0)):
        value = outcome(parse, text)
        assert value is None or (type(value) is int and value >= low)
    value = outcome(port, text)
    assert value is None or 1 <= value <= 65535


@given(st.integers(-1000, 1000), st.integers(-1000, 1000), st.integers(-2000, 2000))
def test_int_between_keeps_both_bounds(low, high, n):
    parse = int_between(low, high)
    assert outcome(parse, str(n)) == (n if low <= n <= high else None)


@given(number_text)
@example("nan")
@example("-inf")
@example("1e400")
@example("0")
def test_float_types_return_finite_numbers_within_bounds(text):
    value = outcome(positive_float, text)
    assert value is None or (math.isfinite(value) and value > 0)
    value = outcome(non_negative_float, text)
    assert value is None or (math.isfinite(value) and value >= 0)
    value = outcome(float_between(1, 60), text)
    assert value is None or 1 <= value <= 60


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_types_take_every_finite_number_in_range(x):
    assert outcome(positive_float, repr(x)) == (x if x > 0 else None)
    assert outcome(non_negative_float, repr(x)) == (x if x >= 0 else None)


@given(st.text())
@example("http://[::1")
@example("http://host:99999")
@example("http://")
@example("http://exa mple.com")
@example("ftp://127.0.0.1")
def test_url_types_return_only_urls_of_their_scheme_with_a_host(text):
    value = outcome(http_url, text)
    if value is not None:
        assert value == text and urlsplit(text).scheme in ("http", "https") and urlsplit(text).hostname
    value = outcome(websocket_url_or_blank, text)
    if value:
        assert urlsplit(text).scheme in ("ws", "wss") and urlsplit(text).hostname


def test_url_types_take_what_the_demo_passes():
    assert http_url("http://127.0.0.1:26657") == "http://127.0.0.1:26657"
    assert http_url("https://rpc.example.com/") == "https://rpc.example.com/"
    assert websocket_url_or_blank("ws://127.0.0.1:26657/websocket") == "ws://127.0.0.1:26657/websocket"
    assert websocket_url_or_blank("") == ""
    assert outcome(http_url, "") is None


@given(st.lists(st.integers(), min_size=1))
def test_id_list_takes_positive_ids_and_refuses_the_rest(ids):
    text = ",".join(map(str, ids))
    assert outcome(id_list, text) == (ids if all(i > 0 for i in ids) else None)


@given(st.text())
def test_id_list_never_returns_an_empty_or_bad_list(text):
    value = outcome(id_list, text)
    assert value is None or (value and all(type(i) is int and i > 0 for i in value))


# --- the base command, in process ---------------------------------------------------------------------


class Probe(OperatorCommand):
    """A command that raises what it is told to, after an optional confirmation."""

    def __init__(self, raises: Exception | None = None, stdin: Any = None) -> None:
        super().__init__(stdout=io.StringIO(), stderr=io.StringIO())
        self.raises, self.stdin, self.ran = raises, stdin, False

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--batch-size", type=positive_int, default=None)
        parser.add_argument("--yes", action="store_true")
        sub = parser.add_subparsers(dest="mode")
        sub.add_parser("deep").add_argument("--height", type=height)

    def handle(self, *args: Any, **options: Any) -> None:
        if self.raises is not None:
            raise self.raises
        if self.stdin is not None:
            self.confirm("wipe everything", yes=options["yes"], stdin=self.stdin)
        self.ran = True


def test_a_bad_value_is_refused_while_parsing_in_one_line():
    probe = Probe()
    with pytest.raises(CommandError) as refused:
        call_command(probe, "--batch-size", "0")
    assert str(refused.value) == "Error: argument --batch-size: must be an integer of at least 1 (got 0)"
    assert not probe.ran


def test_sub_commands_refuse_in_one_line_too(capsys):
    with pytest.raises(SystemExit) as exited:
        Probe().run_from_argv(["manage.py", "probe", "deep", "--height", "-1"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "manage.py probe deep: error: argument --height: must be an integer of at least 0 (got -1) "
        "(see manage.py probe deep --help)"
    ]


def test_a_service_refusal_becomes_a_one_line_command_error():
    with pytest.raises(CommandError) as refused:
        call_command(Probe(raises=ValidationFailed("reason is required\n(at most 500 characters)")))
    assert str(refused.value) == "reason is required (at most 500 characters)"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stdin", "refusal"),
    [
        (io.StringIO("y\n"), CONFIRM_NEEDS_YES.format(what="wipe everything")),  # not a terminal
        (Terminal("n\n"), CONFIRM_DECLINED),
        (Terminal(""), CONFIRM_DECLINED),  # end of input
    ],
)
def test_confirmation_refuses_without_a_terminal_or_a_yes(stdin, refusal):
    probe = Probe(stdin=stdin)
    with pytest.raises(CommandError) as refused:
        call_command(probe)
    assert str(refused.value) == refusal
    assert not probe.ran


@pytest.mark.parametrize(("stdin", "argv"), [(Terminal("yes\n"), []), (io.StringIO(""), ["--yes"])])
def test_confirmation_passes_with_a_yes(stdin, argv):
    probe = Probe(stdin=stdin)
    call_command(probe, *argv)
    assert probe.ran
