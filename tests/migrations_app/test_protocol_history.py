"""The history migration in-process, against the chain simulator and the real indexer runner on
PostgreSQL: validation, the run to the tip and the handoff, failure and resume, a rollback between
reading a window and committing it, live rollbacks, setup and the current state."""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.observability.heartbeats import heartbeat_verdict
from fleetops.observability.models import Heartbeat
from indexer.models import Chain, Event, IndexerState, Mode, SyncSource
from indexer.rpc.client import CometRpc, SourceConfig
from indexer.runner import IndexerRunner
from migrations_app.models import (
    Cursor,
    MigrationStatus,
    Protocol,
    ProtocolBalance,
    ProtocolContract,
    ProtocolNftOwner,
    ProtocolStateChange,
    ProtocolWriteSpan,
)
from migrations_app.protocols import history, services, store
from migrations_app.protocols.current_state import current_state_migrate
from migrations_app.protocols.history import history_migrate
from migrations_app.protocols.metrics import WINDOW_RETRIES
from simulators.chain.server import serve_in_thread

pytestmark = pytest.mark.django_db(transaction=True)
ACTOR = Actor.system("test")
AMOUNT = re.compile(r"^(\d+)[a-z]*$")


# --- from scratch: an independent reading of the stored events -----------------------------------------


def expected_rows(chain: Chain, protocol_id: str) -> set[tuple[Any, ...]]:
    """What the protocol's rows must be, computed from every stored event in one pass."""
    out: set[tuple[Any, ...]] = set()
    types = {"SEP41": ("transfer", "mint", "burn"), "SEP50": ("nft_transfer", "nft_mint")}[protocol_id]
    events = Event.objects.filter(chain=chain, type__in=types).values_list(
        "height", "phase", "tx_index", "event_index", "type", "attributes"
    )
    for height, phase, tx_index, event_index, kind, attributes in events:
        a: dict[str, str] = {}
        for attr in attributes:
            a.setdefault(attr["key"], attr["value"])
        ident = (height, phase, tx_index, event_index)
        if protocol_id == "SEP41":
            m = AMOUNT.match(a.get("amount", ""))
            if not a.get("contract") or not m or int(m.group(1)) == 0:
                continue
            amount = Decimal(m.group(1))
            if kind == "transfer" and a.get("sender") and a.get("recipient"):
                out.add((*ident, "transfer", a["sender"], a["recipient"], a["contract"], amount, ""))
            elif kind == "mint" and a.get("recipient"):
                out.add((*ident, "mint", a["recipient"], "", a["contract"], amount, ""))
            elif kind == "burn" and a.get("sender"):
                out.add((*ident, "burn", a["sender"], "", a["contract"], amount, ""))
        elif a.get("class_id") and a.get("token_id") and a.get("recipient"):
            if kind == "nft_mint":
                out.add((*ident, "mint", a["recipient"], "", a["class_id"], None, a["token_id"]))
            elif a.get("sender"):
                out.add((*ident, "transfer", a["sender"], a["recipient"], a["class_id"], None, a["token_id"]))
    return out


def stored_rows(protocol_id: str) -> list[tuple[Any, ...]]:
    return list(
        ProtocolStateChange.objects.filter(protocol__protocol_id=protocol_id).values_list(
            "height",
            "phase",
            "tx_index",
            "event_index",
            "kind",
            "account",
            "counterparty",
            "asset",
            "amount",
            "token_id",
        )
    )


def assert_spans_tile(protocol_id: str, *, oldest: int, top: int) -> list[tuple[str, int, int]]:
    """Every height in [oldest, top] written by exactly one writer; returns the spans."""
    spans = list(
        ProtocolWriteSpan.objects.filter(protocol__protocol_id=protocol_id)
        .order_by("from_height")
        .values_list("writer", "from_height", "to_height")
    )
    assert spans, "nothing was written"
    assert spans[0][1] == oldest
    for (_, _, prev_to), (_, start, _) in itertools.pairwise(spans):
        assert start == prev_to + 1, f"gap or overlap between spans: {spans}"
    assert spans[-1][2] == top
    return spans


