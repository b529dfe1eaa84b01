"""The sync-source status machine and its persisted health, against two real chain simulators on
loopback (two sources of one chain) and real PostgreSQL. The client's monotonic clock is a fake we
move past backoffs; the wall clock is fleetops.lib.clock, frozen and moved the same way."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from prometheus_client import REGISTRY

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.lib.errors import ValidationFailed
from indexer import sources as sources_module
from indexer.models import (
    CONNECTION_MACHINE,
    Chain,
    ConnectionStatus,
    DegradedReason,
    IndexerState,
    SourceHealth,
    SyncSource,
)
from indexer.rpc.client import CometRpc, HeightUnavailable, SourceConfig
from indexer.runner import trusted_sources
from indexer.source_status import NOTHING_TO_CLEAR, source_clear_degraded, source_transition, transition_path
from indexer.sources import (
    WS_DOWN_NOTE,
    source_range_failed,
    sources_ensure_rows,
    sources_mark_syncing,
    sources_observe,
    sources_release,
)
from simulators.chain.server import serve_in_thread

S = ConnectionStatus
H = DegradedReason
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DASH = "\u2013"


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Node:
    def __init__(self) -> None:
        self.server, self.sim, self.url = serve_in_thread()

    def knobs(self, **values: object) -> None:
        httpx.post(f"{self.url}/control/knobs", json=values).raise_for_status()

    def produce(self, blocks: int) -> None:
        httpx.post(f"{self.url}/control/produce", json={"blocks": blocks}).raise_for_status()


@pytest.fixture
def nodes():
    pair = [Node(), Node()]
    yield pair
    for node in pair:
        node.server.shutdown()


@pytest.fixture
def now():
    with clock.frozen(T0):
        yield


def _forget() -> None:
    for memory in (
        sources_module._losses,
        sources_module._await_status,
        sources_module._settling,
        sources_module._sync_settling,
    ):
        memory.clear()


@pytest.fixture(autouse=True)
def _forget_losses():
    _forget()
    yield
    _forget()


@pytest.fixture
def chain(db, org):
    chain = Chain.objects.create(org=org, slug="sim", chain_id="fleetops-sim-1")
    IndexerState.objects.create(chain=chain)
    return chain


@pytest.fixture
def rows(chain, nodes):
    primary = SyncSource.objects.create(
        chain=chain,
        name="primary",
        rpc_url=nodes[0].url,
        websocket_url=nodes[0].url.replace("http", "ws") + "/websocket",
        priority=1,
    )
    backup = SyncSource.objects.create(chain=chain, name="backup", rpc_url=nodes[1].url, priority=2)
    return primary, backup


@pytest.fixture
def mono():
    return FakeMonotonic()


@pytest.fixture
def rpc(rows, mono):
    client = CometRpc(
        [SourceConfig(r.name, r.rpc_url, r.priority) for r in rows], clock=mono, sleep=mono.sleep, attempts=1
    )
    yield client
    client.close()


def row(name: str) -> SyncSource:
    return SyncSource.objects.get(name=name)


def transitions(to: str, source: str = "primary", result: str = "changed") -> float:
    value = REGISTRY.get_sample_value(
        "fleetops_indexer_source_transitions_total",
        {"chain": "sim", "source": source, "to": to, "result": result},
    )
    return value or 0.0


def attempts(result: str, source: str = "primary") -> float:
    value = REGISTRY.get_sample_value(
        "fleetops_indexer_source_connection_attempts_total",
        {"chain": "sim", "source": source, "result": result},
    )
    return value or 0.0


def connect(chain, rpc, mono, ws_connected: bool | None = True) -> None:
    """Two observations with a fresh /status each: the settle re-check before connected."""
    for _ in range(2):
        sources_observe(chain=chain, rpc=rpc, ws_connected=ws_connected)
        mono.now += 6  # past the probe interval


def fail_until_disconnected(chain, rpc, mono, node: Node) -> None:
    node.knobs(error_rate=1.0)
    for _ in range(10):
        mono.now += 3700  # past any backoff
        sources_observe(chain=chain, rpc=rpc, ws_connected=None)
        if row("primary").connection_status == S.DISCONNECTED:
            return
    raise AssertionError("the failing source never went disconnected")


def recover(chain, rpc, mono, node: Node) -> None:
    node.knobs(error_rate=0.0)
    for _ in range(2):  # the settle re-check: caught up on two /status answers in a row
        mono.now += 3700
        sources_observe(chain=chain, rpc=rpc, ws_connected=None)


# --- the machine ----------------------------------------------------------------------------------


def test_jumps_walk_the_shortest_legal_path_and_never_pass_syncing_unless_asked():
    assert transition_path(S.DISCONNECTED, S.CONNECTED) == [S.CONNECTING, S.CONNECTED]
    assert transition_path(S.DISCONNECTED, S.CONNECTED_DEGRADED) == [
        S.CONNECTING,
        S.CONNECTED,
        S.CONNECTED_DEGRADED,
    ]
    # A lost connection drops straight to disconnected; disconnecting is for intentional disconnects.
    assert transition_path(S.CONNECTED, S.DISCONNECTED) == [S.DISCONNECTED]
    assert transition_path(S.SYNCING, S.DISCONNECTED) == [S.DISCONNECTED]
    assert transition_path(S.DISCONNECTED, S.REFUSED) == [S.REFUSED]
    assert transition_path(S.REFUSED, S.CONNECTED) == [S.DISCONNECTED, S.CONNECTING, S.CONNECTED]
    assert transition_path(S.DISCONNECTED, S.SYNCING) == [S.CONNECTING, S.SYNCING]
    assert transition_path(S.CONNECTED, S.CONNECTED) == []


def test_a_source_that_answers_goes_connecting_then_connected_after_a_settle_recheck(
    chain, rows, rpc, mono, now
):
    before = transitions("connecting"), transitions("connected"), attempts("success")
    sources_observe(chain=chain, rpc=rpc, ws_connected=True)
    # Caught up once is not yet caught up: it stays connecting until a second /status agrees.
    assert row("primary").connection_status == row("backup").connection_status == S.CONNECTING
    assert attempts("success") == before[2] + 1
    sources_observe(chain=chain, rpc=rpc, ws_connected=True)  # no new /status: still one check
    assert row("primary").connection_status == S.CONNECTING
    mono.now += 6
    sources_observe(chain=chain, rpc=rpc, ws_connected=True)
    primary, backup = row("primary"), row("backup")
    assert primary.connection_status == backup.connection_status == S.CONNECTED
    assert (transitions("connecting") - before[0], transitions("connected") - before[1]) == (1, 1)
    assert attempts("success") == before[2] + 1  # one attempt, counted once
    assert primary.status_changed_at == T0 and primary.last_success_at == T0
    assert primary.head_height == 1 and primary.latency_ms is not None
    assert primary.health == SourceHealth.HEALTHY
    assert primary.degraded_reasons == [] and primary.degraded_detail == ""


def test_a_transition_sets_reasons_and_an_illegal_from_state_is_a_lost_race(chain, rows, now):
    primary = rows[0]
    assert source_transition(source=primary, to=S.CONNECTED_DEGRADED, reasons=[H.LATENCY], detail="slow")
    stored = row("primary")
    assert (stored.connection_status, stored.degraded_reasons, stored.degraded_detail) == (
        S.CONNECTED_DEGRADED,
        ["latency"],
        "slow",
    )
    stale = row("primary")
    SyncSource.objects.filter(pk=stale.pk).update(connection_status=S.DISCONNECTING)
    # The stale instance believes connected_degraded: connected is not reachable from disconnecting.
    assert source_transition(source=stale, to=S.CONNECTED) is False
    assert row("primary").connection_status == S.DISCONNECTING


@pytest.mark.django_db(transaction=True)
def test_two_writers_racing_one_transition_exactly_one_wins(org):
    chain = Chain.objects.create(org=org, slug="sim", chain_id="fleetops-sim-1")
    source = SyncSource.objects.create(chain=chain, name="primary", rpc_url="http://127.0.0.1:1")
    # The kernel counts a lost race once, under the machine's name and the target state.
    labels = {"operation": f"{CONNECTION_MACHINE.name}>{S.CONNECTING.value}"}
    race_lost_before = REGISTRY.get_sample_value("fleetops_platform_race_lost_total", labels) or 0
    results: list[bool] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def writer() -> None:
        try:
            mine = SyncSource.objects.get(pk=source.pk)  # each thread: its own connection and instance
            barrier.wait()
            results.append(source_transition(source=mine, to=S.CONNECTING))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(results) == [False, True]
    assert SyncSource.objects.get(pk=source.pk).connection_status == S.CONNECTING
    race_lost_after = REGISTRY.get_sample_value("fleetops_platform_race_lost_total", labels)
    assert race_lost_after == race_lost_before + 1


# --- degraded reasons -----------------------------------------------------------------------------


def test_a_pruned_source_serves_live_blocks_but_is_degraded_with_the_range_it_lacks(
    chain, rows, rpc, nodes, mono, now
):
    for node in nodes:
        node.produce(249)
    nodes[0].knobs(pruned_below=200)
    connect(chain, rpc, mono)
    assert rpc.block(5).height == 5  # the backup served it
    assert rpc.block(6).height == 6
    assert rpc.block(240).height == 240  # the primary serves what it has
    sources_observe(chain=chain, rpc=rpc, ws_connected=True)
    primary = row("primary")
    assert primary.connection_status == S.CONNECTED_DEGRADED
    assert primary.degraded_reasons == [H.HISTORIC_RANGE_FAILED]
    assert primary.degraded_detail == f"blocks 5{DASH}6 unavailable (pruned below 200)"
    assert primary.health == SourceHealth.HEALTHY  # it answers: its connection is fine, its data is partial
    assert row("backup").connection_status == S.CONNECTED

    # Sticky: later observations keep it while the source still lacks the range.
    mono.now += 10
    sources_observe(chain=chain, rpc=rpc, ws_connected=True)
    assert row("primary").degraded_reasons == [H.HISTORIC_RANGE_FAILED]

    # The history is back (restored node): the next /status shows it and the reason goes.
    nodes[0].knobs(pruned_below=0)
    mono.now += 10
    sources_observe(chain=chain, rpc=rpc, ws_connected=True)
    primary = row("primary")
    assert (primary.connection_status, primary.degraded_reasons, primary.degraded_detail) == (
        S.CONNECTED,
        [],
        "",
    )


def test_when_no_source_has_a_height_the_error_names_them(chain, rows, rpc, nodes):
    for node in nodes:
        node.produce(20)
        node.knobs(pruned_below=10)
    with pytest.raises(HeightUnavailable) as raised:
        rpc.block(3)
    assert set(raised.value.sources) == {"primary", "backup"} and raised.value.lowest == 10


def test_source_range_failed_reads_as_partial_data_and_merges_consecutive_batches(chain, rows, now):
    source_transition(source=rows[0], to=S.CONNECTED)
    error = "height 1 is not available, lowest height is 200"
    source_range_failed(chain=chain, source_name="primary", first=1, last=199, error=error)
    primary = row("primary")
    assert primary.connection_status == S.CONNECTED_DEGRADED
    assert primary.get_connection_status_display() == "connected (degraded)"
    assert primary.degraded_reasons == ["historic_range_failed"]
    assert primary.degraded_detail == f"blocks 1{DASH}199 unavailable (pruned below 200)"

    source_range_failed(chain=chain, source_name="backup", first=1, last=50, error="block not found")
    source_range_failed(chain=chain, source_name="backup", first=51, last=100, error="block not found")
    backup = row("backup")
    # It never was connected: it answered, so it walks up to connected_degraded.
    assert backup.connection_status == S.CONNECTED_DEGRADED
    assert backup.degraded_detail == f"blocks 1{DASH}100 unavailable (block not found)"
    assert source_range_failed(chain=chain, source_name="nope", first=1, last=2, error="x") is None


def test_a_height_above_the_head_is_not_a_historic_failure(chain, rows, now):
    error = "height 30 must be less than or equal to the current blockchain height 29"
    assert source_range_failed(chain=chain, source_name="primary", first=30, last=30, error=error) is None
    assert row("primary").degraded_reasons == []


def test_an_operator_clears_a_historic_failure_with_a_reason_and_an_audit_row(chain, rows, admin_member, now):
    source_range_failed(chain=chain, source_name="primary", first=1, last=9, error="lowest height is 10")
    primary = row("primary")
    with pytest.raises(ValidationFailed, match="reason is required"):
        source_clear_degraded(source=primary, actor=Actor.for_user(admin_member.user), reason=" ")
    assert source_clear_degraded(
        source=primary, actor=Actor.for_user(admin_member.user), reason="archive node not needed"
    )
    stored = row("primary")
    assert (stored.connection_status, stored.degraded_reasons, stored.degraded_detail) == (
        S.CONNECTED,
        [],
        "",
    )
    event = AuditEvent.objects.get(action="indexer.source.clear_degraded")
    assert event.reason == "archive node not needed" and event.target_id == str(primary.pk)
    with pytest.raises(ValidationFailed, match=NOTHING_TO_CLEAR):
        source_clear_degraded(source=stored, actor=Actor.for_user(admin_member.user), reason="again")


def test_a_source_whose_head_lags_is_not_caught_up_and_ranked_last_until_it_catches_up(
    chain, rows, rpc, nodes, mono, now
):
    nodes[1].produce(25)  # the preferred source is the one behind
    connect(chain, rpc, mono)
    primary = row("primary")
    # Lagging is a health reason, not partial data: never connected_degraded; and a lagging source is
    # not caught up, so it does not settle to connected.
    assert primary.connection_status == S.CONNECTING
    assert primary.degraded_reasons == [H.LAGGING_HEAD]
    assert primary.degraded_detail == "head 1 is 25 blocks behind 26"
    assert primary.health == SourceHealth.DEGRADED
    assert row("backup").connection_status == S.CONNECTED
    assert [s.config.name for s in rpc.ranked_sources()] == ["backup", "primary"]
    assert trusted_sources(rpc) == ["backup"]
    assert rpc.status().latest_height == 26  # ingest fails over from the lagging source

    nodes[0].produce(20)  # 5 behind: within the allowed lag
    connect(chain, rpc, mono)
    primary = row("primary")
    assert (primary.connection_status, primary.degraded_reasons) == (S.CONNECTED, [])
    assert primary.head_height == 21 and primary.health == SourceHealth.HEALTHY
    assert [s.config.name for s in rpc.ranked_sources()] == ["primary", "backup"]


def test_a_slow_source_is_degraded_for_latency(chain, rows, nodes, now):
    nodes[1].knobs(latency_ms=60)
    with CometRpc([SourceConfig(r.name, r.rpc_url, r.priority) for r in rows]) as rpc:  # real latency
        sources_observe(chain=chain, rpc=rpc, ws_connected=True, latency_threshold=0.03)
    backup = row("backup")
    assert backup.connection_status != S.CONNECTED_DEGRADED  # slow is a health reason, not partial data
    assert backup.degraded_reasons == [H.LATENCY] and backup.health == SourceHealth.DEGRADED
    assert backup.degraded_detail.startswith("latency ") and (backup.latency_ms or 0) >= 60
    assert row("primary").degraded_reasons == [] and row("primary").health == SourceHealth.HEALTHY


def test_a_source_with_many_failed_requests_is_degraded_for_its_error_rate(
    chain, rows, rpc, nodes, mono, now
):
    sources_observe(chain=chain, rpc=rpc, ws_connected=None)
    nodes[1].knobs(error_rate=0.5)
    for _ in range(30):
        mono.now += 3700
        rpc.probe_heads()
    nodes[1].knobs(error_rate=0.0)
    mono.now += 3700
    sources_observe(chain=chain, rpc=rpc, ws_connected=None)
    backup = row("backup")
    assert backup.connection_status == S.CONNECTED  # a health reason: status 4 is partial data only
    assert backup.degraded_reasons == [H.ERROR_RATE] and backup.health == SourceHealth.DEGRADED
    assert "of the last" in backup.degraded_detail


def test_a_rate_limited_source_shows_rate_limited_health(chain, rows, rpc, nodes, mono, now):
    connect(chain, rpc, mono)
    nodes[0].knobs(rate_limit=1.0)
    assert rpc.block(1).height == 1  # the backup answered
    sources_observe(chain=chain, rpc=rpc, ws_connected=True, probe=False)
    primary = row("primary")
    assert primary.health == SourceHealth.RATE_LIMITED
    assert primary.rate_limited_until == T0 + timedelta(seconds=1)  # the simulator's Retry-After
    assert primary.consecutive_failures == 0 and "429" in primary.last_error
    assert primary.connection_status == S.CONNECTED  # it answers, just not now
    assert row("backup").health == SourceHealth.HEALTHY
    clock.advance(timedelta(seconds=2))
    assert row("primary").health == SourceHealth.HEALTHY


def test_a_failing_source_degrades_disconnects_and_is_dead_after_a_day(chain, rows, rpc, nodes, mono, now):
    connect(chain, rpc, mono)
    nodes[0].knobs(error_rate=1.0)
    clock.advance(timedelta(seconds=1))
    first_failure = clock.now()
    assert rpc.status().latest_height == 1  # failed over to the backup
    sources_observe(chain=chain, rpc=rpc, ws_connected=None, probe=False)
    primary = row("primary")
    assert primary.connection_status == S.CONNECTED  # failing is a health reason until it is lost
    assert primary.degraded_reasons == [H.ERROR_RATE]
    assert primary.health == SourceHealth.DEGRADED
    assert primary.consecutive_failures == 1 and primary.first_failure_at == first_failure
    assert primary.next_retry_at == first_failure + timedelta(seconds=5)  # backoff 5 s, doubling

    disconnecting_before = transitions("disconnecting")
    fail_until_disconnected(chain, rpc, mono, nodes[0])
    primary = row("primary")
    assert primary.connection_status == S.DISCONNECTED
    # A lost connection is no intentional disconnect: it never passes disconnecting (seed 002).
    assert transitions("disconnecting") == disconnecting_before
    assert primary.consecutive_failures >= 3 and primary.first_failure_at == first_failure
    assert primary.health == SourceHealth.DEGRADED

    clock.advance(timedelta(hours=24))
    sources_observe(chain=chain, rpc=rpc, ws_connected=None, probe=False)
    primary = row("primary")
    assert primary.first_failure_at == first_failure  # not moved by the clock
    assert primary.health == SourceHealth.DEAD
    assert row("backup").health == SourceHealth.HEALTHY


def test_a_recovered_source_is_degraded_for_five_minutes_then_healthy(chain, rows, rpc, nodes, mono, now):
    connect(chain, rpc, mono)
    fail_until_disconnected(chain, rpc, mono, nodes[0])
    clock.advance(timedelta(minutes=1))
    recovered = clock.now()
    failures_before = attempts("failure")
    recover(chain, rpc, mono, nodes[0])
    primary = row("primary")
    assert primary.connection_status == S.CONNECTED
    assert primary.consecutive_failures == 0 and primary.first_failure_at is None
    assert primary.recovered_at == recovered and primary.last_success_at == recovered
    assert primary.health == SourceHealth.DEGRADED
    assert attempts("failure") == failures_before  # the reconnect attempt succeeded
    clock.advance(timedelta(minutes=4, seconds=59))
    assert row("primary").health == SourceHealth.DEGRADED
    clock.advance(timedelta(seconds=1))
    assert row("primary").health == SourceHealth.HEALTHY


def test_a_source_that_keeps_dropping_is_flapping(chain, rows, rpc, nodes, mono, now):
    connect(chain, rpc, mono)
    for _ in range(2):
        fail_until_disconnected(chain, rpc, mono, nodes[0])
        recover(chain, rpc, mono, nodes[0])
    assert H.FLAPPING not in row("primary").degraded_reasons  # two drops: not yet flapping
    fail_until_disconnected(chain, rpc, mono, nodes[0])
    recover(chain, rpc, mono, nodes[0])
    primary = row("primary")
    assert primary.connection_status == S.CONNECTED and primary.health == SourceHealth.DEGRADED
    # Its recent requests failed a lot too; the error rate fades as it keeps answering.
    assert primary.degraded_reasons == [H.ERROR_RATE, H.FLAPPING]
    assert "dropped 3 times in 10 min" in primary.degraded_detail
    clock.advance(timedelta(minutes=11))
    for _ in range(50):
        mono.now += 10
        rpc.probe_heads()
    sources_observe(chain=chain, rpc=rpc, ws_connected=None)
    assert row("primary").connection_status == S.CONNECTED


def test_a_down_websocket_is_noted_on_its_source_without_degrading_it(chain, rows, rpc, mono, now):
    connect(chain, rpc, mono, ws_connected=False)
    primary = row("primary")
    assert primary.connection_status == S.CONNECTED and primary.degraded_detail == WS_DOWN_NOTE
    assert row("backup").degraded_detail == ""
    sources_observe(chain=chain, rpc=rpc, ws_connected=True)
    assert row("primary").degraded_detail == ""


# --- syncing, disabling, restarts -----------------------------------------------------------------


def test_the_source_the_indexer_catches_up_from_is_syncing_until_caught_up(chain, rows, rpc, now):
    sources_observe(chain=chain, rpc=rpc, ws_connected=True)
    assert sources_mark_syncing(chain=chain, catching_up=True).name == "primary"
    assert row("primary").connection_status == S.SYNCING
    with CaptureQueriesContext(connection) as idle:
        sources_mark_syncing(chain=chain, catching_up=True)
    assert not [q for q in idle.captured_queries if q["sql"].startswith("UPDATE")]

    # A range it failed to serve while syncing shows once the sync completes (seed 002).
    source_range_failed(chain=chain, source_name="primary", first=1, last=1, error="lowest height is 2")
    assert row("primary").connection_status == S.SYNCING
    sources_observe(chain=chain, rpc=rpc, ws_connected=True)
    assert row("primary").connection_status == S.SYNCING  # observing does not end a sync

    # The runner fails over: the backup syncs, the primary shows its partial data.
    assert sources_mark_syncing(chain=chain, catching_up=True, source_name="backup").name == "backup"
    assert row("primary").connection_status == S.CONNECTED_DEGRADED
    # The settle re-check: caught up on one step, it is still syncing; on the second, connected.
    assert sources_mark_syncing(chain=chain, catching_up=False).name == "backup"
    assert row("backup").connection_status == S.SYNCING
    assert sources_mark_syncing(chain=chain, catching_up=False) is None
    assert row("backup").connection_status == S.CONNECTED


def test_a_disabled_source_goes_disconnecting_then_disconnected(chain, rows, rpc, mono, now):
    connect(chain, rpc, mono, ws_connected=None)
    SyncSource.objects.filter(name="backup").update(enabled=False)
    before = transitions("disconnecting", source="backup")
    sources_observe(chain=chain, rpc=rpc, ws_connected=None)
    assert row("backup").connection_status == S.DISCONNECTED
    assert transitions("disconnecting", source="backup") == before + 1
    assert row("primary").connection_status == S.CONNECTED


def test_stopping_releases_every_source(chain, rows, rpc, now):
    sources_observe(chain=chain, rpc=rpc, ws_connected=None)
    assert sources_release(chain=chain) == 2
    assert set(SyncSource.objects.values_list("connection_status", flat=True)) == {S.DISCONNECTED}


def test_a_restart_continues_the_failure_streak_so_dead_still_means_a_day(chain, rows, nodes, mono, now):
    started = T0 - timedelta(hours=23)
    SyncSource.objects.filter(name="primary").update(consecutive_failures=7, first_failure_at=started)
    nodes[0].knobs(error_rate=1.0)
    fresh = CometRpc(
        [SourceConfig(r.name, r.rpc_url, r.priority) for r in rows], clock=mono, sleep=mono.sleep, attempts=1
    )
    try:
        sources_ensure_rows(chain=chain, rpc=fresh)
        assert fresh.health()["primary"].consecutive_failures == 7
        assert fresh.health()["primary"].next_retry_at > mono.now  # the backoff goes on too
        mono.now += 3700
        sources_observe(chain=chain, rpc=fresh, ws_connected=None)
        primary = row("primary")
        assert primary.consecutive_failures == 8 and primary.first_failure_at == started
        clock.advance(timedelta(hours=1))
        assert row("primary").health == SourceHealth.DEAD
    finally:
        fresh.close()


def test_observing_is_one_locked_read_and_one_bulk_write_when_nothing_changes(chain, rows, rpc, now):
    sources_observe(chain=chain, rpc=rpc, ws_connected=True)
    with CaptureQueriesContext(connection) as ctx:
        sources_observe(chain=chain, rpc=rpc, ws_connected=True)
    statements = [q["sql"] for q in ctx.captured_queries if "SAVEPOINT" not in q["sql"]]
    assert len(statements) == 2
    assert statements[0].startswith("SELECT") and "FOR UPDATE" in statements[0]
    assert statements[1].startswith("UPDATE")
