"""Every management command of the project refuses bad arguments the same way: a non-zero exit, one
line on stderr (`manage.py <command>: error: …` for a usage error, exit 2; `CommandError: …` for a
refusal, exit 1), never a traceback, and nothing written to the database.

The commands are discovered from the project's own apps, so a command added later without a case
here fails `test_every_project_command_has_bad_argument_cases`. Each case runs `manage.py` as a
real process with stdin at /dev/null (as under cron or CI), forked from one that has set Django up.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import pytest
from django.core.management import get_commands, load_command_class
from django.db import connection

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.lib.commands import CONFIRM_DECLINED, CONFIRM_NEEDS_YES, OperatorCommand
from indexer.models import Block, IndexerState
from migrations_app.models.keys import Key
from tests.factories import make_indexed_chain, record
from tests.forked_manage import ForkedManage
from tests.migrations_app.keys_fixtures import make_group, make_keys
from tests.processes import ROOT, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

PROJECT_APPS = ("fleetops", "curtailment", "migrations_app", "indexer")
USAGE = 2  # argparse: a value of the wrong type or range, a missing or unknown option
REFUSED = 1  # CommandError: the arguments parse but name nothing that exists, or are not confirmed
# The demo seeds refuse outright without DEBUG; under the development settings they get as far as
# checking what their arguments name.
DEV = "fleetops.settings.dev"
TIMEOUT = 90


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    exit: int
    says: str  # what the one line must contain
    settings: str = "fleetops.settings.test"


def usage(*argv: str, says: str, settings: str = "fleetops.settings.test") -> Case:
    return Case(argv, USAGE, says, settings)


def refused(*argv: str, says: str, settings: str = "fleetops.settings.test") -> Case:
    return Case(argv, REFUSED, says, settings)


ROLLBACK_NEEDS_YES = CONFIRM_NEEDS_YES.format(what="delete heights 4-5 of sim (2 blocks)")
# Bad values of every kind for each argument type: tests/fleetops/test_command_arguments.py.
# The fixture below holds organization `acme`, chain `sim` with heights 1-5 indexed, an audit row
# 500 days old and two keys whose migration failed: what the refused commands would have changed.
CASES: dict[str, list[Case]] = {
    "audit_prune": [
        usage("--older-than-days", "7", says="argument --older-than-days: must be an integer of at least 30"),
        refused("--older-than-days", "30", says="pass --yes to delete every audit row older than 30 days"),
    ],
    "curtailment_demo_seed": [
        usage("--gateway-url", "not a url", says="argument --gateway-url: must be a URL"),
        refused(
            "--org",
            "nope",
            "--gateway-url",
            "http://127.0.0.1:9",
            says="no organization 'nope'",
            settings=DEV,
        ),
    ],
    "curtailment_reconcile": [
        usage(
            "--loop", "--interval", "-1", says="argument --interval: must be a finite number greater than 0"
        ),
        usage("--once", "--max-backoff", "nan", says="argument --max-backoff: must be a finite number"),
    ],
    "demo_seed": [
        usage("--allow-production", "yes", says="unrecognized arguments: yes"),
    ],
    "fleet_sync": [
        refused("--org", "nope", says="no organization with a fleet gateway URL matches"),
    ],
    "indexer_demo_seed": [
        usage("--rpc-url", "ftp://127.0.0.1:9", says="argument --rpc-url: must be a URL"),
        usage("--rpc-url", "http://127.0.0.1:9", "--batch-size", "0", says="argument --batch-size: must be"),
    ],
    "indexer_reindex": [
        refused("--chain", "nope", says="no chain 'nope' (known: sim)"),
        refused("--chain", "sim", "--from", "4", "--to", "2", says="--from 4 is above --to 2"),
        usage("--chain", "sim", "--from", "-1", says="argument --from: must be an integer of at least 0"),
    ],
    "indexer_rollback": [
        refused("--chain", "sim", "--to", "3", "--reason", "bad upgrade", says=ROLLBACK_NEEDS_YES),
        usage(
            "--chain", "sim", "--to", "-1", "--reason", "x", "--yes", says="argument --to: must be an integer"
        ),
    ],
    "indexer_run": [
        refused("--chain", "nope", "--once", says="no chain 'nope' (known: sim)"),
        usage(
            "--chain", "sim", "--stop-at", "-3", says="argument --stop-at: must be an integer of at least 1"
        ),
        usage(
            "--chain",
            "sim",
            "--health-port",
            "70000",
            says="argument --health-port: must be an integer from 1",
        ),
    ],
    "indexer_partitions": [
        refused("--chain", "nope", says="nope"),
        usage("--every", says="unrecognized arguments: --every"),
    ],
    "indexer_verify": [
        refused("--chain", "sim", "--to", "9", says="1-9 is outside the indexed range 1-5"),
        usage("--chain", "sim", "--batch", "0", says="argument --batch: must be an integer of at least 1"),
    ],
    "keys_demo_seed": [
        usage("--rpc-url", "http://127.0.0.1:9", "--keys", "-1", says="argument --keys: must be an integer"),
        refused(
            "--org", "nope", "--rpc-url", "http://127.0.0.1:9", says="no organization 'nope'", settings=DEV
        ),
    ],
    "keys_restake": [
        usage("--once", "--batch-size", "-5", says="argument --batch-size: must be an integer of at least 1"),
        usage("--once", "--batch-size", "0", says="argument --batch-size: must be an integer of at least 1"),
    ],
    "keys_retry": [
        usage("--org", "acme", "--reason", "rpc fixed", "--ids", "1,x", says="argument --ids: must be"),
        refused("--org", "nope", "--reason", "rpc fixed", "--all-failed", says="no such organization"),
        refused("--org", "acme", "--reason", "", "--all-failed", says="reason"),
    ],
    "keys_verify": [
        usage(
            "--loop", "--interval", "0", says="argument --interval: must be a finite number greater than 0"
        ),
    ],
    "machines_doc": [
        usage("--check", "--output", "x.md", says="unrecognized arguments: --output x.md"),
    ],
    "outbox_relay": [
        usage("--limit", "0", says="argument --limit: must be an integer of at least 1"),
    ],
    "protocol_migrate": [
        refused("history", "--protocol-id", "SEP99", says="unknown protocol SEP99"),
        refused(
            "history", "--protocol-id", "SEP41", "--window-size", "0", says="window size must be between"
        ),
        usage(
            "current-state",
            "--protocol-id",
            "SEP41",
            "--start-height",
            "-1",
            says="argument --start-height: must be an integer of at least 0",
        ),
    ],
    "protocol_setup": [
        refused("--protocol-id", "SEP99", "--chain", "sim", says="unknown protocol SEP99"),
        refused("--protocol-id", "SEP41", "--chain", "nope", says="nope"),
    ],
    "schedules_sync": [
        usage("--all", says="unrecognized arguments: --all"),
    ],
}


def project_commands() -> dict[str, str]:
    return {name: app for name, app in get_commands().items() if app.split(".")[0] in PROJECT_APPS}


@pytest.fixture
def world(org):
    """What the refused commands would change if they ran: indexed heights, an old audit row,
    failed key migrations."""
    chain = make_indexed_chain(org, blocks=5)
    with clock.frozen(clock.now() - timedelta(days=500)):
        record(action="test.old", actor=Actor.system("test"), org=org)
    make_keys(
        org,
        2,
        group=make_group(org),
        migration_status="failed",
        migration_attempts=3,
        migration_max_attempts=3,
    )
    assert IndexerState.objects.get(chain=chain).last_indexed_height == 5
    return chain


def database_fingerprint() -> dict[str, tuple[int, str]]:
    """Row count and a digest of the rows, per table of the database."""
    result = {}
    with connection.cursor() as cursor:
        cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        for (table,) in cursor.fetchall():
            cursor.execute(
                "SELECT count(*), md5(coalesce(string_agg(t::text, chr(10) ORDER BY t::text), ''))"
                f' FROM "{table}" t'
            )
            result[table] = cursor.fetchone()
    return result


def problems_with(name: str, case: Case, result: subprocess.CompletedProcess[str]) -> list[str]:
    where = f"manage.py {name} {' '.join(case.argv)}"
    lines = result.stderr.strip().splitlines()
    problems = []
    if "Traceback" in result.stderr:
        problems.append(f"{where}: a traceback:\n{result.stderr}")
    if result.returncode != case.exit:
        problems.append(f"{where}: exit {result.returncode}, expected {case.exit}: {result.stderr!r}")
    if len(lines) != 1:
        problems.append(f"{where}: {len(lines)} lines on stderr, expected one: {result.stderr!r}")
        return problems
    line = lines[0]
    prefix = "CommandError: " if case.exit == REFUSED else f"manage.py {name}"
    if not line.startswith(prefix) or (case.exit == USAGE and ": error: " not in line):
        problems.append(f"{where}: {line!r} is not a {'refusal' if case.exit == REFUSED else 'usage error'}")
    if case.says not in line:
        problems.append(f"{where}: {line!r} does not say {case.says!r}")
    return problems


def test_every_project_command_has_bad_argument_cases():
    commands = project_commands()
    assert "indexer_rollback" in commands and "migrate" not in commands  # the filter finds ours only
    missing = sorted(set(commands) - set(CASES))
    assert not missing, f"add bad-argument cases to tests/test_commands.py for: {', '.join(missing)}"
    assert not sorted(set(CASES) - set(commands)), "cases for commands that no longer exist"
    assert all(CASES.values())


def test_every_project_command_is_an_operator_command():
    """The one base that makes refusals one line and turns service errors into CommandError."""
    for name, app in project_commands().items():
        assert isinstance(load_command_class(app, name), OperatorCommand), name


def test_every_command_refuses_bad_arguments_in_one_line_and_changes_nothing(world):
    before = database_fingerprint()
    cases = [(name, case) for name, cases in CASES.items() for case in cases]

    # Each case is a process of its own, forked from one that has set Django up once per settings
    # module (tests/forked_manage.py): what `python manage.py …` runs, without a second of start-up
    # each. The terminal cases below start a whole new interpreter.
    servers = {
        settings: ForkedManage(subprocess_env(DJANGO_SETTINGS_MODULE=settings, LOG_LEVEL="WARNING"))
        for settings in {case.settings for _, case in cases}
    }
    try:
        with ThreadPoolExecutor(max_workers=len(servers)) as pool:
            results = list(
                pool.map(lambda item: servers[item[1].settings].run([item[0], *item[1].argv], TIMEOUT), cases)
            )
    finally:
        for server in servers.values():
            server.close()

    problems = [
        p
        for (name, case), result in zip(cases, results, strict=True)
        for p in problems_with(name, case, result)
    ]
    assert not problems, "\n".join(problems)
    after = database_fingerprint()
    changed = sorted(table for table in before.keys() | after.keys() if before.get(table) != after.get(table))
    assert not changed, f"refused commands changed {changed}"
    # The rows the refusals protect are still there.
    assert Block.objects.filter(chain=world).count() == 5
    assert AuditEvent.objects.filter(action="test.old").exists()
    assert Key.objects.filter(migration_status="failed").count() == 2


# --- confirmation at a terminal --------------------------------------------------------------------------


def rollback_at_a_terminal(answer: bytes) -> subprocess.CompletedProcess[str]:
    """`indexer_rollback` without --yes, its stdin a terminal on which the operator types `answer`."""
    controller, terminal = pty.openpty()
    try:
        os.write(controller, answer)
        return subprocess.run(
            [
                sys.executable,
                "manage.py",
                "indexer_rollback",
                "--chain",
                "sim",
                "--to",
                "3",
                "--reason",
                "bad",
            ],
            cwd=ROOT,
            env=subprocess_env(),
            stdin=terminal,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    finally:
        os.close(terminal)
        os.close(controller)


@pytest.mark.parametrize("answer", [b"n\n", b"\x04"], ids=["no", "end-of-input"])
def test_at_a_terminal_anything_but_yes_leaves_the_chain_alone(world, answer):
    result = rollback_at_a_terminal(answer)

    assert result.returncode == REFUSED, result.stderr
    assert result.stderr.strip().splitlines() == [f"CommandError: {CONFIRM_DECLINED}"]
    assert result.stdout.startswith("Delete heights 4-5 of sim (2 blocks)? [y/N]")
    assert Block.objects.filter(chain=world).count() == 5


def test_at_a_terminal_yes_rolls_back(world):
    result = rollback_at_a_terminal(b"y\n")

    assert result.returncode == 0, result.stderr
    assert "rolled sim back to 3: 2 blocks removed" in result.stdout
    assert sorted(Block.objects.filter(chain=world).values_list("height", flat=True)) == [1, 2, 3]