def assert_rows_match(chain: Chain, protocol_id: str) -> None:
    rows = stored_rows(protocol_id)
    assert len(rows) == len(set(rows)), "duplicate state changes"
    assert set(rows) == expected_rows(chain, protocol_id)


def expected_balances(chain: Chain, start: int = 0) -> dict[tuple[str, str], Decimal]:
    balances: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for height, _, _, _, kind, account, counterparty, asset, amount, _ in expected_rows(chain, "SEP41"):
        if height < start:
            continue
        if kind == "transfer":
            balances[(asset, account)] -= amount
            balances[(asset, counterparty)] += amount
        elif kind == "mint":
            balances[(asset, account)] += amount
        else:
            balances[(asset, account)] -= amount
    return dict(balances)


def expected_owners(chain: Chain) -> dict[tuple[str, str], str]:
    owners: dict[tuple[str, str], str] = {}
    order = {"begin_block": 0, "tx": 1, "end_block": 2, "finalize_block": 3}
    rows = sorted(
        expected_rows(chain, "SEP50"),
        key=lambda r: (r[0], order[r[1]], r[2] if r[2] is not None else -1, r[3]),
    )
    for _, _, _, _, kind, account, counterparty, asset, _, token in rows:
        owners[(asset, token)] = counterparty if kind == "transfer" else account
    return owners


# --- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture
def sim() -> Iterator[tuple[Any, str]]:
    server, simulator, url = serve_in_thread(seed=3, txs_per_block=6)
    try:
        yield simulator, url
    finally:
        server.shutdown()


@pytest.fixture
def chain(org, sim) -> Chain:
    _, url = sim
    chain = Chain.objects.create(
        org=org,
        slug="sim",
        chain_id="fleetops-sim-1",
        catchup_batch_size=10,
        finality_depth=16,
        expected_block_time_seconds=1.0,
    )
    IndexerState.objects.create(chain=chain)
    SyncSource.objects.create(chain=chain, name="primary", rpc_url=url, priority=1)
    return chain


@pytest.fixture(autouse=True)
def _fresh_contract_cache() -> Iterator[None]:
    store.forget_known_contracts()
    yield
    store.forget_known_contracts()


def runner_for(chain: Chain, url: str) -> IndexerRunner:
    rpc = CometRpc([SourceConfig("primary", url, 1)], attempts=1, retry_base=0.01)
    return IndexerRunner(chain, rpc, holder="test-writer")


def catch_up(runner: IndexerRunner) -> int:
    for _ in range(500):
        result = runner.step()
        if (
            result.committed == 0
            and result.mode in (Mode.NORMAL, Mode.IDLE)
            and result.indexed == result.head
        ):
            return int(result.indexed or 0)
    raise AssertionError("did not catch up")


def indexed(chain: Chain) -> int:
    return IndexerState.objects.get(chain=chain).last_indexed_height or 0


def set_up(*ids: str) -> None:
    call_command("protocol_setup", "--protocol-id", *ids)


