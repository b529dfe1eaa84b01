"""The ingest loop against the chain simulator on loopback, on real PostgreSQL: catch-up and tip
commits, reorgs within and beyond the finality depth, the false-reorg guard, halt vs stall, poison
heights, operator rollback requests, identity checks and malformed responses."""

from __future__ import annotations

import itertools
import json
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.observability.leases import lease_acquire
from fleetops.observability.models import Lease
from indexer import runner as runner_module
from indexer import services
from indexer.blocks import lease_name
from indexer.models import Block, Chain, Event, IndexerState, Mode, SyncSource, Transaction
from indexer.rpc.client import CometRpc, SourceConfig
from indexer.runner import IndexerRunner
from indexer.verify import digests_stored, range_checksum
from simulators.chain.server import serve_in_thread
from tests.indexer.mode_trail import assert_mode_trail_replays

pytestmark = pytest.mark.django_db(transaction=True)


def control(url: str, what: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(f"{url}/control/{what}", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def sim() -> Iterator[tuple[Any, str]]:
    server, simulator, url = serve_in_thread(seed=7)
    try:
        yield simulator, url
    finally:
        server.shutdown()


@pytest.fixture
def chain(org, sim) -> Chain:
    _, url = sim
    chain = Chain.objects.create(
        org=org, slug="sim", chain_id="fleetops-sim-1", catchup_batch_size=10, finality_depth=16,
        expected_block_time_seconds=1.0,
    )  # fmt: skip
    IndexerState.objects.create(chain=chain)
    SyncSource.objects.create(chain=chain, name="primary", rpc_url=url, priority=1)
    return chain


def runner_for(chain: Chain, url: str, holder: str = "test-writer", **kwargs: Any) -> IndexerRunner:
    rpc = CometRpc([SourceConfig("primary", url, 1)], attempts=1, retry_base=0.01)
    return IndexerRunner(chain, rpc, holder=holder, **kwargs)


def run_until_caught_up(runner: IndexerRunner, steps: int = 200) -> None:
    for _ in range(steps):
        result = runner.step()
        if result.mode == Mode.HALTED:
            return
        if (
            result.committed == 0
            and result.mode in (Mode.NORMAL, Mode.IDLE)
            and result.indexed == result.head
        ):
            return
    raise AssertionError("did not catch up")


def produce(url: str, blocks: int) -> int:
    """Produce blocks; returns the new head."""
    control(url, "produce", {"blocks": blocks})
    return int(control(url, "state", {})["head"])


def state(chain: Chain) -> IndexerState:
    return IndexerState.objects.get(chain=chain)


def test_it_catches_up_in_batches_then_commits_one_block_per_step_at_the_tip(chain, sim):
    _, url = sim
    head = produce(url, 35)
    runner = runner_for(chain, url)
    first = runner.step()
    assert (first.committed, first.mode) == (10, Mode.CATCHING_UP)
    run_until_caught_up(runner)
    assert state(chain).last_indexed_height == head
    assert Block.objects.filter(chain=chain).count() == head
    produce(url, 1)
    tip = runner.step()
    assert (tip.committed, tip.indexed, tip.mode) == (1, head + 1, Mode.NORMAL)
    chain.refresh_from_db()
    assert chain.fingerprint == Block.objects.get(chain=chain, height=1).hash


def test_a_catch_up_ends_with_the_heights_left_below_the_target_in_one_transaction(chain, sim):
    _, url = sim
    head = produce(url, 23)  # 24 heights: two batches of 10, then the 4 left in one
    runner = runner_for(chain, url, stop_at=head)
    steps = [runner.step() for _ in range(3)]
    assert [(s.committed, s.indexed) for s in steps] == [(10, 10), (10, 20), (4, head)]
    assert steps[-1].mode == Mode.NORMAL
    # A few heights behind without a catch-up before them: one block per transaction, as at the tip.
    produce(url, 3)
    runner = runner_for(chain, url)
    assert [runner.step().committed for _ in range(3)] == [1, 1, 1]


@pytest.mark.parametrize("depth", [1, 10])
def test_a_reorg_within_the_finality_depth_is_rolled_back_and_reingested(chain, sim, depth):
    _simulator, url = sim
    head = produce(url, 30)
    runner = runner_for(chain, url)
    run_until_caught_up(runner)
    before = Block.objects.get(chain=chain, height=head).hash
    control(url, "reorg", {"depth": depth})
    produce(url, 1)
    run_until_caught_up(runner)
    assert state(chain).last_indexed_height == head + 1
    assert Block.objects.get(chain=chain, height=head).hash != before
    # The stored chain now equals a fresh index of the new branch.
    hashes = list(Block.objects.filter(chain=chain).order_by("height").values_list("hash", "parent_hash"))
    assert all(child[1] == parent[0] for parent, child in itertools.pairwise(hashes))
    audit = AuditEvent.objects.get(action="indexer.rolled_back")
    assert audit.metadata["depth"] == depth


def test_a_reorg_deeper_than_the_finality_depth_halts_and_writes_nothing(chain, sim):
    _, url = sim
    head = produce(url, 40)
    runner = runner_for(chain, url)
    run_until_caught_up(runner)
    rows = (Block.objects.count(), Transaction.objects.count(), Event.objects.count())
    control(url, "reorg", {"depth": 20})  # finality depth is 16
    produce(url, 1)
    result = runner.step()
    assert result.mode == Mode.HALTED
    assert "finality" in state(chain).last_error
    assert (Block.objects.count(), Transaction.objects.count(), Event.objects.count()) == rows
    assert runner.step().committed == 0  # halted stays halted
    assert state(chain).last_indexed_height == head
    # The way out is an operator's rollback below the fork point: the writer re-ingests the branch.
    IndexerState.objects.filter(chain=chain).update(
        rollback_requested_to=head - 25, rollback_requested_reason="deep reorg", rollback_requested_by="ada"
    )
    run_until_caught_up(runner)
    assert (state(chain).mode, state(chain).last_indexed_height) == (Mode.NORMAL, head + 1)
    hashes = list(Block.objects.filter(chain=chain).order_by("height").values_list("hash", "parent_hash"))
    assert all(child[1] == parent[0] for parent, child in itertools.pairwise(hashes))


def test_a_source_that_is_catching_up_is_not_trusted_for_a_rollback(chain, sim):
    _simulator, url = sim
    head = produce(url, 20)
    runner = runner_for(chain, url)
    run_until_caught_up(runner)
    control(url, "reorg", {"depth": 2})
    control(url, "produce", {"blocks": 1})
    control(url, "knobs", {"catching_up": True})  # its /status says it is still syncing
    runner._status_at = 0.0  # force a fresh /status on this step
    result = runner.step()
    assert result.mode == Mode.HALTED
    assert "false-reorg guard" in state(chain).last_error
    assert not AuditEvent.objects.filter(action="indexer.rolled_back").exists()
    assert state(chain).last_indexed_height == head


def test_a_halted_chain_makes_the_indexer_idle_and_it_resumes_by_itself(chain, sim):
    _, url = sim
    control(url, "produce", {"blocks": 5})
    runner = runner_for(chain, url)
    run_until_caught_up(runner)
    assert runner.step().mode == Mode.NORMAL
    control(url, "halt", {"halted": True})
    with clock.frozen(clock.now() + timedelta(seconds=30)):
        assert runner.step().mode == Mode.IDLE
    assert state(chain).mode == Mode.IDLE
    control(url, "halt", {"halted": False})
    control(url, "produce", {"blocks": 1})
    result = runner.step()
    assert (result.committed, result.mode) == (1, Mode.NORMAL)


def test_a_chain_id_mismatch_halts_before_any_write(org, sim):
    _, url = sim
    control(url, "produce", {"blocks": 3})
    chain = Chain.objects.create(org=org, slug="wrong", chain_id="someone-else-1")
    IndexerState.objects.create(chain=chain)
    result = runner_for(chain, url).step()
    assert result.mode == Mode.HALTED
    assert "expected 'someone-else-1'" in state(chain).last_error
    assert not Block.objects.filter(chain=chain).exists()


def test_a_fingerprint_mismatch_halts(chain, sim):
    _, url = sim
    control(url, "produce", {"blocks": 3})
    first = runner_for(chain, url)
    run_until_caught_up(first)
    first.release()
    Chain.objects.filter(pk=chain.pk).update(fingerprint="F" * 64)
    result = runner_for(chain, url, holder="second").step()
    assert result.mode == Mode.HALTED
    assert "fingerprint" in state(chain).last_error


def test_a_standby_does_not_write_while_another_holds_the_lease(chain, sim):
    _, url = sim
    control(url, "produce", {"blocks": 3})
    assert lease_acquire(name=lease_name(chain), holder="someone-else", ttl=timedelta(seconds=30))
    result = runner_for(chain, url).step()
    assert not result.leader
    assert not Block.objects.filter(chain=chain).exists()


def test_a_height_that_keeps_failing_becomes_the_poison_height_and_the_indexer_waits(chain, sim, monkeypatch):
    _, url = sim
    head = produce(url, 4)
    runner = runner_for(chain, url)
    import indexer.runner as runner_module

    def broken_commit(**kwargs: Any) -> int:
        raise ValueError("cannot store this block")

    monkeypatch.setattr(runner_module, "blocks_commit", broken_commit)
    for _ in range(3):
        with pytest.raises(ValueError):
            runner.step()
    result = runner.step()
    assert result.mode == Mode.DEGRADED and "poison height 1" in result.note
    assert (state(chain).poison_height, state(chain).poison_attempts) == (1, 3)
    monkeypatch.undo()
    IndexerState.objects.filter(chain=chain).update(poison_attempts=0)  # what retry-poison does
    run_until_caught_up(runner)
    assert state(chain).last_indexed_height == head
    assert state(chain).poison_height is None


def test_an_operator_rollback_request_is_carried_out_by_the_writer_and_reingested(chain, sim):
    _, url = sim
    head = produce(url, 12)
    runner = runner_for(chain, url)
    run_until_caught_up(runner)
    checksum = range_checksum(digests_stored(chain=chain, first=1, last=head).values())
    IndexerState.objects.filter(chain=chain).update(
        rollback_requested_to=5, rollback_requested_reason="bad decoder", rollback_requested_by="ada"
    )
    result = runner.step()
    assert "operator rollback to 5" in result.note
    assert state(chain).last_indexed_height == 5 and state(chain).rollback_requested_to is None
    assert Block.objects.filter(chain=chain, height__gt=5).count() == 0
    audit = AuditEvent.objects.get(action="indexer.rolled_back")
    assert "ada" in audit.reason and "bad decoder" in audit.reason
    run_until_caught_up(runner)
    assert range_checksum(digests_stored(chain=chain, first=1, last=head).values()) == checksum


def test_a_paused_chain_gives_up_the_lease_and_writes_nothing(chain, sim):
    _, url = sim
    control(url, "produce", {"blocks": 3})
    runner = runner_for(chain, url)
    runner.step()
    IndexerState.objects.filter(chain=chain).update(paused=True)
    control(url, "produce", {"blocks": 3})
    result = runner.step()
    assert not result.leader and result.note == "paused"
    assert lease_acquire(name=lease_name(chain), holder="reindex", ttl=timedelta(seconds=5)) is not None


def test_malformed_responses_and_errors_do_not_end_the_loop(chain, sim):
    import threading

    _, url = sim
    head = produce(url, 5)
    control(url, "knobs", {"error_rate": 0.5})
    runner = runner_for(chain, url, stop_at=head)
    stop = threading.Event()
    results: list[Any] = []
    timer = threading.Timer(60, stop.set)
    timer.start()
    try:
        runner.run(stop, poll=0.01, on_step=results.append)
    finally:
        timer.cancel()
    assert state(chain).last_indexed_height == head
    assert any(r.note.startswith("error") for r in results)


def test_losing_the_websocket_never_stalls_ingest_it_polls_instead(chain, sim):
    """The socket is kept down BY CONSTRUCTION while the blocks arrive: before it is dropped, the
    watcher is pointed at a port where nothing listens, so every reconnect is refused until the test
    points it back. Whatever the machine's load, the new heights can only come from polling; the
    test then lets the socket back and checks the watcher resubscribes and ingest goes on."""
    import threading

    from indexer.rpc.ws import HeadWatcher
    from tests.servers import free_port, wait_for

    _, url = sim
    ws_url = url.replace("http", "ws") + "/websocket"
    produce(url, 3)
    watcher = HeadWatcher(ws_url, reconnect_base=0.2, reconnect_cap=0.5)
    runner = runner_for(chain, url, watcher=watcher)
    stop = threading.Event()

    def run() -> None:
        from django.db import connection

        try:
            runner.run(stop, poll=0.05)
        finally:
            connection.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: watcher.connected, timeout=30, what="the WebSocket subscription")
        seen_by_socket = (watcher.latest() or (0, 0.0))[0]
        watcher.url = f"ws://127.0.0.1:{free_port()}/websocket"  # every reconnect is refused
        control(url, "knobs", {"drop_websocket": True})
        wait_for(lambda: not watcher.connected, timeout=30, what="the WebSocket to drop")
        head = produce(url, 4)
        wait_for(
            lambda: state(chain).last_indexed_height == head,
            timeout=60,
            what=f"polling to index up to {head}",
        )
        assert not watcher.connected
        assert watcher.reconnects >= 1  # it did try, and was refused: the socket was really down
        assert (watcher.latest() or (0, 0.0))[0] == seen_by_socket < head  # no head came by the socket
        assert thread.is_alive()

        # The node's socket comes back: the watcher resubscribes by itself and ingest goes on.
        watcher.url = ws_url
        wait_for(lambda: watcher.connected, timeout=30, what="the WebSocket to resubscribe")
        head = produce(url, 2)
        wait_for(lambda: state(chain).last_indexed_height == head, timeout=60, what=f"ingest up to {head}")
        wait_for(lambda: (watcher.latest() or (0, 0.0))[0] == head, timeout=30, what="heads by the socket")
    finally:
        stop.set()
        thread.join(20)
    assert not thread.is_alive()


def test_a_source_with_pruned_history_is_connected_degraded_with_the_reason(org, sim):
    from indexer.models import ConnectionStatus, DegradedReason

    _, url = sim
    pruned_server, _, pruned_url = serve_in_thread(seed=7)
    try:
        produce(url, 30)
        produce(pruned_url, 30)
        control(pruned_url, "knobs", {"pruned_below": 20})
        chain = Chain.objects.create(org=org, slug="two", chain_id="fleetops-sim-1", catchup_batch_size=10)
        IndexerState.objects.create(chain=chain)
        SyncSource.objects.create(chain=chain, name="pruned", rpc_url=pruned_url, priority=1)
        SyncSource.objects.create(chain=chain, name="archive", rpc_url=url, priority=2)
        rpc = CometRpc([SourceConfig("pruned", pruned_url, 1), SourceConfig("archive", url, 2)], attempts=1)
        runner = IndexerRunner(chain, rpc, holder="w")
        run_until_caught_up(runner)
        assert state(chain).last_indexed_height == 31  # the archive served what the pruned one lacks
        pruned = SyncSource.objects.get(chain=chain, name="pruned")
        assert pruned.connection_status == ConnectionStatus.CONNECTED_DEGRADED
        assert DegradedReason.HISTORIC_RANGE_FAILED in pruned.degraded_reasons
        assert "pruned" in pruned.degraded_detail
        archive = SyncSource.objects.get(chain=chain, name="archive")
        assert archive.connection_status == ConnectionStatus.CONNECTED
    finally:
        pruned_server.shutdown()


def test_a_fresh_index_of_a_chain_pruned_everywhere_starts_at_the_lowest_height_a_source_has(chain, sim):
    _, url = sim
    head = produce(url, 30)
    control(url, "knobs", {"pruned_below": 12})
    runner = runner_for(chain, url)
    run_until_caught_up(runner)
    current = state(chain)
    assert (current.oldest_indexed_height, current.last_indexed_height) == (12, head)
    assert Block.objects.filter(chain=chain).count() == head - 11


# --- the mode's audit trail (issue 10) ------------------------------------------------------------------


def mode_audit(chain: Chain) -> list[tuple[str, list[str]]]:
    rows = AuditEvent.objects.filter(target_type="indexer.indexerstate", target_id=str(chain.pk))
    return [(a.action, a.changes["mode"]) for a in rows.order_by("id") if "mode" in a.changes]


def mode_changes(chain: Chain, source: str, target: str) -> float:
    labels = {"chain": chain.slug, "from_mode": source, "to_mode": target}
    return REGISTRY.get_sample_value("fleetops_indexer_mode_changes_total", labels) or 0.0


def test_entering_and_leaving_halted_is_audited_by_the_writer(chain, sim, admin_member):
    _, url = sim
    head = produce(url, 40)
    runner = runner_for(chain, url)
    run_until_caught_up(runner)
    assert mode_audit(chain) == []  # catching_up -> normal: a quiet change
    control(url, "reorg", {"depth": 20})  # deeper than the finality depth (16)
    produce(url, 1)
    assert runner.step().mode == Mode.HALTED
    halted = AuditEvent.objects.get(action="indexer.halted")
    assert halted.changes["mode"] == [Mode.NORMAL, Mode.HALTED]
    assert "finality" in halted.changes["last_error"][1] and "finality" in halted.reason
    assert (halted.actor_type, halted.actor_id, halted.org_id) == ("scheduler", "indexer_run", chain.org_id)
    services.indexer_request_rollback(
        chain=chain, to_height=head - 25, actor=Actor.for_user(admin_member.user), reason="deep reorg"
    )
    run_until_caught_up(runner)
    assert mode_audit(chain) == [
        ("indexer.halted", [Mode.NORMAL, Mode.HALTED]),
        ("indexer.unhalted", [Mode.HALTED, Mode.CATCHING_UP]),
    ]
    unhalted = AuditEvent.objects.get(action="indexer.unhalted")
    assert unhalted.metadata["requested_by"] == admin_member.user.username
    assert state(chain).mode == Mode.NORMAL
    assert_mode_trail_replays(state(chain))


def _halted_with_a_rollback_request(chain: Chain, url: str, admin: Actor) -> tuple[IndexerRunner, int]:
    """A chain halted by a reorg deeper than the finality depth, and an admin's request to roll back
    below the fork point; returns the writer and the requested height."""
    head = produce(url, 40)
    runner = runner_for(chain, url)
    run_until_caught_up(runner)
    control(url, "reorg", {"depth": 20})  # deeper than the finality depth (16)
    produce(url, 1)
    assert runner.step().mode == Mode.HALTED
    services.indexer_request_rollback(chain=chain, to_height=head - 25, actor=admin, reason="deep reorg")
    return runner, head - 25


def _steal_the_lease_after_the_rollback(chain: Chain, monkeypatch: Any) -> None:
    """Right after `blocks_rollback` commits, the writer's lease expires and a standby takes it: the
    writer's next write (clearing the request, leaving halted) must fail its fence."""
    real = runner_module.blocks_rollback

    def rollback_then_lose_the_lease(**kwargs: Any) -> int:
        removed = real(**kwargs)
        Lease.objects.filter(name=lease_name(chain)).update(expires_at=clock.now() - timedelta(seconds=1))
        assert lease_acquire(name=lease_name(chain), holder="standby", ttl=timedelta(minutes=5))
        return removed

    monkeypatch.setattr(runner_module, "blocks_rollback", rollback_then_lose_the_lease)


def _crash_in_the_unhalt(monkeypatch: Any) -> None:
    """The unhalt's transaction fails after its compare-and-set ran (the audit write raises)."""

    def crash(**kwargs: Any) -> None:
        raise RuntimeError("crashed writing the unhalt's audit row")

    monkeypatch.setattr("fleetops.lib.transition.record", crash)


@pytest.mark.parametrize("failure", ["crash", "lease_lost"])
def test_a_rollback_request_is_cleared_only_with_the_way_out_of_halted(
    chain, sim, admin_member, monkeypatch, failure
):
    """Carrying out a rollback request on a halted chain: the rows go in `blocks_rollback`'s
    transaction; the request is cleared in the one that leaves `halted`. When that one fails (a
    crash, a lost lease), the chain is halted *with* its request, and the next writer finishes it."""
    _, url = sim
    runner, to = _halted_with_a_rollback_request(chain, url, Actor.for_user(admin_member.user))
    if failure == "crash":
        _crash_in_the_unhalt(monkeypatch)
        with pytest.raises(RuntimeError, match="unhalt"):
            runner.step()
        writer = runner
    else:
        _steal_the_lease_after_the_rollback(chain, monkeypatch)
        assert runner.step().leader  # it still thought it held the lease when it began
        assert runner.grant is None  # the fence refused the unhalt: it is a standby now
        writer = runner_for(chain, url, holder="standby")
    current = state(chain)
    assert current.last_indexed_height == to  # the rollback itself committed
    assert (current.mode, current.rollback_requested_to) == (Mode.HALTED, to)  # and nothing else
    assert not AuditEvent.objects.filter(action="indexer.unhalted").exists()
    monkeypatch.undo()
    result = writer.step()  # the request again: the rollback is a no-op now, then out of halted
    assert "removed 0 blocks" in result.note
    current = state(chain)
    assert (current.mode, current.rollback_requested_to, current.rollback_requested_by) == (
        Mode.CATCHING_UP,
        None,
        "",
    )
    unhalted = AuditEvent.objects.get(action="indexer.unhalted")
    assert unhalted.changes["rollback_requested_to"] == [to, None]
    assert unhalted.changes["mode"] == [Mode.HALTED, Mode.CATCHING_UP]
    assert AuditEvent.objects.filter(action="indexer.rolled_back").count() == 1
    run_until_caught_up(writer)
    assert state(chain).mode == Mode.NORMAL
    assert_mode_trail_replays(state(chain))


def test_a_rollback_request_on_a_running_chain_stays_until_its_clear_commits(chain, sim, monkeypatch):
    """Not halted: clearing the request is still fenced by the lease, so a writer that lost it
    leaves the request for the next one instead of clearing it unfenced."""
    _, url = sim
    produce(url, 12)
    runner = runner_for(chain, url)
    run_until_caught_up(runner)
    IndexerState.objects.filter(chain=chain).update(
        rollback_requested_to=5, rollback_requested_reason="bad decoder", rollback_requested_by="ada"
    )
    _steal_the_lease_after_the_rollback(chain, monkeypatch)
    runner.step()
    assert runner.grant is None
    assert (state(chain).last_indexed_height, state(chain).rollback_requested_to) == (5, 5)
    monkeypatch.undo()
    standby = runner_for(chain, url, holder="standby")
    assert "removed 0 blocks" in standby.step().note
    assert state(chain).rollback_requested_to is None
    assert state(chain).mode == Mode.NORMAL


def test_idle_normal_flapping_is_counted_but_never_floods_the_audit_log(chain, sim):
    _, url = sim
    produce(url, 5)
    runner = runner_for(chain, url)
    run_until_caught_up(runner)
    before = mode_changes(chain, Mode.NORMAL, Mode.IDLE), mode_changes(chain, Mode.IDLE, Mode.NORMAL)
    for _ in range(3):
        with clock.frozen(clock.now() + timedelta(seconds=30)):  # the head has not moved for 30 block times
            assert runner.step().mode == Mode.IDLE
        produce(url, 1)
        assert runner.step().mode == Mode.NORMAL
    after = mode_changes(chain, Mode.NORMAL, Mode.IDLE), mode_changes(chain, Mode.IDLE, Mode.NORMAL)
    assert (after[0] - before[0], after[1] - before[1]) == (3, 3)
    assert mode_audit(chain) == []
    assert_mode_trail_replays(state(chain))


def test_a_stalled_writer_is_degraded_audited_and_recovers_audited(chain, sim, monkeypatch):
    _, url = sim
    head = produce(url, 4)
    runner = runner_for(chain, url)

    def sources_down(heights: range, **kwargs: Any) -> Any:
        raise RuntimeError("every source times out")

    monkeypatch.setattr(runner, "_fetch", sources_down)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            runner.step()
    assert state(chain).mode == Mode.DEGRADED
    monkeypatch.undo()
    run_until_caught_up(runner)
    assert state(chain).last_indexed_height == head
    assert [action for action, _ in mode_audit(chain)] == ["indexer.degraded", "indexer.recovered"]
    assert_mode_trail_replays(state(chain))
