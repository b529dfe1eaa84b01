from __future__ import annotations

import logging
from datetime import timedelta
from unittest import mock

import pytest
from celery import current_app
from django.db import connection
from django.test.utils import CaptureQueriesContext

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.lib.errors import Conflict, Forbidden, NotFound, ValidationFailed
from fleetops.outbox.metrics import SEND_FAILURES
from fleetops.outbox.models import OutboxMessage, OutboxStatus
from fleetops.outbox.services import outbox_relay
from migrations_app.keys.common import RESTAKE_TASK
from migrations_app.keys.selectors import KeyFilter
from migrations_app.keys.services import (
    SAME_GROUP,
    address_group_delete,
    key_migrate_to_group,
    keys_cooldown_reset,
    keys_migration_retry,
)
from migrations_app.models.keys import Key, RemediationEntry
from tests.migrations_app.keys_fixtures import make_group, make_keys

pytestmark = pytest.mark.django_db


def migrate(member, target, **kwargs):
    flt = kwargs.pop("flt")
    return key_migrate_to_group(
        org=member.org,
        actor=Actor.for_user(member.user),
        target_group_id=target.pk,
        flt=flt,
        **kwargs,
    )


@pytest.fixture
def setup(org):
    source, target = make_group(org, "a"), make_group(org, "b")
    keys = make_keys(org, 6, group=source)
    return source, target, keys


def test_a_dry_run_returns_the_exact_set_and_changes_nothing(operator, setup):
    source, target, keys = setup
    Key.objects.filter(pk=keys[0].pk).update(retired_at=clock.now())
    result = migrate(operator, target, flt=KeyFilter(address_group_id=source.pk), dry_run=True)
    assert result.key_ids == [k.pk for k in keys[1:]]  # retired keys are excluded
    assert not Key.objects.filter(migration_status="scheduled").exists()
    assert not AuditEvent.objects.filter(action="keys.migrated").exists()


def test_migrating_the_dry_run_ids_acts_on_exactly_those_keys(operator, setup, org):
    source, target, _keys = setup
    preview = migrate(operator, target, flt=KeyFilter(address_group_id=source.pk), dry_run=True)
    late = make_keys(org, 1, group=source, start=100)[0]  # matches the filter after the preview
    result = migrate(operator, target, flt=KeyFilter(key_ids=tuple(preview.key_ids)), reason="rebalance")
    assert result.key_ids == preview.key_ids
    late.refresh_from_db()
    assert late.migration_status == "none" and late.address_group_id == source.pk
    moved = Key.objects.filter(pk__in=preview.key_ids)
    assert {(k.address_group_id, k.migration_status, k.migration_attempts) for k in moved} == {
        (target.pk, "scheduled", 0)
    }
    assert RemediationEntry.objects.filter(outcome="migrated").count() == 6
    [audit] = AuditEvent.objects.filter(action="keys.migrated")
    assert audit.metadata["count"] == 6 and audit.reason == "rebalance"
    assert audit.metadata["key_ids"] == preview.key_ids


def test_migration_by_filter_moves_matching_states_and_resets_attention_states(operator, setup):
    source, target, keys = setup
    Key.objects.filter(pk=keys[0].pk).update(state="attention_needed")
    Key.objects.filter(pk=keys[1].pk).update(state="unstaked")
    result = migrate(
        operator, target, flt=KeyFilter(address_group_id=source.pk, states=("attention_needed", "staked"))
    )
    assert keys[1].pk not in result.key_ids and result.count == 5
    assert Key.objects.get(pk=keys[0].pk).state == "staked"


def test_migration_works_in_chunks_of_500_with_a_bounded_number_of_queries(operator, org):
    source, target = make_group(org, "a"), make_group(org, "b")
    keys = make_keys(org, 1200, group=source)
    with CaptureQueriesContext(connection) as queries:
        result = migrate(operator, target, flt=KeyFilter(address_group_id=source.pk))
    assert result.count == len(keys)
    assert len(queries) < 40  # 3 chunks x (lock, update, rounds, history) + fixed cost; not per key


def test_the_target_cannot_be_the_source_group_and_nothing_selected_is_refused(operator, setup):
    source, _, _ = setup
    with pytest.raises(ValidationFailed, match=SAME_GROUP):
        migrate(operator, source, flt=KeyFilter(address_group_id=source.pk))
    with pytest.raises(ValidationFailed):
        migrate(operator, source, flt=KeyFilter())


