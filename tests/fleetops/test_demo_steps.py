"""The demo's set-up steps in one process (fleetops/devtools/steps.py): each runs as `manage.py`
would, and the first that fails stops the run with its exit status."""

from __future__ import annotations

import json

import pytest

from fleetops.devtools.steps import main, run_steps


def test_steps_run_in_order_and_the_first_failure_stops_the_run_with_its_status(capsys):
    status = run_steps(
        [
            ("checks", ["check"]),
            ("unknown", ["no_such_command"]),
            ("after", ["check"]),
        ]
    )

    out = capsys.readouterr()
    assert status == 1
    assert "ok: checks" in out.out
    assert "Unknown command: 'no_such_command'" in out.err
    assert "FAILED: unknown (exit 1)" in out.out
    assert "after" not in out.out


@pytest.mark.django_db
def test_a_command_error_is_printed_as_manage_py_prints_it_and_fails_the_step(capsys):
    assert run_steps([("fleet_sync", ["fleet_sync", "--org", "no-such-org"])]) == 1
    out = capsys.readouterr()
    assert "FAILED: fleet_sync (exit 1)" in out.out
    assert out.err.startswith("CommandError: no organization")


def test_the_steps_argument_is_one_json_list(capsys):
    assert main([]) == 2
    assert main([json.dumps([["checks", ["check"]]])]) == 0
    assert "ok: checks" in capsys.readouterr().out
