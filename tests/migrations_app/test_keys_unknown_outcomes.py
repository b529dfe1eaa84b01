"""Broadcasts whose outcome was lost to a transport error, against the chain simulator over loopback
HTTP: the hash is looked up before the attempt can fail, a landed tx is a success, a missing one is
re-sent once with the same bytes, and a worker killed in the call is settled by the next pass."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from datetime import timedelta

import pytest

from fleetops.audit.actors import Actor
from fleetops.lib import clock
from indexer.rpc.client import CometRpc, RpcUnavailable, SourceConfig, TxAlreadyKnown, TxNotFound
from migrations_app.keys.chain import rpc_reset
from migrations_app.keys.schedule import restake_tick
from migrations_app.keys.selectors import KeyFilter
from migrations_app.keys.services import key_migrate_to_group
from migrations_app.keys.verification import verify_tick
from migrations_app.models.keys import (
    BroadcastState,
    Key,
    OrgKeyConfig,
    RemediationEntry,
    StakeTransaction,
)
from simulators.chain.server import serve_in_thread
from tests.migrations_app.keys_fixtures import make_group, make_keys
from tests.processes import ROOT, subprocess_env
from tests.servers import wait_for

T0 = clock.now().replace(microsecond=0)


def migrate(member, keys, target):
    key_migrate_to_group(
        org=member.org,
        actor=Actor.for_user(member.user),
        target_group_id=target.pk,
        flt=KeyFilter(key_ids=tuple(k.pk for k in keys)),
    )


def outcomes(key):
    return list(RemediationEntry.objects.filter(key=key).order_by("id").values_list("outcome", flat=True))


def step(seconds=10):
    clock.advance(timedelta(seconds=seconds))


def _hash(raw):
    return hashlib.sha256(raw).hexdigest().upper()


def sends(sim, tx_hash):
    """The broadcast_tx_sync requests with this tx that reached the node (taken or not)."""
    return [raw for raw in sim.broadcast_log if _hash(raw) == tx_hash]


@pytest.fixture
def one_key(operator, wired, org):
    source, target = make_group(org, "us-east"), make_group(org, "eu-west", ["anvil", "base"])
    [key] = make_keys(org, 1, group=source)
    return key, target


pytestmark = pytest.mark.django_db


def test_a_tx_the_node_took_before_the_connection_reset_succeeds_with_no_re_send(operator, wired, one_key):
    key, target = one_key
    wired.knobs(broadcast_hangup_rate=1.0, broadcast_delay_blocks=1)
    with clock.frozen(T0):
        migrate(operator, [key], target)
        first = restake_tick()
        assert (first.claimed, first.sent, first.unknown, first.rejected) == (1, 0, 1, 0)
        tx = StakeTransaction.objects.get(key=key)
        assert (tx.status, tx.broadcast_state) == ("pending", BroadcastState.UNKNOWN)
        key.refresh_from_db()
        assert (key.migration_status, key.migration_attempts, key.in_flight) == ("scheduled", 1, True)

        wired.knobs(broadcast_hangup_rate=0.0)
        wired.produce(1)  # the tx the node took lands
        step()
        second = restake_tick()
        assert (second.lookups.claimed, second.lookups.found, second.lookups.resent) == (1, 1, 0)
        assert second.claimed == 0  # no new attempt
    key.refresh_from_db()
    tx.refresh_from_db()
    assert (key.migration_status, key.migration_attempts) == ("succeeded", 1)
    assert tx.execution_height is not None
    assert (tx.status, tx.code, tx.landed_height) == ("success", 0, tx.execution_height + 1)
    assert len(sends(wired.sim, tx.hash)) == 1  # looked up, never re-sent
    assert outcomes(key) == ["migrated", "outcome_unknown", "succeeded"]


def test_a_timed_out_broadcast_is_looked_up_and_verification_agrees(operator, wired, one_key, settings):
    key, target = one_key
    settings.FLEETOPS_KEYS_RPC_TIMEOUT_SECONDS = 1
    rpc_reset()
    wired.knobs(broadcast_reply_delay_ms=1500, broadcast_delay_blocks=1)
    with clock.frozen(T0):
        migrate(operator, [key], target)
        assert restake_tick().unknown == 1
        wired.knobs(broadcast_reply_delay_ms=0)
        wired.produce(1)
        step()
        # Verification's coverage scan covers an unknown row too; whichever settles it first wins,
        # the other finds nothing left to do.
        checked = verify_tick()
        assert (checked.checked, checked.confirmed, checked.succeeded) == (1, 1, 1)
        assert restake_tick().lookups.claimed == 0
    key.refresh_from_db()
    assert (key.migration_status, key.migration_attempts) == ("succeeded", 1)
    assert len(sends(wired.sim, StakeTransaction.objects.get(key=key).hash)) == 1


def test_a_tx_lost_before_the_node_took_it_is_re_sent_once_with_the_same_bytes(operator, wired, one_key):
    key, target = one_key
    wired.knobs(broadcast_lost_rate=1.0)
    with clock.frozen(T0):
        migrate(operator, [key], target)
        assert restake_tick().unknown == 1
        wired.knobs(broadcast_lost_rate=0.0)
        step()
        second = restake_tick()
        assert (second.lookups.missing, second.lookups.resent, second.lookups.resend_accepted) == (1, 1, 1)
        tx = StakeTransaction.objects.get(key=key)
        assert tx.broadcast_state == BroadcastState.SENT
        step()
        assert restake_tick().lookups.claimed == 0  # sent: verification's now, never sent again
        wired.produce(3)
        step()
        assert verify_tick().succeeded == 1
    key.refresh_from_db()
    assert (key.migration_status, key.migration_attempts) == ("succeeded", 1)
    sent = sends(wired.sim, tx.hash)
    assert len(sent) == 2 and sent[0] == sent[1]  # the same bytes: the same hash
    assert json.loads(sent[1])["attempt"] == 1
    assert StakeTransaction.objects.filter(key=key).count() == 1
    assert outcomes(key) == ["migrated", "outcome_unknown", "resent", "succeeded"]


def test_a_re_send_lost_again_fails_the_attempt_once_and_only_past_the_timeout_height(
    operator, wired, one_key
):
    key, target = one_key
    wired.knobs(broadcast_lost_rate=1.0)
    with clock.frozen(T0):
        migrate(operator, [key], target)
        restake_tick()
        step()
        second = restake_tick()
        assert (second.lookups.resent, second.lookups.resend_unknown) == (1, 1)
        tx = StakeTransaction.objects.get(key=key)
        assert (tx.status, tx.broadcast_state) == ("pending", BroadcastState.RESENDING)
        step(200)  # past the claim lease: the row is looked up again, but never re-sent twice
        third = restake_tick()
        assert (third.lookups.claimed, third.lookups.missing, third.lookups.resent) == (1, 1, 0)
        assert len(sends(wired.sim, tx.hash)) == 2
        key.refresh_from_db()
        assert key.migration_status == "scheduled"  # not failed while the tx could still land

        wired.produce(35)  # past the timeout height
        step()
        verify_tick()
        step()
        assert verify_tick().expired == 1
    key.refresh_from_db()
    tx.refresh_from_db()
    assert tx.status == "failure" and "expired" in tx.message
    assert (key.migration_status, key.migration_attempts) == ("retrying", 1)  # one attempt counted
    assert outcomes(key) == ["migrated", "outcome_unknown", "outcome_unknown", "attempt_failed"]


def test_a_re_send_refused_by_check_tx_fails_the_attempt_at_once(operator, wired, one_key):
    key, target = one_key
    wired.knobs(broadcast_lost_rate=1.0)
    with clock.frozen(T0):
        migrate(operator, [key], target)
        restake_tick()
        wired.knobs(broadcast_lost_rate=0.0, broadcast_reject_rate=1.0)
        step()
        assert restake_tick().lookups.resend_rejected == 1
    key.refresh_from_db()
    tx = StakeTransaction.objects.get(key=key)
    assert (tx.status, tx.code) == ("failure", 13)
    assert (key.migration_status, key.migration_attempts) == ("retrying", 1)


def test_a_tx_missing_past_its_timeout_height_is_not_re_sent(operator, wired, one_key):
    key, target = one_key
    wired.knobs(broadcast_lost_rate=1.0)
    with clock.frozen(T0):
        migrate(operator, [key], target)
        restake_tick()
        wired.knobs(broadcast_lost_rate=0.0)
        wired.produce(31)
        step()
        late = restake_tick()
        assert (late.lookups.missing, late.lookups.not_resent, late.lookups.resent) == (1, 1, 0)
        step()
        assert verify_tick().absent == 1  # at most 30 blocks per pass
        step()
        assert verify_tick().expired == 1
    key.refresh_from_db()
    assert (key.migration_status, key.migration_attempts) == ("retrying", 1)
    assert len(sends(wired.sim, StakeTransaction.objects.get(key=key).hash)) == 1


def test_an_rpc_outage_during_the_lookup_changes_nothing_and_is_asked_again(operator, wired, one_key):
    key, target = one_key
    wired.knobs(broadcast_lost_rate=1.0)
    with clock.frozen(T0):
        migrate(operator, [key], target)
        restake_tick()
        wired.knobs(broadcast_lost_rate=0.0, error_rate=1.0)
        step()
        down = restake_tick()
        assert (down.lookups.claimed, down.lookups.unavailable, down.lookups.resent) == (1, 1, 0)
        assert StakeTransaction.objects.get(key=key).broadcast_state == BroadcastState.UNKNOWN
        wired.knobs(error_rate=0.0)
        step()
        assert restake_tick().lookups.resend_accepted == 1
    assert len(sends(wired.sim, StakeTransaction.objects.get(key=key).hash)) == 2


# --- workers killed in the call ----------------------------------------------------------------------


def _worker(**env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "manage.py", "keys_restake", "--once"],
        cwd=ROOT,
        env=subprocess_env(KEYS_RPC_TIMEOUT_SECONDS="60", **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_waiting_for_the_broadcast_answer_is_settled_by_the_next_pass(operator):
    server, sim, url = serve_in_thread(seed=5, txs_per_block=1)
    rpc_reset()
    try:
        OrgKeyConfig.objects.create(org=operator.org, rpc_url=url)
        source, target = make_group(operator.org, "a"), make_group(operator.org, "b")
        keys = make_keys(operator.org, 3, group=source)
        migrate(operator, keys, target)
        # The node takes each tx, then holds its answer: the worker is in the call when it dies.
        sim.set_knobs({"broadcast_reply_delay_ms": 60_000, "broadcast_delay_blocks": 1})
        proc = _worker()
        wait_for(lambda: len(sim.broadcast_counts) == 3, timeout=60, what="the three broadcasts")
        _kill(proc)
        assert set(StakeTransaction.objects.values_list("broadcast_state", flat=True)) == {
            BroadcastState.BROADCASTING
        }
        sim.set_knobs({"broadcast_reply_delay_ms": 0})
        sim.produce(1)
        with clock.frozen(clock.now() + timedelta(seconds=130)):  # past the claim lease
            first = restake_tick()
            assert (first.lookups.claimed, first.lookups.found, first.lookups.resent) == (3, 3, 0)
            again = restake_tick()  # idempotent: nothing left to settle, nothing claimed
            assert (again.lookups.claimed, again.claimed) == (0, 0)
            assert verify_tick().checked == 0
    finally:
        server.shutdown()
        rpc_reset()
    assert set(Key.objects.values_list("migration_status", "migration_attempts")) == {("succeeded", 1)}
    assert sorted(sim.broadcast_counts.values()) == [1, 1, 1]  # never re-sent: they had landed
    for key in keys:
        assert outcomes(key) == ["migrated", "outcome_unknown", "succeeded"]


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_during_the_one_re_send_is_never_followed_by_a_second(operator):
    server, sim, url = serve_in_thread(seed=6, txs_per_block=1)
    rpc_reset()
    try:
        OrgKeyConfig.objects.create(org=operator.org, rpc_url=url)
        source, target = make_group(operator.org, "a"), make_group(operator.org, "b")
        keys = make_keys(operator.org, 2, group=source)
        migrate(operator, keys, target)
        sim.set_knobs({"broadcast_lost_rate": 1.0})
        assert restake_tick().unknown == 2  # in this process: both lost before the node took them
        rpc_reset()
        sim.set_knobs({"broadcast_lost_rate": 0.0, "broadcast_reply_delay_ms": 60_000})
        proc = _worker(KEYS_LOOKUP_DELAY_SECONDS="0")
        hashes = set(StakeTransaction.objects.values_list("hash", flat=True))
        wait_for(
            lambda: all(sim.broadcast_counts[h] == 2 for h in hashes), timeout=60, what="the two re-sends"
        )
        _kill(proc)
        assert set(StakeTransaction.objects.values_list("broadcast_state", flat=True)) == {
            BroadcastState.RESENDING
        }
        sim.set_knobs({"broadcast_reply_delay_ms": 0})
        # Only the first key's re-send lands before the next pass; the other is still missing.
        with sim.lock:
            first_hash = StakeTransaction.objects.get(key=keys[0]).hash
            sim.pending = [
                (sim.head + (1 if _hash(raw) == first_hash else 100), raw) for _, raw in sim.pending
            ]
        sim.produce(1)
        with clock.frozen(clock.now() + timedelta(seconds=130)):
            settled = restake_tick()
            assert (settled.lookups.found, settled.lookups.missing, settled.lookups.resent) == (1, 1, 0)
    finally:
        server.shutdown()
        rpc_reset()
    statuses = dict(Key.objects.values_list("pk", "migration_status"))
    assert statuses == {keys[0].pk: "succeeded", keys[1].pk: "scheduled"}  # the second waits for coverage
    assert Counter(sim.broadcast_counts.values()) == {2: 2}  # one re-send each, never a third
    assert set(Key.objects.values_list("migration_attempts", flat=True)) == {1}


def test_the_client_tells_a_missing_tx_and_known_bytes_from_an_outage(wired):
    rpc = CometRpc([SourceConfig(name="node", url=wired.url)], attempts=1)
    with pytest.raises(TxNotFound):
        rpc.tx("AB" * 32)
    raw = b'{"type":"stake_supplier","key_id":0}'
    assert rpc.broadcast_tx_sync(raw).code == 0
    with pytest.raises(TxAlreadyKnown):  # pending in the node: the same bytes are not taken twice
        rpc.broadcast_tx_sync(raw)
    wired.produce(3)
    with pytest.raises(TxAlreadyKnown):  # on chain: neither
        rpc.broadcast_tx_sync(raw)
    assert rpc.tx(_hash(raw)).tx == raw
    assert rpc.health()["node"].consecutive_failures == 0  # answers, not a failing source
    wired.knobs(broadcast_lost_rate=1.0)
    with pytest.raises(RpcUnavailable):
        rpc.broadcast_tx_sync(b'{"type":"stake_supplier","key_id":1}')
    assert rpc.health()["node"].consecutive_failures == 1
    rpc.close()
