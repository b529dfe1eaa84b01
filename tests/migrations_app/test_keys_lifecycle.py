"""The whole re-stake lifecycle against the chain simulator over loopback HTTP."""

from __future__ import annotations

import json
import logging
from datetime import timedelta

import pytest

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.lib.errors import Forbidden
from fleetops.notifications.models import DeliveryStatus, NotificationChannel, NotificationDelivery
from fleetops.notifications.services import deliveries_send_pending, notification_channel_save
from migrations_app.keys.schedule import claim_batch, new_token, restake_tick
from migrations_app.keys.selectors import KeyFilter, migration_label
from migrations_app.keys.services import FAILED_EVENT, key_migrate_to_group, key_migration_retry
from migrations_app.keys.verification import verify_tick
from migrations_app.models.keys import (
    BroadcastState,
    Key,
    OrgKeyConfig,
    RemediationEntry,
    StakeTransaction,
)
from tests.migrations_app.keys_fixtures import make_group, make_keys

pytestmark = pytest.mark.django_db
T0 = clock.now().replace(microsecond=0)


def migrate(member, keys, target):
    return key_migrate_to_group(
        org=member.org,
        actor=Actor.for_user(member.user),
        target_group_id=target.pk,
        flt=KeyFilter(key_ids=tuple(k.pk for k in keys)),
    )


def statuses(keys):
    return sorted(Key.objects.filter(pk__in=[k.pk for k in keys]).values_list("migration_status", flat=True))


def outcomes(key):
    return list(RemediationEntry.objects.filter(key=key).order_by("id").values_list("outcome", flat=True))


def step(seconds=10):
    clock.advance(timedelta(seconds=seconds))


@pytest.fixture
def groups(org):
    return make_group(org, "us-east"), make_group(org, "eu-west", ["anvil", "base"])


def test_a_tx_landing_three_blocks_after_broadcast_ends_succeeded(operator, wired, groups):
    source, target = groups
    keys = make_keys(operator.org, 3, group=source)
    wired.knobs(broadcast_delay_blocks=3)
    with clock.frozen(T0):
        migrate(operator, keys, target)
        assert statuses(keys) == ["scheduled"] * 3
        broadcast_head = wired.head
        result = restake_tick()
        assert (result.claimed, result.sent) == (3, 3)
        key = Key.objects.get(pk=keys[0].pk)
        assert key.migration_attempts == 1 and key.in_flight
        assert migration_label(key) == "Scheduled — in flight"
        for _ in range(2):  # two passes that see the tx absent: coverage moves on, nothing fails
            wired.produce(1)
            step()
            checked = verify_tick()
            assert (checked.checked, checked.absent, checked.confirmed) == (3, 3, 0)
        assert statuses(keys) == ["scheduled"] * 3
        assert set(StakeTransaction.objects.values_list("last_covered_height", flat=True)) == {
            broadcast_head + 2
        }
        wired.produce(1)
        step()
        landed = verify_tick()
    assert landed.confirmed == 3 and landed.succeeded == 3
    assert statuses(keys) == ["succeeded"] * 3
    tx = StakeTransaction.objects.get(key=keys[0])
    assert tx.status == "success" and tx.landed_height == broadcast_head + 3 and tx.code == 0
    assert outcomes(keys[0]) == ["migrated", "broadcast", "succeeded"]
    payload = json.loads(wired.sim.broadcast_log[0])
    assert payload["services"] == ["anvil", "base"]  # the target group's services
    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {"keys.migrated", "keys.migration_succeeded"} <= actions


def test_a_rejected_broadcast_fails_the_attempt_at_once_and_retries_after_backoff(operator, wired, groups):
    source, target = groups
    [key] = make_keys(operator.org, 1, group=source)
    wired.knobs(broadcast_reject_rate=1.0)
    with clock.frozen(T0):
        migrate(operator, [key], target)
        result = restake_tick()
        assert (result.claimed, result.rejected, result.sent) == (1, 1, 0)
        key.refresh_from_db()
        assert key.migration_status == "retrying" and key.migration_attempts == 1
        assert key.migration_next_attempt_at is not None
        assert T0 <= key.migration_next_attempt_at <= T0 + timedelta(seconds=30)  # base 30 s, full jitter
        assert "CheckTx code 13" in key.migration_last_error
        assert migration_label(key).startswith("Retrying #2 of 5 — ")
        tx = StakeTransaction.objects.get(key=key)
        assert (tx.status, tx.code) == ("failure", 13)
        assert AuditEvent.objects.filter(
            action="keys.migration_attempt_failed", target_id=str(key.pk)
        ).exists()

        wired.knobs(broadcast_reject_rate=0.0)
        step(31)
        assert restake_tick().sent == 1
        wired.produce(3)
        step()
        verify_tick()
    key.refresh_from_db()
    assert key.migration_status == "succeeded" and key.migration_attempts == 2
    assert outcomes(key) == ["migrated", "attempt_failed", "broadcast", "succeeded"]


