"""Enrichment rows and workers on real PostgreSQL, against the chain simulator's decoder on loopback:
identities, verdicts, backoff, the circuit breaker, concurrent workers, crashed claims, the beat task."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from django.db import connection

from fleetops import schedules
from fleetops.audit.actors import Actor
from fleetops.lib import clock
from fleetops.observability.leases import lease_acquire
from fleetops.observability.models import Heartbeat
from indexer import enrichment
from indexer.blocks import IndexedBlock, lease_name
from indexer.decoder import (
    BREAKER_OPEN_MESSAGE,
    UNDECODABLE_MESSAGE,
    BreakerOpen,
    BreakerState,
    CircuitBreaker,
    DecoderClient,
    DecoderUnavailable,
    Undecodable,
)
from indexer.enrichment import (
    ENRICHMENT_COPY_COLUMNS,
    Verdict,
    enrichment_backlog,
    enrichment_claim,
    enrichment_loop,
    enrichment_record,
    enrichment_rows_for,
    enrichment_run_once,
)
from indexer.ingest import blocks_commit, blocks_rollback, event_rows
from indexer.models import Chain, Enrichment, IndexerState, SyncSource
from indexer.rpc.client import CometRpc, SourceConfig
from indexer.tasks import enrich
from simulators.chain.server import ChainSimulator, serve_in_thread

pytestmark = pytest.mark.django_db
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# --- helpers ------------------------------------------------------------------------------------------


@pytest.fixture
def simulator() -> Iterator[tuple[ChainSimulator, str]]:
    server, sim, url = serve_in_thread(seed=7, txs_per_block=6)
    yield sim, url
    server.shutdown()


def knobs(url: str, **values: Any) -> None:
    response = httpx.post(f"{url}/control/knobs", json=values, timeout=5)
    assert response.status_code == 200, response.text


def decode_requests(url: str) -> int:
    """How many /decode requests reached the simulator, from its own counters."""
    return int(httpx.get(f"{url}/control/state", timeout=5).json()["requests"].get("decode", 0))


def produce(url: str, blocks: int) -> None:
    assert httpx.post(f"{url}/control/produce", json={"blocks": blocks}, timeout=10).status_code == 200


def fetch_blocks(url: str, first: int, last: int) -> list[IndexedBlock]:
    with CometRpc([SourceConfig("sim", url)]) as rpc:
        return [IndexedBlock(rpc.block(h), rpc.block_results(h)) for h in range(first, last + 1)]


def copy_rows(rows: list[tuple[Any, ...]]) -> int:
    """COPY the rows exactly as blocks_commit does, so the column order is checked by PostgreSQL."""
    with (
        connection.cursor() as cursor,
        cursor.cursor.copy(
            f"COPY {Enrichment._meta.db_table} ({', '.join(ENRICHMENT_COPY_COLUMNS)}) FROM STDIN"
        ) as copy,
    ):
        for row in rows:
            copy.write_row(row)
    return len(rows)


def payload_rows(chain: Chain, payloads: list[str], *, height: int = 1) -> list[int]:
    """Pending rows with the given payloads, one per tx event, due at the current clock."""
    at = clock.now()
    rows = [
        (chain.pk, height, "tx", i, 0, "sim-hex", payload, "pending", 0, at, "", None, at)
        for i, payload in enumerate(payloads)
    ]
    copy_rows(rows)
    stored = Enrichment.objects.filter(chain=chain, height=height).order_by("tx_index")
    return list(stored.values_list("id", flat=True))


def hex_json(value: Any) -> str:
    return json.dumps(value).encode().hex()


def frozen_seconds() -> float:
    return clock.now().timestamp()


def make_decoder(url: str, *, threshold: int = 3, cooldown: float = 30.0) -> DecoderClient:
    # The breaker reads the one clock, so tests move it together with the rows' due times.
    return DecoderClient(
        url, timeout=5, breaker=CircuitBreaker(threshold=threshold, cooldown=cooldown, clock=frozen_seconds)
    )


def statuses(chain: Chain) -> dict[str, int]:
    return enrichment_backlog(chain=chain, include_ok=True)


@pytest.fixture
def chain(org, simulator) -> Chain:
    _, url = simulator
    chain = Chain.objects.create(org=org, slug="sim", chain_id="fleetops-sim-1")
    IndexerState.objects.create(chain=chain)
    SyncSource.objects.create(chain=chain, name="primary", rpc_url=url, priority=1)
    return chain


@pytest.fixture
def frozen() -> Iterator[None]:
    with clock.frozen(T0):
        yield


@pytest.fixture(autouse=True)
def _no_shared_decoders() -> Iterator[None]:
    yield
    for client in enrichment._shared.values():
        client.close()
    enrichment._shared.clear()


# --- rows at ingest -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["0.34", "0.38"])
def test_enrichment_rows_have_the_identity_and_data_of_their_payload_events(simulator, shape):
    _, url = simulator
    httpx.post(f"{url}/control/shape", json={"shape": shape}, timeout=5)
    produce(url, 30)
    found = 0
    for item in fetch_blocks(url, 1, 30):
        payload_events = {
            (row[1], row[2], row[3], row[4]): {a["key"]: a["value"] for a in json.loads(row[6])}
            for row in event_rows(99, item)
            if row[5] == "payload"
        }
        rows = enrichment_rows_for(99, item, now=T0)
        assert {(r[1], r[2], r[3], r[4]): r[6] for r in rows} == {
            identity: attributes["data"] for identity, attributes in payload_events.items()
        }
        for row in rows:
            values = dict(zip(ENRICHMENT_COPY_COLUMNS, row, strict=True))
            assert values["chain_id"] == 99 and values["encoding"] == "sim-hex"
            assert (values["status"], values["attempts"], values["next_attempt_at"]) == ("pending", 0, T0)
        found += len(rows)
    assert found > 10  # the simulator puts a payload event in about a quarter of its txs


def test_blocks_commit_writes_pending_rows_and_a_rollback_removes_them(chain, simulator, frozen):
    _, url = simulator
    produce(url, 20)
    blocks = fetch_blocks(url, 1, 20)
    lease = lease_acquire(name=lease_name(chain), holder="writer", ttl=timedelta(seconds=30))
    assert lease is not None
    blocks_commit(chain=chain, blocks=blocks, lease=lease)
    expected = {(r[1], r[2], r[3], r[4]) for b in blocks for r in enrichment_rows_for(chain.pk, b)}
    identities = ("height", "phase", "tx_index", "event_index")
    stored = set(Enrichment.objects.filter(chain=chain).values_list(*identities))
    assert stored == expected and len(expected) > 5
    assert set(Enrichment.objects.filter(chain=chain).values_list("status", flat=True)) == {"pending"}

    blocks_rollback(chain=chain, to_height=10, lease=lease, actor=Actor.system("test"), reason="test")
    assert not Enrichment.objects.filter(chain=chain, height__gt=10).exists()
    assert Enrichment.objects.filter(chain=chain).count() == len({e for e in expected if e[0] <= 10})


# --- verdicts -----------------------------------------------------------------------------------------


def test_a_healthy_decoder_marks_rows_ok_with_the_decoded_payload(chain, simulator, frozen):
    _, url = simulator
    produce(url, 30)
    rows = [row for b in fetch_blocks(url, 1, 30) for row in enrichment_rows_for(chain.pk, b)]
    copy_rows(rows)
    with make_decoder(url) as decoder:
        counts = enrichment_run_once(chain=chain, decoder=decoder, limit=500)
    assert counts["claimed"] == len(rows) == decode_requests(url)
    assert counts["ok"] + counts["undecodable"] == len(rows) and counts["ok"] > 0
    for row in Enrichment.objects.filter(chain=chain):
        assert row.attempts == 1 and row.next_attempt_at is None
        if row.status == "ok":
            assert row.decoded == json.loads(bytes.fromhex(row.payload)) and row.last_error == ""
        else:  # the simulator emits ~2% undecodable payloads on purpose
            assert row.status == "undecodable"
            with pytest.raises(ValueError):
                json.loads(bytes.fromhex(row.payload))


def test_an_undecodable_payload_is_final_and_does_not_open_the_breaker(chain, simulator, frozen):
    _, url = simulator
    payload_rows(chain, ["zz-not-hex", "ff00", (b"\xff\xfe").hex(), hex_json([1, 2]), hex_json({"a": 1})])
    with make_decoder(url, threshold=2) as decoder:
        counts = enrichment_run_once(chain=chain, decoder=decoder, concurrency=1)
        assert (counts["undecodable"], counts["ok"]) == (4, 1)
        assert decoder.breaker.state is BreakerState.CLOSED
        bad = Enrichment.objects.filter(chain=chain, status="undecodable")
        assert all(UNDECODABLE_MESSAGE in row.last_error and row.attempts == 1 for row in bad)
        clock.advance(timedelta(days=1))
        assert enrichment_run_once(chain=chain, decoder=decoder)["claimed"] == 0


def test_a_decoder_outage_backs_off_opens_the_breaker_and_the_backlog_drains_after_recovery(
    chain, simulator, frozen
):
    _, url = simulator
    first = payload_rows(chain, [hex_json({"n": i}) for i in range(10)], height=1)
    knobs(url, decoder_outage=True)
    with make_decoder(url, threshold=3, cooldown=30) as decoder:
        # 1. Three real failures open the breaker; the other seven are released untouched.
        counts = enrichment_run_once(chain=chain, decoder=decoder, concurrency=1)
        assert (counts["claimed"], counts["retrying"], counts["released"]) == (10, 3, 7)
        assert counts["breaker_open"] == 1 and decode_requests(url) == 3
        retrying = Enrichment.objects.filter(chain=chain, status="retrying")
        assert {r.id for r in retrying} == set(first[:3])
        for row in retrying:
            # attempt 1: full jitter under the 10 s base, at least the 1 s floor
            assert row.attempts == 1 and "503" in row.last_error and row.next_attempt_at is not None
            assert T0 + timedelta(seconds=1) <= row.next_attempt_at <= T0 + timedelta(seconds=10)
        released = Enrichment.objects.filter(chain=chain, id__in=first[3:])
        assert {(r.status, r.attempts, r.next_attempt_at) for r in released} == {
            ("pending", 0, T0 + timedelta(seconds=30))
        }

        # 2. While open: no HTTP at all, nothing claimed, and a direct call fails fast.
        clock.advance(timedelta(seconds=15))
        counts = enrichment_run_once(chain=chain, decoder=decoder)
        assert (counts["claimed"], counts["breaker_open"]) == (0, 1)
        with pytest.raises(BreakerOpen, match=BREAKER_OPEN_MESSAGE):
            decoder.decode(hex_json({}))
        assert decode_requests(url) == 3

        # 3. Ingest keeps adding rows: the backlog grows.
        payload_rows(chain, [hex_json({"m": i}) for i in range(5)], height=2)
        backlog = enrichment_backlog(chain=chain)
        assert backlog["pending"] + backlog["retrying"] == 15 and "ok" not in backlog

        # 4. After the cool-down one probe goes out; it fails and the breaker opens again.
        clock.advance(timedelta(seconds=16))
        counts = enrichment_run_once(chain=chain, decoder=decoder, concurrency=4)
        assert decode_requests(url) == 4 and counts["retrying"] == 1 and counts["breaker_open"] == 1
        assert counts["released"] == counts["claimed"] - 1

        # 5. The decoder recovers: the next probe closes the breaker and everything drains to ok.
        knobs(url, decoder_outage=False)
        clock.advance(timedelta(seconds=60))
        counts = enrichment_run_once(chain=chain, decoder=decoder, concurrency=4)
        assert counts["ok"] == 15 and decoder.breaker.state is BreakerState.CLOSED
    assert statuses(chain) == {"pending": 0, "ok": 15, "retrying": 0, "failed": 0, "undecodable": 0}
    assert decode_requests(url) == 4 + 15
    for row in Enrichment.objects.filter(chain=chain, id__in=first[:3]):
        assert row.decoded == {"n": first.index(row.id)} and row.last_error == ""


def test_a_row_fails_after_max_attempts_and_is_no_longer_claimed(chain, simulator, frozen):
    _, url = simulator
    [row_id] = payload_rows(chain, [hex_json({"x": 1})])
    knobs(url, decoder_outage=True)
    with make_decoder(url, threshold=100) as decoder:
        for attempt in (1, 2):
            counts = enrichment_run_once(chain=chain, decoder=decoder, max_attempts=3)
            assert counts["retrying"] == 1
            assert Enrichment.objects.get(pk=row_id).attempts == attempt
            clock.advance(timedelta(hours=2))  # past the capped backoff
        counts = enrichment_run_once(chain=chain, decoder=decoder, max_attempts=3)
        assert counts["failed"] == 1
        row = Enrichment.objects.get(pk=row_id)
        assert (row.status, row.attempts, row.next_attempt_at) == ("failed", 3, None)
        clock.advance(timedelta(days=1))
        assert enrichment_run_once(chain=chain, decoder=decoder)["claimed"] == 0
    assert decode_requests(url) == 3


def test_the_backlog_lists_every_status_and_leaves_ok_out_unless_asked(chain, frozen):
    ids = payload_rows(chain, [hex_json({"i": i}) for i in range(4)])
    Enrichment.objects.filter(pk=ids[0]).update(status="ok")
    Enrichment.objects.filter(pk=ids[1]).update(status="failed")
    assert enrichment_backlog(chain=chain) == {"pending": 2, "retrying": 0, "failed": 1, "undecodable": 0}
    assert enrichment_backlog(chain=chain, include_ok=True)["ok"] == 1


# --- concurrency and crashes --------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_two_workers_on_separate_connections_decode_every_row_exactly_once(chain, simulator):
    _, url = simulator
    total = 240
    payload_rows(chain, [hex_json({"n": i}) for i in range(total)])
    start = threading.Barrier(2)
    results: dict[str, list[dict[str, int]]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            with DecoderClient(url, timeout=5) as decoder:
                start.wait(10)
                while True:
                    counts = enrichment_run_once(chain=chain, decoder=decoder, limit=12, concurrency=4)
                    results[name].append(counts)
                    if counts["claimed"] == 0:
                        return
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(name,)) for name in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    per_worker = {name: sum(c["ok"] for c in rounds) for name, rounds in results.items()}
    assert per_worker["a"] > 0 and per_worker["b"] > 0  # both really worked the same rows
    assert per_worker["a"] + per_worker["b"] == total
    assert sum(c["race_lost"] for rounds in results.values() for c in rounds) == 0
    assert decode_requests(url) == total  # no row was decoded twice
    assert statuses(chain)["ok"] == total
    assert set(Enrichment.objects.filter(chain=chain).values_list("attempts", flat=True)) == {1}


def test_a_dead_workers_claim_comes_back_after_the_lease_and_its_late_verdict_is_refused(
    chain, simulator, frozen
):
    _, url = simulator
    payload_rows(chain, [hex_json({"n": i}) for i in range(3)])
    dead = enrichment_claim(chain=chain, limit=10, lease_seconds=60)  # committed, then the worker died
    assert len(dead.rows) == 3
    with make_decoder(url) as decoder:
        clock.advance(timedelta(seconds=59))
        assert enrichment_run_once(chain=chain, decoder=decoder, lease_seconds=60)["claimed"] == 0
        clock.advance(timedelta(seconds=2))
        counts = enrichment_run_once(chain=chain, decoder=decoder, lease_seconds=60)
        assert (counts["claimed"], counts["ok"]) == (3, 3)
    assert decode_requests(url) == 3

    late = enrichment_record(
        chain=chain, claim=dead, verdicts=[Verdict(row, "unavailable", error="late") for row in dead.rows]
    )
    assert late["race_lost"] == 3 and late["retrying"] == 0
    assert statuses(chain)["ok"] == 3
    assert set(Enrichment.objects.filter(chain=chain).values_list("attempts", "last_error")) == {(1, "")}


def test_rows_deleted_by_a_rollback_while_decoding_are_a_lost_race_not_an_error(chain, simulator, frozen):
    _, url = simulator
    payload_rows(chain, [hex_json({"n": 1})], height=7)
    claim = enrichment_claim(chain=chain, limit=10)
    Enrichment.objects.filter(chain=chain, height__gt=6).delete()
    with make_decoder(url) as decoder:
        verdicts = enrichment.enrichment_decode(decoder=decoder, rows=claim.rows)
    counts = enrichment_record(chain=chain, claim=claim, verdicts=verdicts)
    assert (counts["ok"], counts["race_lost"]) == (0, 1)
    assert not Enrichment.objects.exists()


# --- the decoder client -------------------------------------------------------------------------------


def test_the_breaker_fails_fast_and_lets_one_probe_through_after_the_cooldown(simulator, frozen):
    _, url = simulator
    knobs(url, decoder_outage=True)
    with make_decoder(url, threshold=2, cooldown=30) as decoder:
        for _ in range(2):
            with pytest.raises(DecoderUnavailable):
                decoder.decode(hex_json({"a": 1}))
        assert decoder.breaker.state is BreakerState.OPEN
        with pytest.raises(BreakerOpen):
            decoder.decode(hex_json({"a": 1}))
        assert decode_requests(url) == 2

        clock.advance(timedelta(seconds=30))
        assert decoder.breaker.state is BreakerState.HALF_OPEN
        assert decoder.breaker.allow() is True  # the probe slot...
        assert decoder.breaker.allow() is False  # ...is taken while the probe is in flight
        decoder.breaker.record_failure()
        assert decoder.breaker.state is BreakerState.OPEN

        clock.advance(timedelta(seconds=30))
        knobs(url, decoder_outage=False)
        assert decoder.decode(hex_json({"a": 1})) == {"a": 1}
        assert decoder.breaker.state is BreakerState.CLOSED
        with pytest.raises(Undecodable):
            decoder.decode("zz")
    assert decode_requests(url) == 4


def test_an_unreachable_decoder_is_unavailable_not_undecodable():
    with DecoderClient("http://127.0.0.1:9", timeout=1) as decoder, pytest.raises(DecoderUnavailable):
        decoder.decode(hex_json({"a": 1}))


# --- the loop and the beat task -----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_enrich_only_loop_drains_rows_until_stopped(chain, simulator):
    _, url = simulator
    payload_rows(chain, [hex_json({"n": i}) for i in range(30)])
    stop = threading.Event()
    rounds: list[dict[str, int]] = []

    def on_round(counts: dict[str, int]) -> None:
        rounds.append(counts)
        if sum(r["ok"] for r in rounds) >= 30:
            stop.set()

    def run() -> None:
        try:
            enrichment_loop(
                chain=Chain.objects.get(pk=chain.pk),
                stop=stop,
                decoder_factory=lambda: DecoderClient(url, timeout=5),
                poll=0.05,
                on_round=on_round,
                limit=10,
            )
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    stop.set()
    assert not thread.is_alive()
    assert statuses(chain)["ok"] == 30
    assert Heartbeat.objects.get(name="indexer.enrich.sim").failures == 0


def test_the_beat_task_enriches_enabled_chains_once_and_is_safe_to_run_again(chain, simulator, org):
    _, url = simulator
    paused = Chain.objects.create(org=org, slug="paused", chain_id="other", enrichment_enabled=False)
    SyncSource.objects.create(chain=paused, name="primary", rpc_url=url)
    payload_rows(chain, [hex_json({"n": i}) for i in range(5)])
    payload_rows(paused, [hex_json({"n": i}) for i in range(5)])

    totals = enrich()
    assert list(totals) == ["sim"] and totals["sim"]["ok"] == 5
    assert statuses(chain)["ok"] == 5
    assert statuses(paused)["pending"] == 5
    assert Heartbeat.objects.get(name="indexer.enrich.sim").last_success_at is not None
    assert enrich()["sim"]["claimed"] == 0
    assert decode_requests(url) == 5


def test_the_enrich_schedule_is_declared_with_expiry_under_its_period():
    [declared] = [s for s in schedules.declared() if s.name == "indexer.enrich"]
    assert declared.task == enrich.name == "indexer.tasks.enrich"
    assert declared.expires_seconds < declared.every_seconds


def test_enrichment_rows_come_back_in_claim_order_oldest_due_first(chain, frozen):
    late = payload_rows(chain, [hex_json({"n": 1})], height=1)
    clock.advance(timedelta(seconds=-60))
    early = payload_rows(chain, [hex_json({"n": 2})], height=2)
    Enrichment.objects.filter(pk=early[0]).update(next_attempt_at=None)  # e.g. an operator re-queue
    clock.advance(timedelta(seconds=60))
    claim = enrichment_claim(chain=chain, limit=1)
    assert [r.id for r in claim.rows] == early
    assert [r.id for r in enrichment_claim(chain=chain, limit=5).rows] == late
