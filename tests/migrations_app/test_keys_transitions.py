"""Generated from the key machines: every (from, to) pair is either reached through a named service
(and audited where the machine's docs say so) or refused by the kernel without a write."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from migrations_app.keys.outcomes import (
    LookupResult,
    Lost,
    Unsettled,
    stake_txs_mark_resending,
    stake_txs_mark_unknown,
    stake_txs_record_resends,
)
from migrations_app.keys.schedule import (
    Claim,
    RestakeResult,
    _Prepared,
    stake_txs_mark_broadcasting,
    stake_txs_record_broadcasts,
)
from migrations_app.keys.selectors import KeyFilter
from migrations_app.keys.services import (
    KeyAction,
    Verdict,
    key_migrate_to_group,
    key_migration_retry,
    keys_cooldown_reset,
    stake_txs_resolve,
)
from migrations_app.models.keys import (
    BROADCAST_MACHINE,
    KEY_MIGRATION_MACHINE,
    STAKE_TX_MACHINE,
    BroadcastState,
    Key,
    StakeTransaction,
    StakeTxStatus,
)
from migrations_app.models.keys import KeyMigrationStatus as S
from tests.migrations_app.keys_fixtures import make_group, make_keys
from tests.transitions import assert_refused_without_write, edge_keys, pair_params, set_state

pytestmark = pytest.mark.django_db
ENGINE = Actor.scheduler("test.engine")


class World:
    """One organization with an operator, two groups and a key to move around."""

    def __init__(self, operator: Any) -> None:
        self.org = operator.org
        self.actor = Actor.for_user(operator.user)
        self.source, self.target = make_group(self.org, "a"), make_group(self.org, "b")
        [self.key] = make_keys(self.org, 1, group=self.source)

    def in_flight(self, status: str, *, attempts: int = 1, max_attempts: int = 3) -> StakeTransaction:
        """The key in `status` with attempt `attempts` claimed and its transaction pending."""
        set_state(
            self.key,
            KEY_MIGRATION_MACHINE,
            status,
            migration_round=1,
            migration_attempts=attempts,
            migration_max_attempts=max_attempts,
            migration_next_attempt_at=None,
        )
        now = clock.now()
        return StakeTransaction.objects.create(
            key=self.key, round=1, attempt=attempts, hash="ab" * 32, claimed_at=now, created_at=now
        )

    # --- the named services, one per edge ----------------------------------------------------

    def migrate(self, source: str) -> None:
        set_state(self.key, KEY_MIGRATION_MACHINE, source)
        key_migrate_to_group(
            org=self.org,
            actor=self.actor,
            target_group_id=self.target.pk,
            flt=KeyFilter(key_ids=(self.key.pk,)),
            reason="move",
        )

    def retry(self, source: str) -> None:
        set_state(self.key, KEY_MIGRATION_MACHINE, source, migration_attempts=3, migration_max_attempts=3)
        key_migration_retry(key=self.key, actor=self.actor, reason="fixed")

    def verdict(self, source: str, *, success: bool, attempts: int = 1, max_attempts: int = 3) -> None:
        tx = self.in_flight(source, attempts=attempts, max_attempts=max_attempts)
        stake_txs_resolve(verdicts=[Verdict(tx_id=tx.pk, success=success, message="m")], actor=ENGINE)


def key_services(w: World) -> dict[tuple[str, str], tuple[Callable[[], None], str]]:
    """(from, to) -> (the service call that takes the edge, the audit action it writes)."""
    succeed = lambda s: lambda: w.verdict(s, success=True)  # noqa: E731
    fail_again = lambda s: lambda: w.verdict(s, success=False)  # noqa: E731
    give_up = lambda s: lambda: w.verdict(s, success=False, attempts=3)  # noqa: E731
    return {
        (S.NONE, S.SCHEDULED): (lambda: w.migrate(S.NONE), KeyAction.SCHEDULED),
        (S.SCHEDULED, S.SCHEDULED): (lambda: w.migrate(S.SCHEDULED), KeyAction.SCHEDULED),
        (S.SUCCEEDED, S.SCHEDULED): (lambda: w.migrate(S.SUCCEEDED), KeyAction.SCHEDULED),
        (S.RETRYING, S.SCHEDULED): (lambda: w.retry(S.RETRYING), KeyAction.RETRIED),
        (S.FAILED, S.SCHEDULED): (lambda: w.retry(S.FAILED), KeyAction.RETRIED),
        (S.SCHEDULED, S.SUCCEEDED): (succeed(S.SCHEDULED), KeyAction.SUCCEEDED),
        (S.RETRYING, S.SUCCEEDED): (succeed(S.RETRYING), KeyAction.SUCCEEDED),
        (S.SCHEDULED, S.RETRYING): (fail_again(S.SCHEDULED), KeyAction.ATTEMPT_FAILED),
        (S.RETRYING, S.RETRYING): (fail_again(S.RETRYING), KeyAction.ATTEMPT_FAILED),
        (S.SCHEDULED, S.FAILED): (give_up(S.SCHEDULED), KeyAction.FAILED),
        (S.RETRYING, S.FAILED): (give_up(S.RETRYING), KeyAction.FAILED),
    }


def test_every_key_migration_edge_has_a_service(operator):
    assert set(key_services(World(operator))) == edge_keys(KEY_MIGRATION_MACHINE)


@pytest.mark.parametrize(("source", "target"), pair_params(KEY_MIGRATION_MACHINE))
def test_key_migration_pair(operator, source, target):
    w = World(operator)
    services = key_services(w)
    if (source, target) not in services:
        set_state(w.key, KEY_MIGRATION_MACHINE, source)
        assert_refused_without_write(
            w.key, machine=KEY_MIGRATION_MACHINE, to=target, actor=w.actor, org=w.org
        )
        return
    call, action = services[(source, target)]
    call()
    assert Key.objects.get(pk=w.key.pk).migration_status == target
    audit = AuditEvent.objects.filter(target_type="migrations_app.key", target_id=str(w.key.pk)).latest("id")
    assert (audit.action, audit.changes["migration_status"]) == (action, [source, target])


def test_the_cool_down_reset_takes_the_failed_to_scheduled_edge_as_the_scheduler(operator):
    w = World(operator)
    set_state(
        w.key,
        KEY_MIGRATION_MACHINE,
        S.FAILED,
        migration_attempts=3,
        migration_max_attempts=3,
        migration_updated_at=clock.now().replace(year=2020),
    )
    assert keys_cooldown_reset(cooldown_seconds=60) == 1
    audit = AuditEvent.objects.get(action=KeyAction.AUTO_RESET)
    assert audit.changes["migration_status"] == [S.FAILED, S.SCHEDULED]
    assert (audit.actor_type, audit.target_id) == ("scheduler", str(w.key.pk))


# --- stake transactions ---------------------------------------------------------------------------


def tx_services(w: World) -> dict[tuple[str, str], Callable[[], StakeTransaction]]:
    def resolve(success: bool) -> Callable[[], StakeTransaction]:
        def call() -> StakeTransaction:
            tx = w.in_flight(S.SCHEDULED)
            stake_txs_resolve(verdicts=[Verdict(tx_id=tx.pk, success=success)], actor=ENGINE)
            return tx

        return call

    return {
        (StakeTxStatus.PENDING, StakeTxStatus.SUCCESS): resolve(True),
        (StakeTxStatus.PENDING, StakeTxStatus.FAILURE): resolve(False),
    }


def test_every_stake_tx_edge_has_a_service(operator):
    assert set(tx_services(World(operator))) == edge_keys(STAKE_TX_MACHINE)


@pytest.mark.parametrize(("source", "target"), pair_params(STAKE_TX_MACHINE))
def test_stake_tx_pair(operator, source, target):
    w = World(operator)
    services = tx_services(w)
    if (source, target) in services:
        tx = services[(source, target)]()
        tx.refresh_from_db()
        assert tx.status == target and tx.resolved_at is not None
        return
    tx = w.in_flight(S.SCHEDULED)
    set_state(
        tx, STAKE_TX_MACHINE, source, resolved_at=None if source == StakeTxStatus.PENDING else clock.now()
    )
    assert_refused_without_write(tx, machine=STAKE_TX_MACHINE, to=target, actor=ENGINE, org=None)


# --- broadcast ------------------------------------------------------------------------------------


def _prepared(tx: StakeTransaction) -> _Prepared:
    claim = Claim(tx_id=tx.pk, key_id=tx.key_id, round=tx.round, attempt=tx.attempt)
    return _Prepared(claim=claim, raw=b"", hash="cd" * 32, payload={"k": 1}, height=10, timeout=40)


def broadcast_services(w: World) -> dict[tuple[str, str], Callable[[], StakeTransaction]]:
    def mark() -> StakeTransaction:
        tx = w.in_flight(S.SCHEDULED)
        StakeTransaction.objects.filter(pk=tx.pk).update(claim_token="mine")
        assert stake_txs_mark_broadcasting([_prepared(tx)], token="mine") == {tx.pk}
        tx.refresh_from_db()
        assert (tx.hash, tx.payload, tx.execution_height, tx.timeout_height) == ("cd" * 32, {"k": 1}, 10, 40)
        return tx

    def sent() -> StakeTransaction:
        tx = w.in_flight(S.SCHEDULED)
        set_state(tx, BROADCAST_MACHINE, BroadcastState.BROADCASTING)
        stake_txs_record_broadcasts([(_prepared(tx), "sent", None, "")], RestakeResult())
        return tx

    def unsettled(tx: StakeTransaction, state: str) -> Unsettled:
        return Unsettled(tx.pk, tx.key_id, tx.round, tx.attempt, state, tx.hash, {}, 40, "")

    def lost() -> StakeTransaction:
        tx = w.in_flight(S.SCHEDULED)
        set_state(tx, BROADCAST_MACHINE, BroadcastState.BROADCASTING)
        assert stake_txs_mark_unknown([Lost(tx.pk, tx.key_id, 1, 1, tx.hash, "reset")]) == {tx.pk}
        return tx

    def resending() -> StakeTransaction:
        tx = w.in_flight(S.SCHEDULED)
        set_state(tx, BROADCAST_MACHINE, BroadcastState.UNKNOWN, claim_token="mine")
        assert stake_txs_mark_resending([unsettled(tx, BroadcastState.UNKNOWN)], token="mine") == {tx.pk}
        return tx

    def resent() -> StakeTransaction:
        tx = w.in_flight(S.SCHEDULED)
        set_state(tx, BROADCAST_MACHINE, BroadcastState.RESENDING)
        result = LookupResult()
        stake_txs_record_resends(
            [(unsettled(tx, BroadcastState.RESENDING), "accepted", None, "")], result, []
        )
        assert result.resend_accepted == 1
        return tx

    return {
        (BroadcastState.CLAIMED, BroadcastState.BROADCASTING): mark,
        (BroadcastState.BROADCASTING, BroadcastState.SENT): sent,
        (BroadcastState.BROADCASTING, BroadcastState.UNKNOWN): lost,
        (BroadcastState.UNKNOWN, BroadcastState.RESENDING): resending,
        (BroadcastState.RESENDING, BroadcastState.SENT): resent,
    }


def test_every_broadcast_edge_has_a_service(operator):
    assert set(broadcast_services(World(operator))) == edge_keys(BROADCAST_MACHINE)


@pytest.mark.parametrize(("source", "target"), pair_params(BROADCAST_MACHINE))
def test_broadcast_pair(operator, source, target):
    w = World(operator)
    services = broadcast_services(w)
    if (source, target) in services:
        tx = services[(source, target)]()
        tx.refresh_from_db()
        assert tx.broadcast_state == target
        return
    tx = w.in_flight(S.SCHEDULED)
    set_state(tx, BROADCAST_MACHINE, source)
    assert_refused_without_write(tx, machine=BROADCAST_MACHINE, to=target, actor=ENGINE, org=None)


def test_a_row_another_worker_holds_is_not_re_sent_by_the_old_holder(operator):
    w = World(operator)
    tx = w.in_flight(S.SCHEDULED)
    set_state(tx, BROADCAST_MACHINE, BroadcastState.UNKNOWN, claim_token="new-holder")
    row = Unsettled(tx.pk, tx.key_id, 1, 1, BroadcastState.UNKNOWN, tx.hash, {}, 40, "")
    assert stake_txs_mark_resending([row], token="old-holder") == set()
    tx.refresh_from_db()
    assert tx.broadcast_state == BroadcastState.UNKNOWN


def test_a_claim_taken_over_is_not_marked_broadcasting_by_its_old_holder(operator):
    w = World(operator)
    tx = w.in_flight(S.SCHEDULED)
    StakeTransaction.objects.filter(pk=tx.pk).update(claim_token="new-holder")
    assert stake_txs_mark_broadcasting([_prepared(tx)], token="old-holder") == set()
    tx.refresh_from_db()
    assert (tx.broadcast_state, tx.hash) == (BroadcastState.CLAIMED, "ab" * 32)
