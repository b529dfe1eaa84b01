"""The indexer against several sources of one chain: three chain simulator processes with the same
seed (so the same blocks) on loopback, some of them stuck, lagging, flapping, pruned, halted or
failing, driven through their HTTP control interface; real PostgreSQL. The head is agreed among the
sources that answer and are not lagging; ingest fails over from lagging ones; the rows end up equal
to a run against a single healthy source (checksums, and `indexer_verify` against the sources)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection
from prometheus_client import REGISTRY

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from indexer import sources as sources_module
from indexer.dashboard import check_chains
from indexer.decoder import DecoderClient
from indexer.enrichment import enrichment_loop, enrichment_tick
from indexer.models import (
    Chain,
    ConnectionStatus,
    DegradedReason,
    Enrichment,
    IndexerState,
    Mode,
    SourceHealth,
    SyncSource,
)
from indexer.rpc.client import CometRpc, SourceConfig
from indexer.runner import IndexerRunner, StepResult, trusted_sources
from indexer.selectors import chain_status
from indexer.services import chain_update_settings, source_update_settings
from indexer.source_status import source_reenable
from indexer.verify import digests_stored, range_checksum
from indexer.watch import head_watcher_for
from tests.processes import ROOT, subprocess_env
from tests.servers import free_port, port_answers, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

S = ConnectionStatus
H = DegradedReason
SEED = 5


class SimProcess:
    """`python -m simulators.chain` as its own process (blocks only on demand)."""

    def __init__(self, seed: int = SEED) -> None:
        port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "simulators.chain", "--port", str(port), "--seed", str(seed),
             "--block-interval", "0", "--txs-per-block", "3"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        wait_for(lambda: port_answers("127.0.0.1", port), timeout=30, what=f"chain simulator on {port}")

    def control(self, what: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.url}/control/{what}", data=json.dumps(body or {}).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def produce(self, blocks: int) -> int:
        return int(self.control("produce", {"blocks": blocks})["head"])

    def knobs(self, **values: Any) -> None:
        self.control("knobs", values)

    def halt(self, halted: bool = True) -> None:
        self.control("halt", {"halted": halted})

    def requests(self) -> int:
        return sum(self.control("state")["requests"].values())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def sims() -> Iterator[list[SimProcess]]:
    started = [SimProcess() for _ in range(3)]
    try:
        yield started
    finally:
        for sim in started:
            sim.stop()


@pytest.fixture(autouse=True)
def _forget_source_memory() -> Iterator[None]:
    yield
    for memory in (
        sources_module._losses,
        sources_module._await_status,
        sources_module._settling,
        sources_module._sync_settling,
    ):
        memory.clear()


def make_chain(org: Any, sims: list[SimProcess], slug: str = "multi") -> Chain:
    chain = Chain.objects.create(
        org=org, slug=slug, chain_id="fleetops-sim-1", catchup_batch_size=10, finality_depth=16,
        expected_block_time_seconds=1.0,
    )  # fmt: skip
    IndexerState.objects.create(chain=chain)
    for i, sim in enumerate(sims):
        SyncSource.objects.create(chain=chain, name="abc"[i], rpc_url=sim.url, priority=i + 1)
    return chain


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def runner_for(chain: Chain, mono: FakeMonotonic | None = None) -> IndexerRunner:
    configs = [SourceConfig(s.name, s.rpc_url, s.priority) for s in chain.sources.order_by("priority")]
    kwargs: dict[str, Any] = {"clock": mono, "sleep": mono.sleep} if mono is not None else {}
    rpc = CometRpc(configs, attempts=1, retry_base=0.01, **kwargs)
    return IndexerRunner(chain, rpc, holder="multi-writer")


def step_until(
    runner: IndexerRunner, done: Any, timeout: float = 40, mono: FakeMonotonic | None = None
) -> list[StepResult]:
    """Step until `done(result)`; a step that committed nothing is followed by a short pause, so the
    sources' heads (asked at most every probe interval) get asked again meanwhile."""
    results: list[StepResult] = []
    deadline = time.monotonic() + timeout
    while True:
        if mono is not None:
            mono.now += 6  # past the probe interval on the client's clock
        results.append(runner.step())
        if done(results[-1]):
            return results
        if time.monotonic() > deadline:
            raise AssertionError(f"not done after {len(results)} steps; last: {results[-1]}")
        if results[-1].committed == 0 and mono is None:
            time.sleep(0.1)


