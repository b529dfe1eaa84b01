"""Refusals inside the key services write the one `access.denied` row; commands and seeds act as
named system actors; bulk retries write their audit rows with one INSERT per batch."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from fleetops.access.roles import ENGINE_ONLY
from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.lib.errors import Forbidden, ValidationFailed
from fleetops.lib.reason import REASON_MAX_LENGTH, REASON_TOO_LONG
from migrations_app.keys.common import ADMIN_REQUIRED, OPERATOR_REQUIRED
from migrations_app.keys.selectors import KeyFilter
from migrations_app.keys.services import (
    KeyAction,
    Verdict,
    address_group_delete,
    address_group_save,
    key_config_update,
    key_migrate_to_group,
    key_migration_retry,
    keys_cooldown_reset,
    keys_migration_retry,
    stake_txs_resolve,
)
from migrations_app.models.keys import Key, StakeTransaction
from tests.migrations_app.keys_fixtures import make_group, make_keys

pytestmark = pytest.mark.django_db
CHANGELIST = "/admin/migrations_app/key/"


def denials(what: str):
    return AuditEvent.objects.filter(action="access.denied", metadata__what=what)


@pytest.fixture
def setup(org):
    source, target = make_group(org, "a"), make_group(org, "b")
    keys = make_keys(
        org, 3, group=source, migration_status="failed", migration_attempts=2, migration_max_attempts=2
    )
    return source, target, keys


def test_a_viewer_asking_to_migrate_is_refused_and_the_refusal_is_audited(viewer, setup):
    source, target, _keys = setup
    with pytest.raises(Forbidden, match=re.escape(OPERATOR_REQUIRED)):
        key_migrate_to_group(
            org=viewer.org,
            actor=Actor.for_user(viewer.user),
            target_group_id=target.pk,
            flt=KeyFilter(address_group_id=source.pk),
        )
    [row] = denials("keys.migrate")
    assert (row.org_id, row.actor_label, row.metadata["required_role"], row.metadata["role"]) == (
        viewer.org.pk,
        viewer.user.username,
        "operator",
        "viewer",
    )
    assert set(Key.objects.values_list("address_group_id", flat=True)) == {source.pk}


def test_a_viewer_asking_to_retry_is_refused_per_call_with_one_denial_row_each(viewer, setup):
    _, _, keys = setup
    actor = Actor.for_user(viewer.user)
    with pytest.raises(Forbidden):
        key_migration_retry(key=keys[0], actor=actor, reason="x")
    with pytest.raises(Forbidden):
        keys_migration_retry(org=viewer.org, actor=actor, key_ids=[k.pk for k in keys], reason="x")
    rows = list(denials("keys.migration_retry").order_by("id"))
    assert len(rows) == 2 and rows[0].target_id == str(keys[0].pk)
    assert set(Key.objects.values_list("migration_status", flat=True)) == {"failed"}


def test_an_operator_cannot_change_the_setup_and_each_refusal_is_audited(operator, setup):
    source, _, _ = setup
    actor = Actor.for_user(operator.user)
    with pytest.raises(Forbidden, match=re.escape(ADMIN_REQUIRED)):
        key_config_update(org=operator.org, actor=actor, values={"max_attempts": 9})
    with pytest.raises(Forbidden, match=re.escape(ADMIN_REQUIRED)):
        address_group_save(org=operator.org, actor=actor, group=source, values={"region": "x"})
    with pytest.raises(Forbidden, match=re.escape(ADMIN_REQUIRED)):
        address_group_delete(group=source, actor=actor)
    for what in ("keys.config_update", "keys.address_group_save", "keys.address_group_delete"):
        assert denials(what).count() == 1, what
    assert denials("keys.address_group_delete").get().target_id == str(source.pk)


def test_engine_steps_refuse_a_person_even_an_admin_and_audit_it(admin_member, setup):
    _, _, keys = setup
    now = clock.now()
    tx = StakeTransaction.objects.create(key=keys[0], round=0, attempt=1, claimed_at=now, created_at=now)
    person = Actor.for_user(admin_member.user)
    with pytest.raises(Forbidden, match=re.escape(ENGINE_ONLY)):
        stake_txs_resolve(verdicts=[Verdict(tx_id=tx.pk, success=True)], actor=person)
    with pytest.raises(Forbidden, match=re.escape(ENGINE_ONLY)):
        keys_cooldown_reset(actor=person, cooldown_seconds=1)
    assert denials("keys.stake_tx_resolve").count() == 1
    assert denials("keys.cooldown_reset").count() == 1
    assert StakeTransaction.objects.get(pk=tx.pk).status == "pending"


def test_the_reason_is_cleaned_by_the_one_validator(operator, setup):
    _, _, keys = setup
    actor = Actor.for_user(operator.user)
    with pytest.raises(ValidationFailed, match=re.escape(REASON_TOO_LONG)):
        key_migration_retry(key=keys[0], actor=actor, reason="x" * (REASON_MAX_LENGTH + 1))
    key_migration_retry(key=keys[0], actor=actor, reason="  fee bumped  ")
    assert AuditEvent.objects.get(action=KeyAction.RETRIED).reason == "fee bumped"
    client = operator.token_client()
    too_long = client.post(
        f"/api/v1/keys/{keys[1].pk}/retry", {"reason": "x" * (REASON_MAX_LENGTH + 1)}, format="json"
    )
    assert too_long.status_code == 400 and too_long.json()["error"]["fields"]["reason"] == [REASON_TOO_LONG]


def test_keys_retry_without_a_user_acts_as_the_system_actor(org, setup):
    _, _, keys = setup
    out = StringIO()
    call_command("keys_retry", "--org", org.slug, "--reason", "rpc fixed", "--all-failed", stdout=out)
    assert "retried 3 key(s)" in out.getvalue()
    rows = AuditEvent.objects.filter(action=KeyAction.RETRIED)
    assert {(r.actor_type, r.actor_label, r.reason) for r in rows} == {("system", "keys_retry", "rpc fixed")}
    assert sorted(int(r.target_id) for r in rows) == sorted(k.pk for k in keys)


def test_the_demo_seed_acts_as_its_own_system_actor(org):
    org.slug = "demo"
    org.save()
    with override_settings(DEBUG=True):
        call_command("keys_demo_seed", "--rpc-url", "http://127.0.0.1:9", "--keys", "3", stdout=StringIO())
    config = AuditEvent.objects.get(action=KeyAction.CONFIG_UPDATED)
    assert (config.actor_type, config.actor_label) == ("system", "keys_demo_seed")
    assert not AuditEvent.objects.filter(action="access.denied").exists()


def test_the_admin_retry_action_retries_in_bulk_with_one_audit_insert(client, operator, setup):
    _, _, keys = setup
    client.force_login(operator.user)
    ids = [str(k.pk) for k in keys]
    table = AuditEvent._meta.db_table
    with CaptureQueriesContext(connection) as queries:
        done = client.post(
            CHANGELIST, {"action": "retry_keys", "_selected_action": ids, "apply": "1", "reason": "fee"}
        )
    assert done.status_code == 302
    inserts = [q["sql"] for q in queries if q["sql"].startswith(f'INSERT INTO "{table}"')]
    assert len(inserts) == 1
    rows = AuditEvent.objects.filter(action=KeyAction.RETRIED)
    assert sorted(int(r.target_id) for r in rows) == sorted(k.pk for k in keys)
    assert {r.changes["migration_status"][0] for r in rows} == {"failed"}
    key_updates = [q for q in queries if q["sql"].startswith(f'UPDATE "{Key._meta.db_table}"')]
    assert len(key_updates) == 1  # one set-based UPDATE, not one per key
