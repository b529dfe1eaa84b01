"""One migrated test database per run, cloned for each pytest-xdist worker.

Migrating from zero takes a CPU for tens of seconds; every worker used to do it for a database of its
own. Under xdist the controller (which collects no tests) migrates a template database once, while
the workers import and collect, and each worker's test database is then made from it with
`CREATE DATABASE … TEMPLATE`, which copies files and takes a fraction of a second. Django still runs
`migrate` on the copy: it finds every migration applied. The template is dropped when the run ends.

Without xdist, or with --reuse-db / --create-db / --nomigrations, databases are made as before.
Run as `python -m tests.template_db URL`, it (re)creates and migrates the database at URL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

# "<template database name>|<status file>", set by the controller for the workers it starts.
VARIABLE = "FLEETOPS_TEST_TEMPLATE_DB"
ROOT = Path(__file__).resolve().parent.parent
WAIT_SECONDS = 900


def _url(name: str) -> str:
    """The URL of database `name` on the server the tests use."""
    from fleetops.devtools.services import with_database
    from tests.processes import database_url

    return with_database(database_url(), name)


def _template_name() -> str:
    from django.conf import settings

    db = settings.DATABASES["default"]
    test_name = db.get("TEST", {}).get("NAME") or f"test_{db['NAME']}"
    return f"{test_name}_template"


def wanted(config: pytest.Config) -> bool:
    """The controller of an xdist run that creates migrated databases from scratch."""
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None):
        return False
    if config.getoption("dist", "no") == "no" or config.getoption("collectonly"):
        return False
    return not any(config.getoption(name, False) for name in ("reuse_db", "create_db", "nomigrations"))


class Builder:
    """The controller's side: migrate the template in a child process while the workers start."""

    def __init__(self) -> None:
        self.name = _template_name()
        self.url = _url(self.name)
        self.dir = Path(tempfile.mkdtemp(prefix="fleetops-template-db-"))
        self.status = self.dir / "status"
        log = (self.dir / "migrate.log").open("wb")
        env = dict(os.environ, DATABASE_URL=self.url, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.template_db", self.url],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        threading.Thread(target=self._report, daemon=True).start()
        os.environ[VARIABLE] = f"{self.name}|{self.status}"

    def _report(self) -> None:
        code = self.proc.wait()
        partial = self.status.with_suffix(".partial")
        partial.write_text(str(code))
        partial.replace(self.status)  # the workers see the whole status or none

    def finish(self) -> None:
        import shutil

        from fleetops.devtools.services import drop_database

        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        os.environ.pop(VARIABLE, None)
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            drop_database(self.url)
        except Exception as exc:  # the run's outcome stands; a leftover template is dropped next run
            sys.stderr.write(f"\ncould not drop the template test database {self.name}: {exc}\n")


def use_template() -> None:
    """A worker's side: wait for the controller's template, then have Django copy it."""
    given = os.environ.get(VARIABLE)
    if not given:
        return
    from django.conf import settings

    name, status_path = given.split("|", 1)
    status = Path(status_path)
    deadline = time.monotonic() + WAIT_SECONDS
    while not status.exists():
        if time.monotonic() > deadline:
            pytest.exit(f"the template test database {name} was not migrated within {WAIT_SECONDS}s", 1)
        time.sleep(0.05)
    if status.read_text().strip() != "0":
        log = (status.parent / "migrate.log").read_text(errors="replace")
        pytest.exit(f"migrating the template test database {name} failed:\n{log[-6000:]}", 1)
    settings.DATABASES["default"].setdefault("TEST", {})["TEMPLATE"] = name


def _build(url: str) -> None:
    import django
    from django.core.management import call_command

    from fleetops.devtools.services import drop_database, ensure_database

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fleetops.settings.test")
    drop_database(url)
    ensure_database(url)
    django.setup()
    # What Django's create_test_db does on a new test database.
    call_command("migrate", verbosity=0, interactive=False, run_syncdb=True)
    call_command("createcachetable")
    from django.db import connections

    connections.close_all()  # a template must have no connection when it is copied


if __name__ == "__main__":
    _build(sys.argv[1])