def caught_up_to(height: int) -> Any:
    return lambda r: r.committed == 0 and r.indexed == height and r.head == height


def state(chain: Chain) -> IndexerState:
    return IndexerState.objects.get(chain=chain)


def source(chain: Chain, name: str) -> SyncSource:
    return SyncSource.objects.get(chain=chain, name=name)


def checksum(chain: Chain, last: int) -> str:
    return range_checksum(digests_stored(chain=chain, first=1, last=last).values())


def single_source_checksum(org: Any, sim: SimProcess, last: int) -> str:
    """The rows a run against one healthy source alone writes, up to `last`."""
    single = Chain.objects.create(org=org, slug="single", chain_id="fleetops-sim-1", catchup_batch_size=10)
    IndexerState.objects.create(chain=single)
    SyncSource.objects.create(chain=single, name="only", rpc_url=sim.url, priority=1)
    with CometRpc([SourceConfig("only", sim.url, 1)], attempts=1) as rpc:
        runner = IndexerRunner(single, rpc, holder="single-writer", stop_at=last)
        step_until(runner, lambda r: r.indexed == last)
        runner.release()
    return checksum(single, last)


def verify(slug: str) -> str:
    out = io.StringIO()
    call_command("indexer_verify", "--chain", slug, stdout=out)
    return out.getvalue()


def transitions(chain: Chain, name: str, to: str) -> float:
    labels = {"chain": chain.slug, "source": name, "to": to, "result": "changed"}
    return REGISTRY.get_sample_value("fleetops_indexer_source_transitions_total", labels) or 0.0


def reorgs(chain: Chain, outcome: str) -> float:
    labels = {"chain": chain.slug, "outcome": outcome}
    return REGISTRY.get_sample_value("fleetops_indexer_reorgs_total", labels) or 0.0


def rolled_back(chain: Chain) -> bool:
    return AuditEvent.objects.filter(action="indexer.rolled_back").exists()


def attempts(chain: Chain, name: str, result: str) -> float:
    labels = {"chain": chain.slug, "source": name, "result": result}
    return REGISTRY.get_sample_value("fleetops_indexer_source_connection_attempts_total", labels) or 0.0


# --- head by agreement ------------------------------------------------------------------------------


def test_a_stuck_preferred_source_is_lagging_and_never_makes_the_chain_idle(org, sims):
    _a, b, c = sims
    for sim in sims:
        sim.produce(10)  # head 11 everywhere
    for sim in (b, c):
        sim.produce(20)  # head 31; the preferred source stays at 11
    chain = make_chain(org, sims)
    runner = runner_for(chain)
    results = step_until(runner, caught_up_to(31))
    assert Mode.IDLE not in {r.mode for r in results}
    assert state(chain).mode != Mode.IDLE
    stuck = source(chain, "a")
    assert H.LAGGING_HEAD in stuck.degraded_reasons and "20 blocks behind 31" in stuck.degraded_detail
    assert stuck.health == SourceHealth.DEGRADED
    assert stuck.connection_status != S.CONNECTED_DEGRADED  # lagging is not partial data
    assert [s.config.name for s in runner.rpc.ranked_sources()][-1] == "a"  # ranked down
    assert runner.rpc.last_source in ("b", "c")  # ingest failed over from it

    # A minute of a flat preferred source while the others move on: still not idle.
    for sim in (b, c):
        sim.produce(1)
    with clock.frozen(clock.now() + timedelta(seconds=60)):
        result = runner.step()
    assert (result.committed, result.mode) == (1, Mode.NORMAL)
    assert chain_status(chain=Chain.objects.get(pk=chain.pk)).stalled is False

    # The rows equal a run against one healthy source.
    assert checksum(chain, 32) == single_source_checksum(org, b, 32)
    runner.release()
    assert "identical to the source" in verify("multi")


