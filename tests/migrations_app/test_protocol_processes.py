"""Live ingestion (`indexer_run`) and the backfill (`protocol_migrate history`) as separate processes
on a chain that keeps growing: every height written by exactly one writer, rows equal to a
from-scratch computation, the handoff by itself; kill -9 of the backfill mid-window and a re-run;
reorgs during the backfill; the cursor never regressing (without a rollback) nor claiming heights
whose rows were not written."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection, connections

from indexer.models import Chain, IndexerState, SyncSource
from migrations_app.models import Cursor, MigrationStatus, Protocol, ProtocolStateChange, ProtocolWriteSpan
from simulators.chain.server import serve_in_thread
from tests.migrations_app.test_protocol_history import assert_rows_match, assert_spans_tile
from tests.processes import ROOT, subprocess_env

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
IDS = ("SEP41", "SEP50")


def indexer_run(slug: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "manage.py", "indexer_run", "--chain", slug, "--poll", "0.1", "--ingest-only"],
        cwd=ROOT,
        env=subprocess_env(application_name="fleetops-indexer"),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def backfill(log: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "protocol_migrate",
            "history",
            "--protocol-id",
            *IDS,
            "--poll",
            "0.1",
            *args,
        ],
        cwd=ROOT,
        env=subprocess_env(application_name="fleetops-backfill"),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def wait_for(predicate: Callable[[], Any], timeout: float = 90, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def indexed(chain: Chain) -> int:
    return IndexerState.objects.get(chain=chain).last_indexed_height or 0


def backfill_connections() -> int:
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'fleetops-backfill'")
        row = cur.fetchone()
    return int(row[0]) if row else 0


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from Linux /proc; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie has exited


def children_of(pid: int) -> list[int]:
    entries = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
    return [c for c in entries if alive(c) and (_proc_stat(c) or ("", -1))[1] == pid]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


class Producer(threading.Thread):
    """Grows the chain on a timer, like a live network."""

    def __init__(self, sim: Any, interval: float) -> None:
        super().__init__(daemon=True)
        self.sim, self.interval, self.halt = sim, interval, threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            self.sim.produce(1)


class CursorWatch(threading.Thread):
    """Samples every protocol's cursor with its spans and rows in ONE snapshot: the cursor must
    never move back (no rollback in these runs), and must equal the end of the written spans."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.halt = threading.Event()
        self.problems: list[str] = []
        self.samples = 0

    def run(self) -> None:
        last: dict[str, int] = {}
        names = {f"protocol_sim_{p}_history_cursor": p for p in IDS}
        try:
            while not self.halt.is_set():
                with connection.cursor() as cur:
                    cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    cur.execute(
                        f"SELECT name, height FROM {Cursor._meta.db_table} WHERE name = ANY(%s)",
                        [list(names)],
                    )
                    cursors = dict(cur.fetchall())
                    protocols = Protocol._meta.db_table
                    cur.execute(
                        f"SELECT p.protocol_id, max(s.to_height) FROM {ProtocolWriteSpan._meta.db_table} s "
                        f"JOIN {protocols} p ON p.id = s.protocol_id GROUP BY p.protocol_id"
                    )
                    ends = dict(cur.fetchall())
                    cur.execute(
                        f"SELECT p.protocol_id, max(s.height) FROM {ProtocolStateChange._meta.db_table} s "
                        f"JOIN {protocols} p ON p.id = s.protocol_id GROUP BY p.protocol_id"
                    )
                    top_rows = dict(cur.fetchall())
                    cur.execute("COMMIT")
                for name, height in cursors.items():
                    pid = names[name]
                    if height < last.get(name, height):
                        self.problems.append(f"{name} went back {last[name]} -> {height}")
                    last[name] = height
                    if pid in ends and ends[pid] != height:
                        self.problems.append(f"{name} at {height} but the spans end at {ends[pid]}")
                    if (top_rows.get(pid) or 0) > height:
                        self.problems.append(f"{pid} has rows above its cursor {height}")
                self.samples += 1
                time.sleep(0.02)
        finally:
            connections.close_all()


@pytest.fixture
def sim() -> Iterator[tuple[Any, str]]:
    server, simulator, url = serve_in_thread(seed=21, txs_per_block=10)
    try:
        yield simulator, url
    finally:
        server.shutdown()


def make_chain(org: Any, url: str) -> Chain:
    chain = Chain.objects.create(
        org=org,
        slug="sim",
        chain_id="fleetops-sim-1",
        catchup_batch_size=25,
        expected_block_time_seconds=0.3,
        enrichment_enabled=False,
    )
    IndexerState.objects.create(chain=chain)
    SyncSource.objects.create(
        chain=chain, name="primary", rpc_url=url, websocket_url=url.replace("http", "ws") + "/websocket"
    )
    return chain


def start_history(
    org: Any, sim: tuple[Any, str], tmp_path: Path, blocks: int
) -> tuple[Chain, subprocess.Popen[bytes], Producer]:
    simulator, url = sim
    simulator.produce(blocks)
    chain = make_chain(org, url)
    indexer = indexer_run(chain.slug, tmp_path / "indexer.log")
    wait_for(lambda: indexed(chain) >= blocks, what="the indexer to catch up")
    call_command("protocol_setup", "--protocol-id", *IDS)
    producer = Producer(simulator, 0.25)
    producer.start()
    return chain, indexer, producer


def finish(chain: Chain, indexer: subprocess.Popen[bytes], producer: Producer, sim: Any) -> int:
    """Let live write a few more blocks, stop the chain, let the indexer drain; the final tip."""
    start = indexed(chain)
    wait_for(lambda: indexed(chain) >= start + 3, what="live blocks after the handoff")
    producer.halt.set()
    producer.join()
    head = sim.head
    wait_for(lambda: indexed(chain) >= head, what="the indexer to reach the head")
    stop(indexer)
    return indexed(chain)