def in_thread(fn: Any, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = fn(**kwargs)
        except BaseException as exc:  # handed to the test
            out["error"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def run_live_until(runner: IndexerRunner, sim: Any, thread: threading.Thread, timeout: float = 60) -> None:
    """Produce a block and index it, again and again, until the backfill thread is done."""
    deadline = time.monotonic() + timeout
    while thread.is_alive():
        assert time.monotonic() < deadline, "the backfill did not hand off"
        sim.produce(1)
        catch_up(runner)
        time.sleep(0.05)


# --- validation ------------------------------------------------------------------------------------------


def _snapshot() -> tuple[Any, ...]:
    return (
        list(Protocol.objects.values_list("id", "classification_status", "history_migration_status")),
        list(Cursor.objects.values_list("name", "height")),
        AuditEvent.objects.filter(action__startswith="protocol.history").count(),
    )


def test_an_unknown_protocol_is_refused_with_the_known_ones_named_and_nothing_changes(chain, sim):
    before = _snapshot()
    with pytest.raises(CommandError, match=r"unknown protocol SEP99: .*known: SEP41, SEP50"):
        call_command("protocol_migrate", "history", "--protocol-id", "SEP99")
    assert _snapshot() == before


def test_a_protocol_not_set_up_or_not_classified_is_refused_and_nothing_changes(chain, sim):
    with pytest.raises(CommandError, match=r"protocol SEP41 is not set up: run `manage.py protocol_setup"):
        call_command("protocol_migrate", "history", "--protocol-id", "SEP41")
    Protocol.objects.create(protocol_id="SEP41", chain=chain, name="x")
    before = _snapshot()
    with pytest.raises(
        CommandError, match=r"protocol SEP41 is not classified \(classification status: not_started\)"
    ):
        call_command("protocol_migrate", "history", "--protocol-id", "SEP41")
    assert _snapshot() == before
    assert not Cursor.objects.exists()


def test_a_chain_the_indexer_has_not_started_is_refused_and_nothing_changes(chain, sim):
    set_up("SEP41")  # classifying an empty chain succeeds with no contracts
    before = _snapshot()
    with pytest.raises(CommandError, match=r"the indexer has not started on chain sim"):
        call_command("protocol_migrate", "history", "--protocol-id", "SEP41")
    assert _snapshot() == before
    assert Protocol.objects.get(protocol_id="SEP41").history_migration_status == MigrationStatus.NOT_STARTED


def test_a_bad_window_size_is_refused(chain, sim):
    with pytest.raises(CommandError, match="window size must be between 1 and"):
        call_command("protocol_migrate", "history", "--protocol-id", "SEP41", "--window-size", "0")


# --- setup -----------------------------------------------------------------------------------------------


def test_setup_registers_and_classifies_the_contracts_seen_so_far(chain, sim):
    simulator, url = sim
    simulator.produce(40)
    catch_up(runner_for(chain, url))
    set_up("SEP41", "SEP50")
    sep41, sep50 = Protocol.objects.get(protocol_id="SEP41"), Protocol.objects.get(protocol_id="SEP50")
    assert sep41.classification_status == sep50.classification_status == MigrationStatus.SUCCESS
    assert set(ProtocolContract.objects.filter(protocol=sep41).values_list("contract", flat=True)) <= {
        r[7] for r in expected_rows(chain, "SEP41")
    }
    assert ProtocolContract.objects.filter(protocol=sep50).values_list("contract", flat=True).count() >= 1
    assert (
        AuditEvent.objects.filter(action="protocol.classified", target_label__startswith="SEP41 on ").count()
        == 1
    )


def test_a_classification_that_fails_is_recorded_as_failed(chain, sim, monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("classifier exploded")

    monkeypatch.setattr(services, "_classify_contracts", broken)
    with pytest.raises(CommandError, match="classification failed for SEP41"):
        set_up("SEP41")
    protocol = Protocol.objects.get(protocol_id="SEP41")
    assert protocol.classification_status == MigrationStatus.FAILED
    assert "classifier exploded" in protocol.classification_error


# --- the run ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 3])
def test_history_backfills_to_the_tip_and_hands_off_to_live_ingestion_by_itself(chain, sim, workers):
    simulator, url = sim
    simulator.produce(120)
    runner = runner_for(chain, url)
    catch_up(runner)
    set_up("SEP41", "SEP50")
    thread, out = in_thread(
        history_migrate,
        protocol_ids=["SEP50", "SEP41"],
        actor=ACTOR,
        window_size=7,
        workers=workers,
        poll_seconds=0.02,
    )
    run_live_until(runner, simulator, thread)
    assert "error" not in out, out
    result = out["result"]
    assert sorted(result.handed_off) == ["SEP41", "SEP50"]
    for _ in range(3):  # live keeps producing rows after the handoff
        simulator.produce(1)
        catch_up(runner)
    top = indexed(chain)
    for pid in ("SEP41", "SEP50"):
        protocol = Protocol.objects.get(protocol_id=pid)
        assert protocol.history_migration_status == MigrationStatus.SUCCESS
        assert protocol.history_handed_off_at is not None
        spans = assert_spans_tile(pid, oldest=1, top=top)
        assert [s[0] for s in spans] == ["history", "live"]
        assert spans[1][1] == protocol.history_handoff_height
        assert Cursor.objects.get(name=protocol.history_cursor_name).height == top
        assert_rows_match(chain, pid)
    assert AuditEvent.objects.filter(action="protocol.history_completed").count() == 2
    # The run's heartbeat reads "finished" from now on, however long ago it beat: never stale.
    beat = Heartbeat.objects.get(name=f"protocols.history.{chain.slug}")
    later = beat.last_beat_at + timedelta(days=30)
    assert heartbeat_verdict(beat, now=later).status == "finished"


def test_a_rerun_after_success_has_nothing_to_do(chain, sim):
    simulator, url = sim
    simulator.produce(20)
    runner = runner_for(chain, url)
    catch_up(runner)
    set_up("SEP41")
    thread, _ = in_thread(
        history_migrate, protocol_ids=["SEP41"], actor=ACTOR, window_size=50, poll_seconds=0.02
    )
    run_live_until(runner, simulator, thread)
    result = history_migrate(protocol_ids=["SEP41"], actor=ACTOR)
    assert result.skipped == ["SEP41"] and not result.handed_off


def test_a_failed_run_is_marked_failed_and_a_rerun_resumes_at_cursor_plus_one(chain, sim, monkeypatch):
    simulator, url = sim
    simulator.produce(60)
    runner = runner_for(chain, url)
    catch_up(runner)
    set_up("SEP41")
    real = store.copy_state_changes
    calls = {"n": 0}

    def flaky(**kwargs: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(**kwargs)

    monkeypatch.setattr(store, "copy_state_changes", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        history_migrate(protocol_ids=["SEP41"], actor=ACTOR, window_size=10, poll_seconds=0.02)
    protocol = Protocol.objects.get(protocol_id="SEP41")
    assert protocol.history_migration_status == MigrationStatus.FAILED
    assert "disk on fire" in protocol.history_error
    cursor = Cursor.objects.get(name=protocol.history_cursor_name).height
    assert cursor == 20  # two windows of 10 committed, the third rolled back with its CAS
    assert ProtocolStateChange.objects.filter(protocol=protocol, height__gt=cursor).count() == 0
    assert (
        AuditEvent.objects.filter(
            action="protocol.history_failed", target_label__startswith="SEP41 on "
        ).count()
        == 1
    )
    monkeypatch.setattr(store, "copy_state_changes", real)
    thread, out = in_thread(
        history_migrate, protocol_ids=["SEP41"], actor=ACTOR, window_size=10, poll_seconds=0.02
    )
    run_live_until(runner, simulator, thread)
    assert "error" not in out, out
    top = indexed(chain)
    spans = assert_spans_tile("SEP41", oldest=1, top=top)
    assert [s[0] for s in spans] == ["history", "live"]
    assert_rows_match(chain, "SEP41")


def test_a_second_run_of_the_same_protocol_is_refused_while_one_holds_the_lock(chain, sim):
    simulator, url = sim
    simulator.produce(5)
    catch_up(runner_for(chain, url))
    set_up("SEP41")
    protocol = Protocol.objects.select_related("chain").get(protocol_id="SEP41")
    assert history.try_lock("history", protocol)
    try:
        thread, out = in_thread(history_migrate, protocol_ids=["SEP41"], actor=ACTOR)
        thread.join(10)
        assert "already running" in str(out["error"])
    finally:
        history.unlock("history", protocol)


@pytest.mark.parametrize("workers", [1, 3])
def test_a_rollback_between_reading_a_window_and_committing_it_throws_the_window_away(
    chain, sim, monkeypatch, workers
):
    simulator, url = sim
    simulator.produce(30)
    runner = runner_for(chain, url)
    catch_up(runner)
    set_up("SEP41", "SEP50")
    real = store.read_events
    state = {"reorged": False}
    reindexed = threading.Event()

    def read_then_reorg(**kwargs: Any) -> Any:
        events = real(**kwargs)
        if not state["reorged"] and kwargs["high"] >= 25:
            # The chain forks below the window's end while the events are in our hands.
            state["reorged"] = True
            simulator.reorg(8)
            simulator.produce(1)  # the indexer notices the fork at the next block's parent
            catch_up(runner)
            reindexed.set()
        return events

    monkeypatch.setattr(store, "read_events", read_then_reorg)
    retries = WINDOW_RETRIES._value.get()
    thread, out = in_thread(
        history_migrate,
        protocol_ids=["SEP41", "SEP50"],
        actor=ACTOR,
        window_size=10,
        workers=workers,
        poll_seconds=0.02,
    )
    # The runner is driven from the reading thread above until the fork is indexed; then the backfill
    # waits at the tip, and this thread drives the runner.
    deadline = time.monotonic() + 60
    while thread.is_alive() and not reindexed.is_set():
        assert time.monotonic() < deadline, "the backfill never read a window reaching height 25"
        thread.join(0.05)
    monkeypatch.setattr(store, "read_events", real)
    if thread.is_alive():
        run_live_until(runner, simulator, thread)
    assert "error" not in out, out
    assert state["reorged"] and WINDOW_RETRIES._value.get() > retries
    top = indexed(chain)
    for pid in ("SEP41", "SEP50"):
        assert_spans_tile(pid, oldest=1, top=top)
        assert_rows_match(chain, pid)


def test_a_live_rollback_rewinds_the_cursors_and_deletes_the_rows_above_the_fork(chain, sim):
    simulator, url = sim
    simulator.produce(25)
    runner = runner_for(chain, url)
    catch_up(runner)
    set_up("SEP41", "SEP50")
    thread, out = in_thread(
        history_migrate, protocol_ids=["SEP41", "SEP50"], actor=ACTOR, window_size=10, poll_seconds=0.02
    )
    run_live_until(runner, simulator, thread)
    assert "error" not in out, out
    top = indexed(chain)
    simulator.reorg(6)
    simulator.produce(1)
    catch_up(runner)  # detects the fork at the new block, rolls back, re-indexes the new branch
    top += 1
    assert IndexerState.objects.get(chain=chain).last_indexed_height == top
    for pid in ("SEP41", "SEP50"):
        protocol = Protocol.objects.get(protocol_id=pid)
        assert Cursor.objects.get(name=protocol.history_cursor_name).height == top
        spans = assert_spans_tile(pid, oldest=1, top=top)
        assert spans[-1][0] == "live"
        assert_rows_match(chain, pid)


# --- parallel windows -----------------------------------------------------------------------------------


def test_parallel_windows_ready_early_wait_and_commit_in_order(chain, sim, monkeypatch):
    """Window 1 is read last (held until windows 2 and 3 are read and waiting): they still commit
    after it, and every history CAS expects the end of the window before."""
    simulator, url = sim
    simulator.produce(60)
    runner = runner_for(chain, url)
    catch_up(runner)
    set_up("SEP41")
    real_read, real_cas = store.read_events, history.cursor_cas
    lock = threading.Lock()
    read_early: list[int] = []
    later_read = threading.Event()
    cursor_when_read: dict[int, int | None] = {}
    swaps: list[tuple[int, int]] = []

    def gated_read(**kwargs: Any) -> Any:
        events = real_read(**kwargs)
        low = kwargs["low"]
        if low == 1 and not later_read.is_set():
            assert later_read.wait(20), "windows 2 and 3 were not read while window 1 was held"
        elif low in (11, 21):
            with lock:
                read_early.append(low)
                cursor_when_read[low] = Cursor.objects.values_list("height", flat=True).get(
                    name="protocol_sim_SEP41_history_cursor"
                )
                if len(read_early) == 2:
                    later_read.set()
        return events

    def recording_cas(**kwargs: Any) -> Any:
        result = real_cas(**kwargs)
        if result is history.CasResult.SWAPPED:
            with lock:
                swaps.append((kwargs["expected"], kwargs["new"]))
        return result

    monkeypatch.setattr(store, "read_events", gated_read)
    monkeypatch.setattr(history, "cursor_cas", recording_cas)
    thread, out = in_thread(
        history_migrate, protocol_ids=["SEP41"], actor=ACTOR, window_size=10, workers=3, poll_seconds=0.02
    )
    run_live_until(runner, simulator, thread)
    assert "error" not in out, out
    assert sorted(read_early) == [11, 21]
    assert cursor_when_read == {11: 0, 21: 0}  # ready before window 1 was committed
    assert swaps[:3] == [(0, 10), (10, 20), (20, 30)]
    for (_, end), (expected, _) in itertools.pairwise(swaps):
        assert expected == end, f"the cursor moved out of order: {swaps}"
    top = indexed(chain)
    assert [s[0] for s in assert_spans_tile("SEP41", oldest=1, top=top)] == ["history", "live"]
    assert_rows_match(chain, "SEP41")


def test_a_failing_parallel_window_commits_nothing_after_it_and_a_rerun_resumes(chain, sim, monkeypatch):
    simulator, url = sim
    simulator.produce(80)
    runner = runner_for(chain, url)
    catch_up(runner)
    set_up("SEP41")
    real = store.copy_state_changes
    calls = {"n": 0}

    def flaky(**kwargs: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(**kwargs)

    monkeypatch.setattr(store, "copy_state_changes", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        history_migrate(protocol_ids=["SEP41"], actor=ACTOR, window_size=10, workers=4, poll_seconds=0.02)
    protocol = Protocol.objects.select_related("chain").get(protocol_id="SEP41")
    assert protocol.history_migration_status == MigrationStatus.FAILED
    # Windows 1 and 2 committed; 3 failed and rolled back; 4 and later were read but never committed.
    assert Cursor.objects.get(name=protocol.history_cursor_name).height == 20
    assert not ProtocolStateChange.objects.filter(protocol=protocol, height__gt=20).exists()
    monkeypatch.setattr(store, "copy_state_changes", real)
    thread, out = in_thread(
        history_migrate, protocol_ids=["SEP41"], actor=ACTOR, window_size=10, workers=4, poll_seconds=0.02
    )
    run_live_until(runner, simulator, thread)
    assert "error" not in out, out
    spans = assert_spans_tile("SEP41", oldest=1, top=indexed(chain))
    assert [s[0] for s in spans] == ["history", "live"]
    assert_rows_match(chain, "SEP41")


def test_workers_out_of_range_are_refused(chain, sim):
    with pytest.raises(CommandError, match="workers must be between 1 and 16"):
        call_command("protocol_migrate", "history", "--protocol-id", "SEP41", "--workers", "0")


# --- current state ---------------------------------------------------------------------------------------


def test_current_state_builds_balances_and_owners_in_order_and_follows_live_and_rollbacks(chain, sim):
    simulator, url = sim
    simulator.produce(60)
    runner = runner_for(chain, url)
    catch_up(runner)
    set_up("SEP41", "SEP50")
    for pid in ("SEP41", "SEP50"):
        thread, out = in_thread(
            current_state_migrate,
            protocol_id=pid,
            start_height=1,
            actor=ACTOR,
            window_size=9,
            poll_seconds=0.02,
        )
        run_live_until(runner, simulator, thread)
        assert "error" not in out, out
        assert Protocol.objects.get(protocol_id=pid).current_state_migration_status == MigrationStatus.SUCCESS
    simulator.reorg(5)
    for _ in range(3):
        simulator.produce(1)
        catch_up(runner)
    balances = {
        (b.asset, b.account): b.amount for b in ProtocolBalance.objects.filter(protocol__protocol_id="SEP41")
    }
    expected = expected_balances(chain)
    assert {k: v for k, v in balances.items() if v} == {k: v for k, v in expected.items() if v}
    owners = {
        (o.asset, o.token_id): o.owner for o in ProtocolNftOwner.objects.filter(protocol__protocol_id="SEP50")
    }
    assert owners == expected_owners(chain)
    assert all(v >= 0 for v in balances.values())  # from height 1 the balances are real balances


def test_current_state_refuses_a_start_height_outside_the_indexed_range(chain, sim):
    simulator, url = sim
    simulator.produce(5)
    catch_up(runner_for(chain, url))
    set_up("SEP41")
    with pytest.raises(CommandError, match="start height must be between the oldest indexed height 1"):
        call_command("protocol_migrate", "current-state", "--protocol-id", "SEP41", "--start-height", "99")
    assert not Cursor.objects.exists()