def test_an_rpc_outage_during_verification_never_fails_a_tx_and_backs_off(operator, wired, groups, caplog):
    source, target = groups
    [key] = make_keys(operator.org, 1, group=source)
    with clock.frozen(T0):
        migrate(operator, [key], target)
        restake_tick()
        wired.produce(3)
        wired.knobs(error_rate=1.0)
        step()
        assert verify_tick().unavailable == 1
        tx = StakeTransaction.objects.get(key=key)
        assert tx.status == "pending" and tx.unavailable_checks == 1
        step(10)
        assert verify_tick().checked == 0  # backed off: min(1, 20) x 30 s
        step(25)
        assert verify_tick().unavailable == 1
        StakeTransaction.objects.filter(pk=tx.pk).update(unavailable_checks=49)
        step(20 * 30 + 1)
        with caplog.at_level(logging.CRITICAL, logger="migrations_app.keys.verification"):
            assert verify_tick().unavailable == 1
        assert "unverifiable: 50 consecutive" in caplog.text
        key.refresh_from_db()
        assert key.migration_status == "scheduled"  # still waiting, not failed
        wired.knobs(error_rate=0.0)
        step(20 * 30 + 1)
        assert verify_tick().confirmed == 1
    key.refresh_from_db()
    assert key.migration_status == "succeeded"


def test_a_tx_that_never_lands_fails_only_once_coverage_passes_its_timeout_height(operator, wired, groups):
    source, target = groups
    [key] = make_keys(operator.org, 1, group=source)
    wired.knobs(broadcast_drop_rate=1.0)
    with clock.frozen(T0):
        migrate(operator, [key], target)
        restake_tick()
        tx = StakeTransaction.objects.get(key=key)
        assert tx.execution_height is not None
        assert tx.timeout_height == tx.execution_height + 30
        wired.produce(35)
        step()
        first = verify_tick()
        assert first.absent == 1 and first.expired == 0  # at most 30 blocks per pass
        tx.refresh_from_db()
        assert tx.status == "pending" and tx.last_covered_height == tx.execution_height + 29
        step()
        assert verify_tick().expired == 1
    tx.refresh_from_db()
    key.refresh_from_db()
    assert tx.status == "failure" and "expired" in tx.message
    assert key.migration_status == "retrying"


def test_a_tx_landing_with_a_nonzero_code_fails_the_attempt(operator, wired, groups):
    source, target = groups
    [key] = make_keys(operator.org, 1, group=source)
    wired.knobs(broadcast_fail_rate=1.0)
    with clock.frozen(T0):
        migrate(operator, [key], target)
        restake_tick()
        wired.produce(3)
        step()
        verify_tick()
    key.refresh_from_db()
    assert key.migration_status == "retrying"
    assert key.migration_last_error.startswith("DeliverTx code 11")


def test_exhausted_attempts_fail_the_key_notify_the_org_and_audit_it(
    operator, admin_member, wired, groups, receiver
):
    source, target = groups
    OrgKeyConfig.objects.filter(org=operator.org).update(max_attempts=2)
    actor = Actor.for_user(admin_member.user)
    notification_channel_save(
        org=operator.org,
        actor=actor,
        channel=None,
        values={"name": "hook", "kind": "webhook", "target": receiver.url, "secret": "s3"},
        event_types=[FAILED_EVENT],
    )
    notification_channel_save(
        org=operator.org,
        actor=actor,
        channel=None,
        values={"name": "other", "kind": "webhook", "target": receiver.url},
        event_types=["something.else"],
    )
    [key] = make_keys(operator.org, 1, group=source)
    wired.knobs(broadcast_reject_rate=1.0)
    with clock.frozen(T0):
        migrate(operator, [key], target)
        restake_tick()
        step(31)
        restake_tick()
    key.refresh_from_db()
    assert key.migration_status == "failed" and key.migration_attempts == 2
    assert migration_label(key) == "Failed after 2 attempts"
    assert AuditEvent.objects.filter(action="keys.migration_failed", target_id=str(key.pk)).count() == 1
    delivery = NotificationDelivery.objects.get()
    assert delivery.channel.name == "hook" and delivery.status == DeliveryStatus.PENDING
    with clock.frozen(T0 + timedelta(seconds=60)):
        assert deliveries_send_pending() == 1
    [posted] = receiver.requests
    assert posted["headers"]["X-FleetOps-Event"] == FAILED_EVENT
    assert posted["headers"]["X-FleetOps-Signature"].startswith("sha256=")
    assert posted["json"]["payload"]["keys"][0]["address"] == key.address
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.SENT