def test_a_lagging_source_is_failed_over_from_and_trusted_again_once_it_catches_up(org, sims):
    a, b, c = sims
    for sim in sims:
        sim.produce(5)
    for sim in (b, c):
        sim.produce(20)  # a: 6, b and c: 26
    chain = make_chain(org, sims)
    runner = runner_for(chain)
    step_until(runner, caught_up_to(26))
    for _ in range(3):  # a moves, but stays more than 10 blocks behind
        a.produce(2)
        for sim in (b, c):
            sim.produce(2)
        result = step_until(runner, lambda r: r.committed == 0 and r.indexed == r.head)[-1]
        assert runner.rpc.lagging().get("a", 0) > 10  # heads are asked a few seconds apart
        assert trusted_sources(runner.rpc) == ["b", "c"]
        assert runner.rpc.last_source != "a"
    assert result.indexed == 32
    assert H.LAGGING_HEAD in source(chain, "a").degraded_reasons

    a.produce(20)  # caught up: head 32 like the others
    step_until(runner, lambda r: runner.rpc.lagging() == {} and r.indexed == 32)
    step_until(runner, lambda r: H.LAGGING_HEAD not in source(chain, "a").degraded_reasons)
    assert runner.rpc.ranked_sources()[0].config.name == "a"  # preferred again
    assert source(chain, "a").health == SourceHealth.HEALTHY
    runner.release()
    assert checksum(chain, 32) == single_source_checksum(org, c, 32)


def test_a_fork_on_a_source_that_is_catching_up_is_neither_followed_nor_rolled_back(org, sims):
    a, b, _c = sims
    for sim in sims:
        sim.produce(19)
    chain = make_chain(org, sims)
    runner = runner_for(chain)
    step_until(runner, caught_up_to(20))
    a.control("reorg", {"depth": 2})  # the preferred source forks away from b and c ...
    a.knobs(catching_up=True)  # ... and says it is still syncing
    for sim in sims:
        sim.produce(5)
    results = step_until(runner, caught_up_to(25))
    assert {r.mode for r in results} <= {Mode.NORMAL, Mode.CATCHING_UP}
    assert not AuditEvent.objects.filter(action="indexer.rolled_back").exists()
    assert trusted_sources(runner.rpc) == ["b", "c"]
    assert runner.rpc.ranked_sources()[-1].config.name == "a"
    runner.release()
    assert checksum(chain, 25) == single_source_checksum(org, b, 25)


def test_a_different_hash_from_a_lagging_source_at_an_indexed_height_is_ignored_not_rolled_back(org, sims):
    a, b, c = sims
    for sim in sims:
        sim.produce(19)
    chain = make_chain(org, sims)
    mono = FakeMonotonic()
    runner = runner_for(chain, mono)
    step_until(runner, caught_up_to(20), mono=mono)
    a.control("reorg", {"depth": 2})  # the preferred source forks at 19 and 20 ...
    a.produce(3)  # ... and falls behind: 23 while b and c reach 35
    for sim in (b, c):
        sim.produce(15)
    ignored = reorgs(chain, "ignored")
    # The other heads were asked within the probe interval: the client still takes a for caught up,
    # so it serves block 21, whose parent is its 20. The heads asked for the reorg show it lagging.
    result = runner.step()
    assert result.committed == 0 and result.indexed == 20
    assert "reorg at 21 not shown by the trusted sources, ignored" in result.note
    assert "block 20 differs on a; the stored one is on b, c" in result.note
    assert reorgs(chain, "ignored") == ignored + 1
    assert reorgs(chain, "halted") == 0 and not rolled_back(chain)
    assert state(chain).last_indexed_height == 20 and state(chain).mode == Mode.NORMAL
    assert trusted_sources(runner.rpc) == ["b", "c"]
    forked = source(chain, "a")
    assert {H.FORKED, H.LAGGING_HEAD} <= set(forked.degraded_reasons)
    fork_note = "served a fork at 20 the trusted sources do not show (ranked last for 60 s)"
    assert fork_note in forked.degraded_detail
    assert forked.health == SourceHealth.DEGRADED

    step_until(runner, caught_up_to(35), mono=mono)
    assert runner.rpc.last_source in ("b", "c")
    assert not rolled_back(chain) and reorgs(chain, "ignored") == ignored + 1
    runner.release()
    assert checksum(chain, 35) == single_source_checksum(org, b, 35)


