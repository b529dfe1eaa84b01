"""Accepted means done, end to end with real processes and a broker the test owns.

A `redis-server` started by the test is the broker of a Celery worker, Celery beat (running only the
outbox relay's declared schedule) and gunicorn (the real admin). The test stops the redis-server,
an admin asks for *Classify again* in the console and is told it is queued (the request's outbox
message stays pending), the redis-server starts again on the same port, and with no operator action
the relay sends the message, the worker classifies the protocol, and the message was sent exactly
once (one classification run).

Every wait is on database rows or an HTTP endpoint, never on log text or a fixed sleep.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.observability.models import Heartbeat
from fleetops.observability.sync import schedules_sync
from fleetops.outbox.models import OutboxMessage, OutboxStatus
from fleetops.outbox.tasks import RELAY_HEARTBEAT
from fleetops.schedules import declared
from migrations_app.models import MigrationStatus, Protocol
from migrations_app.protocols.services import CLASSIFY_TASK
from tests.factories import UserFactory, make_indexed_chain
from tests.processes import ROOT, subprocess_env
from tests.servers import OwnedRedis, free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

PASSWORD = "correct horse battery"  # tests/factories.py
ADMIN = "/admin/migrations_app/protocol"


@pytest.fixture
def owned_redis() -> Iterator[OwnedRedis]:
    server = OwnedRedis()
    server.start()
    yield server
    server.destroy()


class Processes:
    """The portal's processes for one test, each logging to a file; all stopped at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        out = (self.logs / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def tails(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.logs.glob("*.log"))
        )

    def assert_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}
        assert not dead, f"processes died: {dead}\n{self.tails()}"

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@contextlib.contextmanager
def processes(logs: Path) -> Iterator[Processes]:
    procs = Processes(logs)
    try:
        yield procs
    finally:
        procs.stop()


def login(base: str, username: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=30, follow_redirects=False)
    page = client.get("/admin/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert page.status_code == 200 and token is not None
    done = client.post(
        "/admin/login/?next=/admin/",
        data={"username": username, "password": PASSWORD, "csrfmiddlewaretoken": token.group(1)},
        headers={"Referer": f"{base}/admin/login/"},
    )
    assert done.status_code == 302, done.text[:2000]
    return client


def post_action(client: httpx.Client, url: str, data: dict[str, Any]) -> httpx.Response:
    form = client.get(url)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
    assert form.status_code == 200 and token is not None, form.text[:2000]
    return client.post(
        url,
        data={**data, "csrfmiddlewaretoken": token.group(1)},
        headers={"Referer": f"{client.base_url}{url}"},
    )


def relay_beats() -> int:
    row = Heartbeat.objects.filter(name=RELAY_HEARTBEAT).first()
    return row.beats if row else 0


def classified() -> bool:
    return Protocol.objects.get(protocol_id="SEP41").classification_status == MigrationStatus.SUCCESS


def test_a_classification_accepted_while_the_broker_is_down_is_carried_out_once_it_is_back(
    org, owned_redis, tmp_path
):
    chain = make_indexed_chain(org, blocks=6)
    protocol = Protocol.objects.create(protocol_id="SEP41", chain=chain, name="SEP-41")
    UserFactory(username="kick-root", is_superuser=True)
    # Beat runs exactly the relay's declared schedule (every 10 s), nothing else.
    schedules_sync(actor=Actor.system("test"), schedules=[s for s in declared() if s.name == "outbox.relay"])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = subprocess_env(
        application_name="test-kick-outage",
        CELERY_BROKER_URL=owned_redis.url(),
        GUNICORN_BIND=f"127.0.0.1:{port}",
        WEB_CONCURRENCY="1",
        LOG_LEVEL="INFO",
    )
    celery = [sys.executable, "-m", "celery", "-A", "fleetops"]
    with processes(tmp_path) as procs:
        procs.start(
            "worker",
            [*celery, "worker", "--pool", "solo", "--without-gossip", "--without-mingle",
             "--hostname", f"kick-{uuid.uuid4().hex[:6]}@%h", "--loglevel", "INFO"],
            env,
        )  # fmt: skip
        procs.start("beat", [*celery, "beat", "--schedule", str(tmp_path / "beat-schedule")], env)
        procs.start(
            "web",
            [sys.executable, "-m", "gunicorn", "fleetops.wsgi", "--config", "deploy/gunicorn.conf.py"],
            env,
        )
        try:
            # Beat -> broker -> worker -> database works: the relay has run; the web answers.
            wait_for(lambda: relay_beats() >= 1, timeout=60, what="the first relay pass")
            wait_for(
                lambda: httpx.get(f"{base}/health/ready", timeout=5).status_code == 200,
                timeout=60,
                what="gunicorn to be ready",
            )
            admin = login(base, "kick-root")

            owned_redis.stop()
            try:
                response = post_action(
                    admin, f"{ADMIN}/{protocol.pk}/action/classify/", {"reason": "new contracts"}
                )
                assert response.status_code == 302, response.text[:2000]
                assert response.headers["Location"].endswith(f"{ADMIN}/{protocol.pk}/change/")
                page = admin.get(response.headers["Location"])
                assert page.status_code == 200 and "Classification queued" in page.text
                # Accepted: durable in PostgreSQL with its audit row, waiting for the broker.
                [message] = OutboxMessage.objects.filter(task=CLASSIFY_TASK)
                assert message.status == OutboxStatus.PENDING and message.attempts == 1
                assert message.last_error, "the failed send is recorded on the message"
                requested = AuditEvent.objects.get(action="protocol.classification_requested")
                assert requested.request_id == message.request_id
                assert (
                    Protocol.objects.get(protocol_id="SEP41").classification_status
                    == MigrationStatus.NOT_STARTED
                )
            finally:
                owned_redis.start()

            # No operator action from here on: the relay sends it, the worker classifies.
            wait_for(classified, timeout=60, what="the classification queued during the outage")
            message.refresh_from_db()
            assert message.status == OutboxStatus.SENT and message.attempts == 2
            # Sent exactly once: a relay pass later, still one message, one send and one run.
            after = relay_beats()
            wait_for(lambda: relay_beats() > after, timeout=60, what="another relay pass")
            assert OutboxMessage.objects.filter(task=CLASSIFY_TASK).count() == 1
            assert OutboxMessage.objects.get(pk=message.pk).attempts == 2
            started = AuditEvent.objects.filter(
                action="protocol.classification_started", target_label__startswith="SEP41 on "
            )
            assert started.count() == 1
            assert (
                AuditEvent.objects.filter(
                    action="protocol.classified", target_label__startswith="SEP41 on "
                ).count()
                == 1
            )
            procs.assert_alive()
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{procs.tails()}") from None