def test_a_manual_retry_reschedules_a_failed_key_and_keeps_its_history(operator, viewer, wired, groups):
    source, target = groups
    OrgKeyConfig.objects.filter(org=operator.org).update(max_attempts=1)
    [key] = make_keys(operator.org, 1, group=source)
    wired.knobs(broadcast_reject_rate=1.0)
    with clock.frozen(T0):
        migrate(operator, [key], target)
        restake_tick()
        key.refresh_from_db()
        assert key.migration_status == "failed"
        with pytest.raises(Forbidden):
            key_migration_retry(key=key, actor=Actor.for_user(viewer.user), reason="x")
        key = key_migration_retry(key=key, actor=Actor.for_user(operator.user), reason="fee bumped")
        assert (key.migration_status, key.migration_attempts, key.migration_manual_retries) == (
            "scheduled",
            0,
            1,
        )
        assert key.migration_round == 2
        wired.knobs(broadcast_reject_rate=0.0)
        restake_tick()
        wired.produce(3)
        step()
        verify_tick()
    key.refresh_from_db()
    assert key.migration_status == "succeeded"
    assert outcomes(key) == ["migrated", "failed", "manual_retry", "broadcast", "succeeded"]
    assert StakeTransaction.objects.filter(key=key).count() == 2  # the failed attempt's row is kept
    retried = AuditEvent.objects.get(action="keys.migration_retried")
    assert retried.reason == "fee bumped" and retried.changes["migration_status"] == ["failed", "scheduled"]


def test_the_verdict_of_a_superseded_attempt_never_moves_the_key(operator, wired, groups):
    source, target = groups
    [key] = make_keys(operator.org, 1, group=source)
    with clock.frozen(T0):
        migrate(operator, [key], target)
        restake_tick()
        migrate(operator, [key], source)  # moved back while the first re-stake is in flight
        assert restake_tick().claimed == 0  # one pending tx per key: wait for the old verdict
        wired.produce(3)
        step()
        verify_tick()
        key.refresh_from_db()
        assert key.migration_status == "scheduled" and key.migration_round == 2
        assert outcomes(key)[-1] == "superseded"
        assert restake_tick().sent == 1
        wired.produce(3)
        step()
        verify_tick()
    key.refresh_from_db()
    assert key.migration_status == "succeeded"
    assert json.loads(wired.sim.broadcast_log[-1])["services"] == ["anvil", "eth"]  # the source group


def test_claimed_but_unsent_attempts_are_recovered_after_the_lease_and_sent_once(operator, wired, groups):
    source, target = groups
    keys = make_keys(operator.org, 3, group=source)
    with clock.frozen(T0):
        migrate(operator, keys, target)
        claims = claim_batch(token=new_token(), limit=10)  # a worker that died right after its claim
        assert len(claims) == 3
        assert restake_tick().claimed == 0 and not wired.sim.broadcast_log
        step(121)
        result = restake_tick()
        assert (result.recovered, result.sent) == (3, 3)
        step(5)
        assert restake_tick().recovered == 0
        wired.produce(3)
        step()
        verify_tick()
    assert statuses(keys) == ["succeeded"] * 3
    sent = [(p["key_id"], p["round"], p["attempt"]) for p in map(json.loads, wired.sim.broadcast_log)]
    assert sorted(sent) == sorted((k.pk, 1, 1) for k in keys)
    assert set(StakeTransaction.objects.values_list("broadcast_state", flat=True)) == {BroadcastState.SENT}


def test_a_channel_without_the_subscription_hears_nothing(operator, admin_member):
    channel = notification_channel_save(
        org=operator.org,
        actor=Actor.for_user(admin_member.user),
        channel=None,
        values={"name": "mail", "kind": "email", "target": "ops@example.com"},
        event_types=["other.event"],
    )
    assert NotificationChannel.objects.get(pk=channel.pk).subscriptions.count() == 1
    assert not NotificationDelivery.objects.exists()
