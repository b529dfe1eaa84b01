"""Several re-stake workers in separate processes, and a worker killed between claim and broadcast."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta

import pytest
from django.db import connection

from fleetops.audit.actors import Actor
from fleetops.lib import clock
from migrations_app.keys.schedule import restake_tick
from migrations_app.keys.selectors import KeyFilter
from migrations_app.keys.services import key_migrate_to_group
from migrations_app.keys.verification import verify_tick
from migrations_app.models.keys import Key, OrgKeyConfig, StakeTransaction
from simulators.chain.server import serve_in_thread
from tests.migrations_app.keys_fixtures import make_group, make_keys
from tests.processes import ROOT, subprocess_env
from tests.servers import wait_for

pytestmark = pytest.mark.slow


def _migrate(member, keys, target):
    key_migrate_to_group(
        org=member.org,
        actor=Actor.for_user(member.user),
        target_group_id=target.pk,
        flt=KeyFilter(key_ids=tuple(k.pk for k in keys)),
    )


def _double_pending() -> list[tuple[int, int]]:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT key_id, count(*) FROM {StakeTransaction._meta.db_table} "
            "WHERE status = 'pending' GROUP BY key_id HAVING count(*) > 1"
        )
        return list(cursor.fetchall())


@pytest.mark.django_db(transaction=True)
def test_three_workers_on_a_flaky_chain_count_every_attempt_once_and_never_broadcast_twice(operator):
    server, sim, url = serve_in_thread(seed=11, txs_per_block=1, block_interval=0.1)
    sim.set_knobs({"error_rate": 0.15, "broadcast_reject_rate": 0.2, "broadcast_fail_rate": 0.1})
    try:
        OrgKeyConfig.objects.create(org=operator.org, rpc_url=url, max_attempts=6)
        source, target = make_group(operator.org, "a"), make_group(operator.org, "b", ["base"])
        keys = make_keys(operator.org, 40, group=source)
        _migrate(operator, keys, target)
        env = subprocess_env(
            KEYS_BACKOFF_BASE_SECONDS="1",
            KEYS_BACKOFF_CAP_SECONDS="2",
            KEYS_TX_EXPIRATION_BLOCKS="15",
            KEYS_VERIFY_BACKOFF_SECONDS="1",
            KEYS_VERIFY_MIN_GAP_SECONDS="0",
            KEYS_CLAIM_LEASE_SECONDS="5",
        )
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "manage.py",
                    "keys_restake",
                    "--loop",
                    "--interval",
                    "0.2",
                    "--with-verify",
                    "--batch-size",
                    "7",
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for _ in range(3)
        ]
        doubles: list[tuple[int, int]] = []
        deadline = time.monotonic() + 90
        try:
            while time.monotonic() < deadline:
                doubles += _double_pending()
                open_keys = Key.objects.filter(migration_status__in=("scheduled", "retrying")).count()
                if not open_keys:
                    break
                time.sleep(0.3)
        finally:
            for proc in workers:
                proc.send_signal(signal.SIGTERM)
            for proc in workers:
                proc.wait(30)
        errors = [proc.stderr.read().decode() for proc in workers if proc.stderr]
        assert all(proc.returncode == 0 for proc in workers), errors
    finally:
        server.shutdown()

    assert not doubles
    final = {k.pk: k for k in Key.objects.all()}
    assert {k.migration_status for k in final.values()} <= {"succeeded", "failed"}, Counter(
        k.migration_status for k in final.values()
    )
    assert any(k.migration_attempts > 1 for k in final.values())  # the chain did fail some attempts
    rows = Counter(StakeTransaction.objects.values_list("key_id", flat=True))
    for key in final.values():
        # Every counted attempt has exactly one transaction row (round 1: no operator retries).
        assert rows[key.pk] == key.migration_attempts, key
    broadcast = Counter(
        (p["key_id"], p["round"], p["attempt"]) for p in (json.loads(raw) for raw in sim.broadcast_log)
    )
    # One transaction per attempt: sent once, plus at most one re-send of the very same bytes when
    # the first send's outcome was lost.
    assert broadcast and max(broadcast.values()) <= 2
    assert len(set(sim.broadcast_log)) == len(broadcast)
    stored = set(StakeTransaction.objects.values_list("key_id", "round", "attempt"))
    assert set(broadcast) <= stored


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_after_claiming_and_before_broadcasting_is_recovered(operator):
    server, sim, url = serve_in_thread(seed=5, txs_per_block=1)
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    try:
        OrgKeyConfig.objects.create(org=operator.org, rpc_url=f"http://127.0.0.1:{hole.getsockname()[1]}")
        source, target = make_group(operator.org, "a"), make_group(operator.org, "b")
        keys = make_keys(operator.org, 4, group=source)
        _migrate(operator, keys, target)
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "keys_restake", "--once"],
            cwd=ROOT,
            env=subprocess_env(KEYS_RPC_TIMEOUT_SECONDS="60"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for(lambda: StakeTransaction.objects.count() == 4, timeout=60, what="the four claims")
        # Claimed and committed; the next thing it does is ask the chain (the hole) for /status.
        # Its connection arriving means it is now waiting there, before any broadcast.
        hole.settimeout(60)
        waiting, _ = hole.accept()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        waiting.close()
        assert set(StakeTransaction.objects.values_list("broadcast_state", flat=True)) == {"claimed"}
        assert set(Key.objects.values_list("migration_attempts", flat=True)) == {1}

        OrgKeyConfig.objects.filter(org=operator.org).update(rpc_url=url)
        with clock.frozen(clock.now() + timedelta(seconds=130)):
            result = restake_tick()
            assert (result.recovered, result.sent, result.claimed) == (4, 4, 0)
            sim.produce(3)
            clock.advance(timedelta(seconds=10))
            verify_tick()
    finally:
        hole.close()
        server.shutdown()
    assert set(Key.objects.values_list("migration_status", flat=True)) == {"succeeded"}
    assert set(Key.objects.values_list("migration_attempts", flat=True)) == {1}  # counted once
    sent = Counter((p["key_id"], p["attempt"]) for p in map(json.loads, sim.broadcast_log))
    assert sorted(sent.values()) == [1, 1, 1, 1]