def assert_converged(chain: Chain, top: int) -> None:
    for pid in IDS:
        protocol = Protocol.objects.get(protocol_id=pid)
        assert protocol.history_migration_status == MigrationStatus.SUCCESS
        spans = assert_spans_tile(pid, oldest=1, top=top)
        writers = [s[0] for s in spans]
        assert writers[0] == "history" and writers[-1] == "live"
        assert Cursor.objects.get(name=protocol.history_cursor_name).height == top
        assert_rows_match(chain, pid)


@pytest.mark.parametrize("workers", ["1", "3"])
def test_backfill_and_live_ingestion_in_separate_processes_write_every_height_exactly_once(
    org, sim, tmp_path, workers
):
    chain, indexer, producer = start_history(org, sim, tmp_path, blocks=400)
    watch = CursorWatch()
    watch.start()
    try:
        proc = backfill(tmp_path / "backfill.log", "--window-size", "15", "--workers", workers)
        assert proc.wait(120) == 0, (tmp_path / "backfill.log").read_text()
        output = (tmp_path / "backfill.log").read_text()
        assert "handed off to live ingestion at height" in output
        top = finish(chain, indexer, producer, sim[0])
    finally:
        watch.halt.set()
        watch.join()
        producer.halt.set()
        stop(indexer)
    assert watch.samples > 10 and not watch.problems, watch.problems[:5]
    assert_converged(chain, top)
    for pid in IDS:  # the handoff happened by itself: exactly one history span, then live
        assert [s[0] for s in assert_spans_tile(pid, oldest=1, top=top)] == ["history", "live"]


@pytest.mark.parametrize("workers", ["1", "3"])
def test_a_backfill_killed_mid_window_resumes_without_gap_or_duplicate(org, sim, tmp_path, workers):
    chain, indexer, producer = start_history(org, sim, tmp_path, blocks=300)
    span_table = ProtocolWriteSpan._meta.db_table
    try:
        # Hold the spans table so the backfill's window transaction blocks right after its CAS and
        # COPY: the backfill is provably mid-window (cursor row locked, rows uncommitted) when killed.
        blocker = connections.create_connection("default")
        blocker.set_autocommit(False)
        with blocker.cursor() as cur:
            cur.execute(f"LOCK TABLE {span_table} IN EXCLUSIVE MODE")
        proc = backfill(tmp_path / "backfill.log", "--window-size", "40", "--workers", workers)

        def mid_window() -> bool:
            # The start (cursors created, statuses in progress) committed first: a lock the start
            # itself waits on for a moment must not pass for the window's.
            names = [f"protocol_sim_{pid}_history_cursor" for pid in IDS]
            if Cursor.objects.filter(name__in=names).count() < len(names):
                return False
            with connection.cursor() as cur:
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'fleetops-backfill' "
                    "AND wait_event_type = 'Lock' AND xact_start IS NOT NULL"
                )
                row = cur.fetchone()
            return bool(row and row[0])

        wait_for(mid_window, what="the backfill to block inside its window transaction")
        if workers != "1":  # the other workers have read their windows and wait for their turn
            wait_for(
                lambda: backfill_connections() >= int(workers) + 1, what="every worker on its connection"
            )
        # One worker classifies in process; N workers classify in N worker processes.
        children = children_of(proc.pid)
        if workers == "1":
            assert children == []
        else:
            assert len(children) >= int(workers), children
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # The classification processes of a backfill killed with SIGKILL do not outlive it.
        wait_for(lambda: not any(alive(c) for c in children), timeout=30, what="the pool workers to exit")
        blocker.rollback()
        blocker.close()
        for pid in IDS:  # the killed window left nothing behind
            assert Cursor.objects.get(name=f"protocol_sim_{pid}_history_cursor").height == 0
            assert not ProtocolStateChange.objects.filter(protocol__protocol_id=pid).exists()
        assert (
            Protocol.objects.get(protocol_id="SEP41").history_migration_status == MigrationStatus.IN_PROGRESS
        )
        # Let one re-run commit a few windows, kill it between windows, then run to the end.
        proc = backfill(tmp_path / "backfill.log", "--window-size", "40", "--workers", workers)
        wait_for(
            lambda: (
                (
                    Cursor.objects.filter(name="protocol_sim_SEP41_history_cursor")
                    .values_list("height", flat=True)
                    .first()
                    or 0
                )
                >= 80
            ),
            what="the re-run to commit windows",
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = backfill(tmp_path / "backfill.log", "--window-size", "40", "--workers", workers)
        assert proc.wait(120) == 0, (tmp_path / "backfill.log").read_text()
        top = finish(chain, indexer, producer, sim[0])
    finally:
        producer.halt.set()
        stop(indexer)
    assert_converged(chain, top)


@pytest.mark.parametrize("workers", ["1", "3"])
def test_reorgs_during_the_backfill_leave_rows_equal_to_a_from_scratch_computation(
    org, sim, tmp_path, workers
):
    simulator, _ = sim
    chain, indexer, producer = start_history(org, sim, tmp_path, blocks=300)
    try:
        proc = backfill(tmp_path / "backfill.log", "--window-size", "10", "--workers", workers)
        deadline = time.monotonic() + 120
        reorgs = 0
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.7)
            if reorgs < 6:
                simulator.reorg(4)  # the indexer rolls back and re-indexes; rows above the fork go
                reorgs += 1
        assert proc.wait(60) == 0, (tmp_path / "backfill.log").read_text()
        assert reorgs >= 1
        top = finish(chain, indexer, producer, simulator)
    finally:
        producer.halt.set()
        stop(indexer)
    assert_converged(chain, top)