def test_a_forked_source_that_is_not_lagging_is_ranked_down_for_a_backoff_not_met_every_step(org, sims):
    a, b, _c = sims
    for sim in sims:
        sim.produce(19)
    chain = make_chain(org, sims)
    mono = FakeMonotonic()
    runner = runner_for(chain, mono)
    step_until(runner, caught_up_to(20), mono=mono)
    a.control("reorg", {"depth": 2})  # a fork only the preferred source shows, at the same head
    for sim in sims:
        sim.produce(5)
    ignored = reorgs(chain, "ignored")
    results = step_until(runner, caught_up_to(25), mono=mono)
    # Met once, then a is ranked last and ingest goes on from b: not an ignored reorg every step.
    assert [r.note for r in results if "ignored" in r.note] == [
        "reorg at 21 not shown by the trusted sources, ignored: block 20 differs on a; "
        "the stored one is on b, c"
    ]
    assert reorgs(chain, "ignored") == ignored + 1
    assert sum(r.committed for r in results) == 5
    assert [s.config.name for s in runner.rpc.ranked_sources()][-1] == "a"
    assert trusted_sources(runner.rpc) == ["b", "c"]
    assert "a" not in runner.rpc.fresh_heads()  # nor does it set the head
    forked = source(chain, "a")
    assert forked.degraded_reasons == [H.FORKED] and "ranked last for 60 s" in forked.degraded_detail
    assert forked.health == SourceHealth.DEGRADED
    assert forked.connection_status != S.CONNECTED_DEGRADED  # a health reason, not partial data

    # After the backoff it is preferred again; still on its fork, it is met once more and ranked
    # down for twice as long.
    mono.now += 61
    for sim in sims:
        sim.produce(1)
    results = step_until(runner, caught_up_to(26), mono=mono)
    assert sum("ignored" in r.note for r in results) == 1
    assert reorgs(chain, "ignored") == ignored + 2
    assert "ranked last for 120 s" in source(chain, "a").degraded_detail
    assert not rolled_back(chain) and state(chain).mode == Mode.NORMAL

    # The backoff over, the reason goes and it is preferred again (and met again at the next block).
    mono.now += 121
    step_until(runner, lambda r: H.FORKED not in source(chain, "a").degraded_reasons, mono=mono)
    assert runner.rpc.ranked_sources()[0].config.name == "a"
    runner.release()
    assert checksum(chain, 26) == single_source_checksum(org, b, 26)


# --- source troubles ---------------------------------------------------------------------------------


def test_a_flapping_source_drops_without_disconnecting_and_ingest_goes_on(org, sims):
    a, b, _c = sims
    for sim in sims:
        sim.produce(5)
    chain = make_chain(org, sims)
    mono = FakeMonotonic()
    runner = runner_for(chain, mono)
    step_until(
        runner, lambda r: r.indexed == 6 and source(chain, "a").connection_status == S.CONNECTED, mono=mono
    )
    disconnecting = transitions(chain, "a", "disconnecting")
    head = 6
    for _ in range(3):
        a.knobs(error_rate=1.0)
        for sim in sims:
            head = sim.produce(2)
        step_until(runner, lambda r: source(chain, "a").connection_status == S.DISCONNECTED, mono=mono)
        a.knobs(error_rate=0.0)
        step_until(runner, lambda r: source(chain, "a").connection_status == S.CONNECTED, mono=mono)
    flapping = source(chain, "a")
    assert H.FLAPPING in flapping.degraded_reasons and "dropped 3 times" in flapping.degraded_detail
    assert flapping.health == SourceHealth.DEGRADED
    # Lost connections are no intentional disconnects (seed 002), and flapping is no partial data.
    assert transitions(chain, "a", "disconnecting") == disconnecting
    assert transitions(chain, "a", "connected (degraded)") == 0
    step_until(runner, caught_up_to(head), mono=mono)
    runner.release()
    assert checksum(chain, head) == single_source_checksum(org, b, head)