def test_viewers_cannot_migrate_and_another_orgs_keys_are_not_found(viewer, operator, setup, other_org):
    source, target, keys = setup
    with pytest.raises(Forbidden):
        migrate(viewer, target, flt=KeyFilter(address_group_id=source.pk))
    foreign = make_keys(other_org, 1, group=make_group(other_org, "x"), start=50)
    with pytest.raises(NotFound):
        migrate(operator, target, flt=KeyFilter(key_ids=(keys[0].pk, foreign[0].pk)))
    foreign_group = make_group(other_org, "y")
    with pytest.raises(NotFound):
        migrate(operator, foreign_group, flt=KeyFilter(key_ids=(keys[0].pk,)))


def test_a_failed_kick_is_logged_and_counted_and_the_migration_still_succeeds(
    operator, setup, caplog, django_capture_on_commit_callbacks
):
    source, target, _ = setup
    failures = SEND_FAILURES.labels(task=RESTAKE_TASK, path="immediate")
    before = failures._value.get()
    with (
        mock.patch.object(current_app, "send_task", side_effect=OSError("broker down")) as send,
        caplog.at_level(logging.WARNING),
        django_capture_on_commit_callbacks(execute=True) as after_commit,
    ):
        result = migrate(operator, target, flt=KeyFilter(address_group_id=source.pk))
        # The kick is an outbox message in the migration's transaction, before anything is sent.
        [queued] = OutboxMessage.objects.filter(task=RESTAKE_TASK)
        assert queued.status == OutboxStatus.PENDING and queued.expires_seconds == 25
        assert not send.called
    assert len(after_commit) == 1  # the immediate send, run when the migration committed
    assert result.count == 6
    assert Key.objects.filter(migration_status="scheduled").count() == 6
    assert failures._value.get() == before + 1
    assert "outbox send failed" in caplog.text
    send.assert_called_once_with(RESTAKE_TASK, kwargs={}, expires=25, task_id=mock.ANY)
    queued.refresh_from_db()
    assert queued.status == OutboxStatus.PENDING and queued.attempts == 1
    assert "broker down" in queued.last_error
    # The broker is back: the relay sends the kick, once.
    with (
        clock.frozen(clock.now() + timedelta(minutes=5)),
        mock.patch.object(current_app, "send_task") as send,
    ):
        assert outbox_relay().sent == 1
        assert outbox_relay().sent == 0
    send.assert_called_once_with(RESTAKE_TASK, kwargs={}, expires=25, task_id=mock.ANY)
    queued.refresh_from_db()
    assert queued.status == OutboxStatus.SENT and queued.attempts == 2


def test_bulk_retry_skips_keys_that_are_neither_failed_nor_retrying(operator, setup):
    _source, _target, keys = setup
    Key.objects.filter(pk=keys[0].pk).update(
        migration_status="failed", migration_attempts=5, migration_max_attempts=5
    )
    result = keys_migration_retry(
        org=operator.org,
        actor=Actor.for_user(operator.user),
        key_ids=[keys[0].pk, keys[1].pk],
        reason="go",
    )
    assert result.retried == [keys[0].pk] and keys[1].pk in result.skipped
    with pytest.raises(ValidationFailed):
        keys_migration_retry(
            org=operator.org,
            actor=Actor.for_user(operator.user),
            key_ids=[keys[0].pk],
            reason=" ",
        )


def test_the_cool_down_reset_is_off_by_default_and_requeues_old_failures_when_set(setup):
    _, _, keys = setup
    old = clock.now().replace(year=2020)
    Key.objects.filter(pk=keys[0].pk).update(
        migration_status="failed", migration_attempts=5, migration_max_attempts=5, migration_updated_at=old
    )
    assert keys_cooldown_reset() == 0
    assert keys_cooldown_reset(cooldown_seconds=3600) == 1
    key = Key.objects.get(pk=keys[0].pk)
    assert (key.migration_status, key.migration_manual_retries) == ("scheduled", 0)
    audit = AuditEvent.objects.get(action="keys.migration_auto_reset")
    assert audit.actor_type == "scheduler"


def test_a_group_with_keys_cannot_be_deleted(admin_member, setup):
    source, target, _ = setup
    with pytest.raises(Conflict):
        address_group_delete(group=source, actor=Actor.for_user(admin_member.user))
    address_group_delete(group=target, actor=Actor.for_user(admin_member.user))
    assert AuditEvent.objects.filter(action="keys.address_group_deleted").count() == 1
