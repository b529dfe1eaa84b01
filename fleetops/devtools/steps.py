"""python -m fleetops.devtools.steps STEPS_JSON — the demo's set-up commands in one process.

STEPS_JSON is a list of [title, [manage.py arguments...]]. Each step runs exactly as
`manage.py <arguments>` would (Django's ManagementUtility), one after the other, in one process:
Django and the project's apps are loaded once instead of once per command. The first step that
fails stops the run with its exit status."""

from __future__ import annotations

import json
import sys
import time

from fleetops.devtools.services import say


def run_steps(steps: list[tuple[str, list[str]]]) -> int:
    from django.core.management import ManagementUtility

    for title, argv in steps:
        say(title)
        started = time.monotonic()
        status = 0
        try:
            ManagementUtility(["manage.py", *argv]).execute()
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception as exc:  # what manage.py would print as a traceback, and exit 1
            import traceback

            traceback.print_exception(exc)
            status = 1
        sys.stdout.flush()
        if status != 0:
            say(f"FAILED: {title} (exit {status})")
            return status
        say(f"ok: {title} ({time.monotonic() - started:.1f}s)")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    steps = [(str(title), [str(arg) for arg in args]) for title, args in json.loads(argv[0])]
    return run_steps(steps)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
