from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection, transaction

from fleetops.lib import clock
from fleetops.observability.heartbeats import heartbeat_beat, heartbeat_scope
from fleetops.observability.leases import (
    LeaseLost,
    lease_acquire,
    lease_assert_held,
    lease_release,
    lease_renew,
)
from fleetops.observability.models import Heartbeat, Lease

TTL = timedelta(seconds=30)


@pytest.mark.django_db
def test_heartbeats_count_beats_and_failures_and_keep_the_last_success():
    t0 = clock.now()
    with clock.frozen(t0):
        heartbeat_beat(name="loop", ok=True, duration=0.1)
    with clock.frozen(t0 + timedelta(seconds=5)), pytest.raises(RuntimeError), heartbeat_scope("loop"):
        raise RuntimeError("tick failed")
    hb = Heartbeat.objects.get(name="loop")
    assert (hb.beats, hb.failures) == (2, 1)
    assert hb.last_success_at == t0
    assert hb.last_beat_at == t0 + timedelta(seconds=5)
    assert "tick failed" in hb.last_error


@pytest.mark.django_db
def test_a_live_lease_is_refused_to_others_and_renewed_for_its_holder():
    first = lease_acquire(name="writer", holder="a", ttl=TTL)
    assert first is not None and first.token == 1
    assert lease_acquire(name="writer", holder="b", ttl=TTL) is None
    again = lease_acquire(name="writer", holder="a", ttl=TTL)
    assert again is not None and again.token == 1
    assert lease_renew(grant=first, ttl=TTL) is not None


@pytest.mark.django_db
def test_an_expired_lease_changes_hands_with_a_new_fencing_token():
    old = lease_acquire(name="writer", holder="a", ttl=TTL)
    assert old is not None
    with clock.frozen(clock.now() + TTL + timedelta(seconds=1)):
        new = lease_acquire(name="writer", holder="b", ttl=TTL)
        assert new is not None and new.token == old.token + 1
        assert lease_renew(grant=old, ttl=TTL) is None
        with pytest.raises(LeaseLost), transaction.atomic():
            lease_assert_held(name="writer", token=old.token)
        with transaction.atomic():
            lease_assert_held(name="writer", token=new.token)


@pytest.mark.django_db
def test_release_lets_a_standby_in_at_once():
    grant = lease_acquire(name="writer", holder="a", ttl=TTL)
    assert grant is not None
    assert lease_release(grant=grant)
    taken = lease_acquire(name="writer", holder="b", ttl=TTL)
    assert taken is not None and taken.token == 2


@pytest.mark.django_db(transaction=True)
def test_a_takeover_waits_for_the_old_holders_fenced_commit():
    """The old leader holds FOR SHARE on the lease row inside its write transaction; a takeover on
    another connection blocks until that transaction ends, so the two never overlap."""
    grant = lease_acquire(name="writer", holder="old", ttl=timedelta(seconds=1))
    events: list[str] = []
    in_txn, done = threading.Event(), threading.Event()

    def old_leader():
        try:
            with transaction.atomic():
                lease_assert_held(name="writer", token=grant.token)
                in_txn.set()
                time.sleep(1.5)  # the lease expires while we are still inside the fenced transaction
                events.append("old committed")
        finally:
            connection.close()
            done.set()

    def new_leader():
        try:
            in_txn.wait(5)
            time.sleep(1.1)
            taken = lease_acquire(name="writer", holder="new", ttl=TTL)
            events.append(f"new acquired {taken.token if taken else None}")
        finally:
            connection.close()

    threads = [threading.Thread(target=old_leader), threading.Thread(target=new_leader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)

    assert events == ["old committed", "new acquired 2"]
    assert Lease.objects.get(name="writer").holder == "new"


@pytest.mark.django_db(transaction=True)
def test_assert_held_refuses_to_run_outside_a_transaction():
    grant = lease_acquire(name="w", holder="a", ttl=TTL)
    with pytest.raises(RuntimeError, match="inside the write transaction"):
        lease_assert_held(name="w", token=grant.token)