def test_a_pruned_source_is_the_only_connected_degraded_one_and_the_archive_fills_the_gap(org, sims):
    a, _b, c = sims
    for sim in sims:
        sim.produce(39)
    a.knobs(pruned_below=25)
    chain = make_chain(org, sims)
    runner = runner_for(chain)
    step_until(runner, caught_up_to(40))
    step_until(runner, lambda r: source(chain, "b").connection_status == S.CONNECTED)
    pruned = source(chain, "a")
    assert pruned.connection_status == S.CONNECTED_DEGRADED
    assert pruned.degraded_reasons == [H.HISTORIC_RANGE_FAILED]
    assert "pruned below 25" in pruned.degraded_detail
    assert pruned.health == SourceHealth.HEALTHY  # its connection is fine, its data is partial
    assert {source(chain, n).connection_status for n in "bc"} == {S.CONNECTED}
    runner.release()
    assert checksum(chain, 40) == single_source_checksum(org, c, 40)


def test_all_sources_halted_is_idle_and_it_resumes_by_itself(org, sims):
    for sim in sims:
        sim.produce(7)
    chain = make_chain(org, sims)
    runner = runner_for(chain)
    step_until(runner, caught_up_to(8))
    for sim in sims:
        sim.halt()
    with clock.frozen(clock.now() + timedelta(seconds=30)):
        assert runner.step().mode == Mode.IDLE
        assert chain_status(chain=Chain.objects.get(pk=chain.pk)).stalled is True
    assert state(chain).mode == Mode.IDLE
    assert state(chain).last_error == ""  # a halted chain is no error of the indexer
    for sim in sims:
        sim.halt(False)
        sim.produce(1)
    result = runner.step()
    assert (result.committed, result.mode) == (1, Mode.NORMAL)


def test_every_source_failing_is_degraded_after_three_failed_steps_and_recovers(org, sims):
    for sim in sims:
        sim.produce(4)
    chain = make_chain(org, sims)
    runner = runner_for(chain)
    step_until(runner, caught_up_to(5))
    for sim in sims:
        sim.knobs(error_rate=1.0)
    for failed in range(1, 4):
        with pytest.raises(Exception, match="every attempt failed"):
            runner.step()
        expected = Mode.DEGRADED if failed == 3 else Mode.NORMAL
        assert state(chain).mode == expected, f"after {failed} failed steps"
    assert "every attempt failed" in state(chain).last_error
    for sim in sims:
        sim.knobs(error_rate=0.0)
        sim.produce(2)
    step_until(runner, caught_up_to(7))
    assert state(chain).mode == Mode.NORMAL
    audited = list(
        AuditEvent.objects.filter(action__in=["indexer.degraded", "indexer.recovered"])
        .order_by("id")
        .values_list("action", flat=True)
    )
    assert audited == ["indexer.degraded", "indexer.recovered"]


def test_a_source_refused_for_dns_stays_on_the_list_until_an_operator_re_enables_it(org, sims, operator):
    for sim in sims:
        sim.produce(4)
    chain = make_chain(org, sims[:2])
    SyncSource.objects.create(
        chain=chain, name="typo", rpc_url="http://no-such-host.invalid:26657", priority=0
    )
    refused_before = attempts(chain, "typo", "refused")
    runner = runner_for(chain)
    step_until(runner, lambda r: source(chain, "typo").connection_status == S.REFUSED)
    typo = source(chain, "typo")
    assert typo.refused_reason.startswith("DNS error") and "Name or service not known" in typo.refused_reason
    assert attempts(chain, "typo", "refused") == refused_before + 1
    assert "typo" not in runner.rpc.source_names  # no longer asked
    step_until(runner, caught_up_to(5))  # ingest went on from the others
    status = chain_status(chain=Chain.objects.get(pk=chain.pk))
    assert [s.name for s in status.refused_sources] == ["typo"]
    check = check_chains()
    assert any("refused" in row["notes"] and "typo" in row["notes"] for row in check.rows)
    for _ in range(3):
        runner.step()
    assert source(chain, "typo").connection_status == S.REFUSED  # it stays refused

    # The operator fixes the URL and re-enables it: audited, and the writer takes it back.
    SyncSource.objects.filter(pk=typo.pk).update(rpc_url=sims[2].url)
    assert source_reenable(source=typo, actor=Actor.for_user(operator.user), reason="fixed the URL")
    audit = AuditEvent.objects.get(action="indexer.source.reenabled")
    assert audit.reason == "fixed the URL" and audit.changes["connection_status"][1] == S.DISCONNECTED
    step_until(runner, lambda r: source(chain, "typo").connection_status == S.CONNECTED)
    assert "typo" in runner.rpc.source_names
    assert source(chain, "typo").refused_reason == ""
    runner.release()


