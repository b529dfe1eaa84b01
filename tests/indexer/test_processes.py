"""`manage.py indexer_run` as real processes against the chain simulator on loopback: one writer per
chain, takeover after a kill within the lease TTL, a paused (SIGSTOP) ex-leader's late write refused,
kill -9 mid-batch then restart equal to an uninterrupted run, and the commands that verify, re-index
and roll back ranges."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.observability.models import Heartbeat, Lease
from indexer.blocks import lease_name
from indexer.models import Block, Chain, Event, IndexerState, SyncSource
from indexer.verify import digests_stored, range_checksum
from simulators.chain.server import serve_in_thread
from tests.processes import ROOT, subprocess_env
from tests.servers import free_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def control(url: str, what: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(f"{url}/control/{what}", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def indexer_run(slug: str, *args: str, log: Path, application_name: str = "") -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "manage.py", "indexer_run", "--chain", slug, "--poll", "0.1", *args],
        cwd=ROOT,
        env=subprocess_env(application_name=application_name),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def wait_for(predicate: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def indexed(chain: Chain) -> int:
    return IndexerState.objects.get(chain=chain).last_indexed_height or 0


def health(port: int, path: str = "/health/ready") -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of an `indexer_run --health-port` endpoint."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def is_standby(port: int) -> bool:
    """Live, answering from the database, and not ready because the writer lease is held elsewhere."""
    status, body = health(port)
    return status == 503 and body["problems"].get("lease", "").startswith("standby")


def is_writer(port: int) -> bool:
    return health(port)[0] == 200


def reachable(check: Callable[[int], bool], port: int) -> Callable[[], bool]:
    """`check(port)`, with "the port does not answer yet" (the process is still starting) as False."""

    def probe() -> bool:
        try:
            return check(port)
        except OSError:
            return False

    return probe


def lease_expired(chain: Chain) -> bool:
    return Lease.objects.get(name=lease_name(chain)).expires_at <= clock.now()


def database_now() -> datetime:
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        return cursor.fetchone()[0]


def stepped_as_standby_since(application_name: str, since: datetime) -> bool:
    """A process (by its connections' application_name) has finished a step as a standby after
    `since`: its last statement, completed after `since`, is the step's heartbeat saying
    leader=false. (Client-side binding puts the values in pg_stat_activity's query text.)"""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND state = 'idle' "
            "AND state_change > %s AND query LIKE %s AND query LIKE %s",
            [application_name, since, f"%INSERT INTO {Heartbeat._meta.db_table}%", '%"leader": false%'],
        )
        return bool(cursor.fetchone()[0])


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            with_signal(proc, signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def with_signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture
def sim() -> Iterator[tuple[Any, str]]:
    server, simulator, url = serve_in_thread(seed=11, txs_per_block=8)
    try:
        yield simulator, url
    finally:
        server.shutdown()


def make_chain(org: Any, url: str, slug: str = "sim", **fields: Any) -> Chain:
    chain = Chain.objects.create(
        org=org, slug=slug, chain_id="fleetops-sim-1", catchup_batch_size=10,
        expected_block_time_seconds=0.5, **fields,
    )  # fmt: skip
    IndexerState.objects.create(chain=chain)
    SyncSource.objects.create(
        chain=chain, name="primary", rpc_url=url, websocket_url=url.replace("http", "ws") + "/websocket"
    )
    return chain


def test_two_writers_exactly_one_writes_and_the_standby_takes_over_after_a_kill(org, sim, tmp_path):
    _, url = sim
    control(url, "produce", {"blocks": 30})
    chain = make_chain(org, url)
    ports = [free_port(), free_port()]
    procs = [
        indexer_run("sim", "--lease-ttl", "3", "--health-port", str(port), log=tmp_path / f"w{i}.log")
        for i, port in enumerate(ports)
    ]
    try:
        wait_for(lambda: indexed(chain) >= 31, what="catch-up")
        leader = Lease.objects.get(name=lease_name(chain)).holder
        pids = {int(leader.rsplit(":", 1)[1])}
        assert pids <= {p.pid for p in procs}
        first, second = (procs[0], procs[1]) if procs[0].pid in pids else (procs[1], procs[0])
        first_port, second_port = ports[procs.index(first)], ports[procs.index(second)]
        # Both run: the writer is ready, the other is live but a standby (its own health port says so).
        wait_for(reachable(is_writer, first_port), what="the writer's /health/ready")
        wait_for(reachable(is_standby, second_port), what="the second process to answer as a standby")
        assert second.poll() is None
        # Kill the writer without a chance to release: the standby takes over within TTL + a poll.
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed_at = time.monotonic()
        control(url, "produce", {"blocks": 5})
        wait_for(lambda: indexed(chain) >= 36, timeout=30, what="takeover")
        assert time.monotonic() - killed_at < 3 + 5
        assert Lease.objects.get(name=lease_name(chain)).holder.endswith(f":{second.pid}")
        wait_for(reachable(is_writer, second_port), timeout=30, what="the new writer's /health/ready")
    finally:
        stop_all(procs)
    heights = list(Block.objects.filter(chain=chain).order_by("height").values_list("height", flat=True))
    assert heights == list(range(1, heights[-1] + 1))  # contiguous, every height once


def test_a_paused_ex_leader_cannot_commit_after_a_takeover(org, sim, tmp_path):
    _, url = sim
    control(url, "produce", {"blocks": 5})
    chain = make_chain(org, url)
    control(url, "knobs", {"latency_ms": 150})  # each step spends time fetching
    old = indexer_run("sim", "--lease-ttl", "2", "--no-websocket", log=tmp_path / "old.log",
                      application_name="fleetops-old-leader")  # fmt: skip
    procs = [old]
    try:
        wait_for(lambda: indexed(chain) >= 6, what="first catch-up")
        token = Lease.objects.get(name=lease_name(chain)).token
        old.send_signal(signal.SIGSTOP)  # a GC pause / frozen VM: it still believes it leads
        wait_for(lambda: lease_expired(chain), timeout=30, what="the paused leader's lease to expire")
        control(url, "produce", {"blocks": 3})
        new = indexer_run("sim", "--lease-ttl", "2", "--no-websocket", log=tmp_path / "new.log")
        procs.append(new)
        wait_for(lambda: indexed(chain) >= 9, timeout=30, what="new leader")
        assert Lease.objects.get(name=lease_name(chain)).token > token
        resumed_at = database_now()
        old.send_signal(signal.SIGCONT)
        control(url, "produce", {"blocks": 3})
        wait_for(lambda: indexed(chain) >= 12, timeout=30, what="new leader keeps writing")
        # The ex-leader has finished a step since it resumed and that step ended as a standby: the
        # one it was frozen in (its late commit refused by the fence) or a later one. Only now is
        # "the new leader kept the lease" news.
        wait_for(
            lambda: stepped_as_standby_since("fleetops-old-leader", resumed_at),
            timeout=60,
            what="the resumed ex-leader to step as a standby",
        )
        assert old.poll() is None
        assert Lease.objects.get(name=lease_name(chain)).holder.endswith(f":{new.pid}")
    finally:
        stop_all(procs)
    log = (tmp_path / "old.log").read_text()
    assert "standby" in log or "lost the writer lease" in log
    heights = list(Block.objects.filter(chain=chain).order_by("height").values_list("height", flat=True))
    assert heights == list(range(1, heights[-1] + 1))


def test_kill_9_mid_batch_then_restart_equals_an_uninterrupted_run(org, sim, tmp_path):
    _, url = sim
    control(url, "produce", {"blocks": 119})
    head = int(control(url, "state", {})["head"])
    killed = make_chain(org, url, slug="killed")
    control(url, "knobs", {"latency_ms": 20})
    proc = indexer_run("killed", "--stop-at", str(head), "--ingest-only", log=tmp_path / "k1.log")
    try:
        wait_for(lambda: indexed(killed) >= 20, what="some batches committed")
        proc.send_signal(signal.SIGKILL)  # mid-batch: fetching or inside a commit transaction
        proc.wait(10)
    finally:
        stop_all([proc])
    at_kill = indexed(killed)
    assert at_kill < head
    # Rows and height moved together: nothing above the committed height was left behind.
    assert not Block.objects.filter(chain=killed, height__gt=at_kill).exists()
    assert not Event.objects.filter(chain=killed, height__gt=at_kill).exists()
    control(url, "knobs", {"latency_ms": 0})
    restarted = indexer_run("killed", "--stop-at", str(head), "--lease-ttl", "1", log=tmp_path / "k2.log")
    assert restarted.wait(90) == 0, (tmp_path / "k2.log").read_text()
    clean = make_chain(org, url, slug="clean")
    uninterrupted = indexer_run("clean", "--stop-at", str(head), log=tmp_path / "c.log")
    assert uninterrupted.wait(90) == 0, (tmp_path / "c.log").read_text()
    assert indexed(killed) == indexed(clean) == head
    assert range_checksum(digests_stored(chain=killed, first=1, last=head).values()) == range_checksum(
        digests_stored(chain=clean, first=1, last=head).values()
    )


def test_verify_reindex_and_rollback_commands(org, sim):
    _, url = sim
    control(url, "produce", {"blocks": 24})
    chain = make_chain(org, url)
    call_command("indexer_run", "--chain", "sim", "--stop-at", "25", "--no-websocket", stdout=io.StringIO())
    out = io.StringIO()
    call_command("indexer_verify", "--chain", "sim", stdout=out)
    assert "identical to the source" in out.getvalue()
    before = range_checksum(digests_stored(chain=chain, first=1, last=25).values())

    # Damage two heights' events: verify names them, reindex rewrites exactly those.
    Event.objects.filter(chain=chain, height__in=[7, 19]).delete()
    out = io.StringIO()
    with pytest.raises(CommandError, match="2 of 25 heights differ"):
        call_command("indexer_verify", "--chain", "sim", stdout=out)
    assert "height 7" in out.getvalue() and "height 19" in out.getvalue()
    out = io.StringIO()
    call_command("indexer_reindex", "--chain", "sim", stdout=out)
    assert "2 rewritten" in out.getvalue()
    assert range_checksum(digests_stored(chain=chain, first=1, last=25).values()) == before
    out = io.StringIO()
    call_command("indexer_reindex", "--chain", "sim", "--from", "1", "--to", "25", stdout=out)
    assert "0 rewritten" in out.getvalue()  # a re-index of a correct range writes nothing

    with pytest.raises(CommandError, match="--to must be between"):
        call_command("indexer_rollback", "--chain", "sim", "--to", "25", "--reason", "x", "--yes")
    call_command("indexer_rollback", "--chain", "sim", "--to", "20", "--reason", "bad upgrade", "--yes",
                 stdout=io.StringIO())  # fmt: skip
    assert indexed(chain) == 20
    assert not Block.objects.filter(chain=chain, height__gt=20).exists()
    audit = AuditEvent.objects.get(action="indexer.rolled_back")
    assert audit.reason == "bad upgrade" and audit.actor_label.startswith("command:indexer_rollback")


def test_commands_refuse_while_a_live_writer_holds_the_lease(org, sim):
    from datetime import timedelta

    from fleetops.observability.leases import lease_acquire

    _, url = sim
    control(url, "produce", {"blocks": 4})
    chain = make_chain(org, url)
    call_command("indexer_run", "--chain", "sim", "--stop-at", "5", "--no-websocket", stdout=io.StringIO())
    assert lease_acquire(name=lease_name(chain), holder="host:123", ttl=timedelta(seconds=60))
    with pytest.raises(CommandError, match="held by host:123"):
        call_command("indexer_rollback", "--chain", "sim", "--to", "2", "--reason", "x", "--yes")
    with pytest.raises(CommandError, match="held by host:123"):
        call_command("indexer_reindex", "--chain", "sim")
    assert indexed(chain) == 5
