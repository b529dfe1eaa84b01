"""The console in a real browser: Playwright driving the Chromium of the machine (Debian's `chromium`
package, or FLEETOPS_CHROMIUM); no browser is downloaded.

Where no browser can be had, `unavailable()` says so: the browser tests are skipped on a laptop
(pytest's summary names what did not run) and fail the run under CI=true.

One server, one browser and one seeded organization for the whole package: the portal runs in a
thread (Django's live server, static files served), the seed is committed once (the server thread
reads it over its own connection) and the database is flushed when the package is done. Each role
logs in once through the login form; every test opens fresh contexts from the saved storage state.

Screenshots: `shots.take(page, "step")` writes var/browser-artifacts/<test>/<NN-step>.png at every
step; a failing test also gets a picture of every page it had open, and the directory of a test
that passed is removed, so what CI keeps under var/ is the trail of what failed.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.servers import IN_CI, unavailable

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "var" / "browser-artifacts"
CHROMIUM_VARIABLE = "FLEETOPS_CHROMIUM"
PASSWORD = "correct horse battery"  # tests/factories.py UserFactory's
# Wide enough that nothing on the console is collapsed for lack of room (the layout tests are elsewhere).
VIEWPORT = {"width": 1440, "height": 900}
# Per action and per `expect` (Playwright's defaults are 30 s and 5 s): a console page answers in well
# under a second, but this machine's two cores are shared with the rest of the test run.
ACTION_TIMEOUT_MS = 10_000


def chromium_executable() -> str | None:
    configured = os.environ.get(CHROMIUM_VARIABLE, "").strip()
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return (
            "the browser tests did not run: the playwright package is not installed (pip install -e .[dev])"
        )
    if chromium_executable() is None:
        where = os.environ.get(CHROMIUM_VARIABLE) or "chromium on PATH"
        return (
            f"the browser tests did not run: no Chromium ({where}); install Debian's chromium package "
            f"or point {CHROMIUM_VARIABLE} at a Chromium binary"
        )
    return None


# --- failure screenshots ---------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


_CALL_FAILED = pytest.StashKey[bool]()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:120]


@dataclass
class Shots:
    """Step screenshots of one test."""

    directory: Path
    pages: list[Any] = field(default_factory=list)
    count: int = 0

    def take(self, page: Any, step: str) -> Path:
        self.count += 1
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.count:02d}-{_slug(step)}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    def failed(self) -> None:
        """A picture of every page still open, as the test left it."""
        for i, page in enumerate(self.pages):
            try:
                if not page.is_closed():
                    self.take(page, f"failed-page-{i}")
            except Exception:  # a page that crashed or is navigating: the others still get theirs
                pass


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Iterator[Shots]:
    taken = Shots(ARTIFACTS / _slug(request.node.name))
    shutil.rmtree(taken.directory, ignore_errors=True)
    yield taken
    if not request.node.stash.get(_CALL_FAILED, True):
        shutil.rmtree(taken.directory, ignore_errors=True)


# --- the portal, the seed, the browser -------------------------------------------------------------


@dataclass
class Console:
    """The running portal and what was seeded into it."""

    url: str
    seed: Any


def _configured_database() -> str:
    from django.conf import settings

    return str(settings.DATABASES["default"]["NAME"])


# The database DATABASE_URL names, read before any test database is created (pytest-django configures
# Django before it collects this file; it creates the test databases later, in `django_db_setup`).
_CONFIGURED_DATABASE = _configured_database()


@contextmanager
def _test_database(keepdb: bool) -> Iterator[None]:
    """pytest-django creates the test database only for tests that ask for `db` (these do not: their
    data is committed, not rolled back); when no other test of the run asked, create it here."""
    from django.db import connection
    from django.test.utils import setup_databases, teardown_databases

    if connection.settings_dict["NAME"] != _CONFIGURED_DATABASE:  # pytest-django switched to its own
        yield
        return
    # The stubs say Mapping; Django iterates the aliases (its own test runner passes a set).
    aliases: Any = {"default"}
    created = setup_databases(verbosity=0, interactive=False, aliases=aliases, keepdb=keepdb)
    try:
        yield
    finally:
        if not keepdb:
            teardown_databases(created, verbosity=0)


def _server_connections_closed(timeout: float = 2.0) -> None:
    """The live server's request threads close their database connections once the browser's
    sockets are closed (the browser is closed before this runs); wait briefly for that, then end
    any that linger, so the test database can be dropped."""
    from django.db import connection

    others = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    deadline = time.monotonic() + timeout
    while True:
        with connection.cursor() as cursor:
            cursor.execute(others)
            pids = [row[0] for row in cursor.fetchall()]
        if not pids or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    with connection.cursor() as cursor:
        for pid in pids:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])


@pytest.fixture(scope="package")
def console(django_db_setup: Any, django_db_blocker: Any, django_db_keepdb: bool) -> Iterator[Console]:
    reason = browser_missing()
    if reason:
        unavailable(reason)
    from django.contrib.staticfiles.handlers import StaticFilesHandler
    from django.core.management import call_command
    from django.test.testcases import LiveServerThread

    from tests.browser.seed import seed

    with django_db_blocker.unblock(), _test_database(django_db_keepdb):
        try:
            seeded = seed()
            server = LiveServerThread("127.0.0.1", StaticFilesHandler, connections_override={}, port=0)
            server.daemon = True
            server.start()
            server.is_ready.wait()
            if server.error:
                raise server.error
            try:
                yield Console(url=f"http://127.0.0.1:{server.port}", seed=seeded)
            finally:
                server.terminate()
                _server_connections_closed()
        finally:
            # The seed was committed: leave the database as empty as the next test expects it.
            call_command("flush", interactive=False, verbosity=0)


@pytest.fixture(scope="package")
def browser(console: Console) -> Iterator[Any]:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=ACTION_TIMEOUT_MS)

    # Playwright's sync API runs an event loop on this thread; Django's ORM (the tests' service calls)
    # refuses to run where a loop runs unless told that this is deliberate.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            try:
                launched = playwright.chromium.launch(
                    executable_path=chromium_executable(),
                    args=["--no-sandbox", "--disable-dev-shm-usage"],
                )
            except Exception as exc:
                if IN_CI:
                    raise
                pytest.skip(f"the browser tests did not run: Chromium did not start ({exc})")
            yield launched
            launched.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture(scope="package")
def logins(console: Console, browser: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Storage state (the session cookie) of each role, logged in once through the login form."""
    states: dict[str, Path] = {}
    directory = tmp_path_factory.mktemp("logins")
    for role, username in console.seed.usernames.items():
        context = browser.new_context(viewport=VIEWPORT, base_url=console.url)
        page = context.new_page()
        page.goto("/admin/login/?next=/admin/")
        page.get_by_label("Username").fill(username)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(re.compile(r"/admin/$"))
        states[role] = directory / f"{role}.json"
        context.storage_state(path=str(states[role]))
        context.close()
    return states


class Roles:
    """`roles.page("operator")`: a new page in a new context logged in as that role."""

    def __init__(self, browser: Any, console: Console, logins: dict[str, Path], shots: Shots) -> None:
        self.browser, self.console, self.logins, self.shots = browser, console, logins, shots
        self.contexts: list[Any] = []

    def page(self, role: str | None) -> Any:
        context = self.browser.new_context(
            viewport=VIEWPORT,
            base_url=self.console.url,
            storage_state=str(self.logins[role]) if role else None,
        )
        context.set_default_timeout(ACTION_TIMEOUT_MS)
        self.contexts.append(context)
        page = context.new_page()
        self.shots.pages.append(page)
        return page

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def roles(
    request: pytest.FixtureRequest, browser: Any, console: Console, logins: dict[str, Path], shots: Shots
) -> Iterator[Roles]:
    opened = Roles(browser, console, logins, shots)
    yield opened
    if request.node.stash.get(_CALL_FAILED, True):
        shots.failed()
    opened.close()


@pytest.fixture
def committed(console: Console, django_db_blocker: Any) -> Iterator[None]:
    """Database access for the test body: what it writes commits at once, as in the server."""
    with django_db_blocker.unblock():
        yield