# --- limits tuned live ------------------------------------------------------------------------------


def commits(port: int, slug: str) -> float:
    """Commit transactions the `indexer_run` process made (its own /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    prefix = f'fleetops_indexer_block_commit_seconds_count{{chain="{slug}"}} '
    return next((float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


@pytest.mark.slow
def test_settings_changed_by_an_operator_take_effect_in_a_running_indexer_run(org, sims, operator, tmp_path):
    a, b, _c = sims
    for sim in sims:
        sim.produce(10)
    chain = make_chain(org, sims[:2])  # a (preferred) and b
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "indexer_run", "--chain", "multi", "--poll", "0.1", "--ingest-only",
         "--no-websocket", "--health-port", str(port)],
        cwd=ROOT, env=subprocess_env(), stdout=(tmp_path / "run.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    actor = Actor.for_user(operator.user)
    try:
        wait_for(lambda: state(chain).last_indexed_height == 11, timeout=60, what="the first catch-up")
        wait_for(lambda: commits(port, "multi"), timeout=30, what="the process's /metrics")

        # Smaller catch-up batches, without a restart: 30 new blocks take about 10 commits (not 3).
        changed = chain_update_settings(
            chain=chain, actor=actor, reason="smaller batches", catchup_batch_size=3
        )
        assert changed == {"catchup_batch_size": [10, 3]}
        before = commits(port, "multi")
        for sim in sims:
            sim.produce(30)
        wait_for(lambda: state(chain).last_indexed_height == 41, timeout=60, what="the second catch-up")
        assert commits(port, "multi") - before >= 8
        audit = AuditEvent.objects.get(action="indexer.settings_changed")
        assert audit.reason == "smaller batches" and audit.changes == {"catchup_batch_size": [10, 3]}

        # Disable the preferred source: it goes disconnecting -> disconnected and is asked no more.
        disconnecting = SyncSource.objects.get(chain=chain, name="a")
        source_update_settings(source=disconnecting, actor=actor, reason="node maintenance", enabled=False)
        wait_for(
            lambda: source(chain, "a").connection_status == S.DISCONNECTED,
            timeout=30,
            what="the disabled source to be disconnected",
        )
        asked = a.requests()
        for sim in sims:
            sim.produce(5)
        wait_for(lambda: state(chain).last_indexed_height == 46, timeout=60, what="ingest from b alone")
        assert a.requests() == asked  # not asked once since
        assert AuditEvent.objects.get(action="indexer.source.settings_changed").changes == {
            "enabled": [True, False]
        }
        assert proc.poll() is None  # the same process all along
    finally:
        proc.terminate()
        proc.wait(20)
    assert checksum(chain, 46) == single_source_checksum(org, b, 46)


def ws_url(sim: SimProcess) -> str:
    return sim.url.replace("http://", "ws://") + "/websocket"


def subscribers(sim: SimProcess) -> int:
    return int(sim.control("state")["subscribers"])


def test_the_head_watcher_follows_its_source_being_disabled_and_re_enabled_live(org, sims, operator):
    a, b, c = sims
    for sim in sims:
        sim.produce(4)
    chain = make_chain(org, sims)
    for sim, name in zip(sims, "abc", strict=True):
        SyncSource.objects.filter(chain=chain, name=name).update(websocket_url=ws_url(sim))
    runner = runner_for(chain)
    watcher = head_watcher_for(chain)
    assert watcher is not None and watcher.url == ws_url(a)
    runner.watcher = watcher.start()
    actor = Actor.for_user(operator.user)
    try:
        wait_for(lambda: runner.watcher.connected and subscribers(a) == 1, timeout=30, what="a's socket")
        step_until(runner, caught_up_to(5))

        # The operator disables a: within one step the watcher listens to b, and a's socket closes.
        source_update_settings(source=source(chain, "a"), actor=actor, reason="maintenance", enabled=False)
        runner.step()
        assert runner.watcher is not watcher and runner.watcher.url == ws_url(b)
        assert not watcher.thread_alive()
        wait_for(
            lambda: runner.watcher.connected and subscribers(b) == 1 and subscribers(a) == 0,
            timeout=30,
            what="the watcher to move to b",
        )
        for sim in sims:
            sim.produce(3)
        wait_for(lambda: (runner.watcher.latest() or (0, 0.0))[0] == 8, timeout=30, what="b's header 8")
        asked = a.requests()
        step_until(runner, caught_up_to(8))
        assert a.requests() == asked  # a is asked nothing, over HTTP or its socket
        assert source(chain, "a").connection_status == S.DISCONNECTED
        assert subscribers(c) == 0

        # Re-enabled, the preferred source has the watcher back.
        source_update_settings(source=source(chain, "a"), actor=actor, reason="back", enabled=True)
        runner.step()
        assert runner.watcher.url == ws_url(a)
        wait_for(
            lambda: runner.watcher.connected and subscribers(a) == 1 and subscribers(b) == 0,
            timeout=30,
            what="the watcher back on a",
        )
    finally:
        runner.watcher.stop()
        runner.release()


def decode_concurrency(chain: Chain) -> float | None:
    return REGISTRY.get_sample_value("fleetops_indexer_decode_concurrency", {"chain": chain.slug})


def test_decode_concurrency_changed_live_is_in_effect_from_the_next_enrichment_round(org, sims, operator):
    a = sims[0]
    a.produce(40)
    chain = make_chain(org, sims[:1])
    Chain.objects.filter(pk=chain.pk).update(enrichment_batch_size=2)  # many short rounds
    runner = runner_for(chain)
    step_until(runner, caught_up_to(41))
    runner.release()
    assert Enrichment.objects.filter(chain=chain).count() > 6

    stop = threading.Event()
    seen: list[float | None] = []  # the concurrency each finished round ran with
    first_round, go_on = threading.Event(), threading.Event()

    def on_round(counts: dict[str, int]) -> None:
        seen.append(decode_concurrency(chain))
        first_round.set()
        go_on.wait(30)  # the operator's change lands between two rounds
        if len(seen) >= 3:
            stop.set()

    def run() -> None:
        try:
            enrichment_loop(
                chain=Chain.objects.get(pk=chain.pk),
                stop=stop,
                decoder_factory=lambda: DecoderClient(a.url, timeout=5),
                poll=0.05,
                on_round=on_round,
            )
        finally:
            connection.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert first_round.wait(30)
        assert seen == [4.0]  # the default
        changed = chain_update_settings(
            chain=chain, actor=Actor.for_user(operator.user), reason="decoder busy", decode_concurrency=1
        )
        assert changed == {"decode_concurrency": [4, 1]}
        go_on.set()
        thread.join(30)
        assert not thread.is_alive()
    finally:
        stop.set()
        go_on.set()
    assert seen[:3] == [4.0, 1.0, 1.0]  # the very next round
    assert Enrichment.objects.filter(chain=chain, status="ok").count() >= 6

    # The beat task takes the chain's value too.
    Chain.objects.filter(pk=chain.pk).update(decode_concurrency=3)
    assert enrichment_tick(budget_seconds=0.0)["multi"]["claimed"] >= 1
    assert decode_concurrency(chain) == 3.0
