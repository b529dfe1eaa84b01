"""Key lifecycle guards: bulk group delete is audited, non-members are Forbidden (not a ValueError), the
broadcast record writes history only for rows it moved, and the group list counts keys in SQL."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from prometheus_client import REGISTRY

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.lib.errors import Forbidden
from migrations_app.keys.schedule import Claim, RestakeResult, _Prepared, stake_txs_record_broadcasts
from migrations_app.keys.services import (
    NOT_A_MEMBER,
    KeyAction,
    address_group_delete,
    address_group_save,
    key_config_update,
    key_migration_retry,
    keys_migration_retry,
)
from migrations_app.models.keys import (
    AddressGroup,
    BroadcastState,
    Key,
    RemediationEntry,
    RemediationOutcome,
    StakeTransaction,
    StakeTxStatus,
)
from tests.factories import UserFactory
from tests.migrations_app.keys_fixtures import make_group, make_keys

pytestmark = pytest.mark.django_db
GROUPS = "/admin/migrations_app/addressgroup/"


def test_bulk_deleting_groups_goes_through_the_service_and_its_audit(client, admin_member, org):
    empty_a, empty_b, busy = make_group(org, "a"), make_group(org, "b"), make_group(org, "busy")
    make_keys(org, 1, group=busy)
    client.force_login(admin_member.user)
    client.post(
        GROUPS,
        {"action": "delete_selected", "post": "yes", "_selected_action": [empty_a.pk, empty_b.pk]},
    )
    assert list(AddressGroup.objects.values_list("name", flat=True)) == ["busy"]
    audited = AuditEvent.objects.filter(action=KeyAction.GROUP_DELETED)
    assert sorted(audited.values_list("target_label", flat=True)) == sorted([str(empty_a), str(empty_b)])


def test_the_group_list_counts_keys_without_a_query_per_row(
    client, admin_member, org, django_assert_max_num_queries
):
    for i in range(8):
        make_keys(org, 2, group=make_group(org, f"g{i}"), start=10 * i)
    client.force_login(admin_member.user)
    client.get(GROUPS)
    with django_assert_max_num_queries(10):
        page = client.get(GROUPS)
    assert page.status_code == 200


@pytest.mark.parametrize("who", ["outsider", "anonymous", "stranger"])
def test_services_refuse_an_actor_without_a_role_and_audit_each_refusal(outsider, org, who):
    group = make_group(org)
    [key] = make_keys(org, 1, group=group, migration_status="failed")
    actor = {
        "outsider": Actor.for_user(outsider.user),  # an admin, but of another organization
        "anonymous": Actor.anonymous(),
        "stranger": Actor.for_user(UserFactory(username="no-memberships")),
    }[who]
    calls: dict[str, list[Callable[[], object]]] = {
        "keys.migration_retry": [
            lambda: key_migration_retry(key=key, actor=actor, reason="x"),
            lambda: keys_migration_retry(org=org, actor=actor, key_ids=[key.pk], reason="x"),
        ],
        "keys.config_update": [lambda: key_config_update(org=org, actor=actor, values={"max_attempts": 3})],
        "keys.address_group_save": [
            lambda: address_group_save(org=org, actor=actor, group=None, values={"name": "n"})
        ],
        "keys.address_group_delete": [lambda: address_group_delete(group=group, actor=actor)],
    }
    for what, attempts in calls.items():
        for call in attempts:
            with pytest.raises(Forbidden, match=re.escape(NOT_A_MEMBER)):
                call()
        denied = AuditEvent.objects.filter(action="access.denied", metadata__what=what)
        assert denied.count() == len(attempts)
        assert {(d.org_id, d.actor_type, d.metadata["surface"]) for d in denied} == {
            (org.pk, actor.type, "service")
        }
    assert Key.objects.get(pk=key.pk).migration_status == "failed"
    assert AddressGroup.objects.filter(org=org).count() == 1
    assert not AuditEvent.objects.exclude(action="access.denied").exists()


def test_keys_retry_refuses_a_non_member_cleanly(outsider, org):
    [key] = make_keys(org, 1, group=make_group(org), migration_status="failed")
    with pytest.raises(CommandError, match="not a member"):
        call_command(
            "keys_retry",
            "--org",
            org.slug,
            "--user",
            outsider.user.username,
            "--reason",
            "x",
            "--ids",
            str(key.pk),
        )
    assert Key.objects.get(pk=key.pk).migration_status == "failed"


def _race_lost(operation: str) -> float:
    return REGISTRY.get_sample_value("fleetops_platform_race_lost_total", {"operation": operation}) or 0.0


def test_broadcast_history_is_written_only_for_rows_the_update_moved(org):
    keys = make_keys(org, 2, group=make_group(org))
    now = clock.now()
    txs = [
        StakeTransaction.objects.create(
            key=k,
            round=1,
            attempt=1,
            broadcast_state=BroadcastState.BROADCASTING,
            claimed_at=now,
            created_at=now,
        )
        for k in keys
    ]
    # Somebody else resolved the second one while we were broadcasting.
    StakeTransaction.objects.filter(pk=txs[1].pk).update(status=StakeTxStatus.FAILURE, resolved_at=now)
    prepared = [
        _Prepared(
            claim=Claim(tx_id=t.pk, key_id=t.key_id, round=1, attempt=1),
            raw=b"",
            hash=f"h{t.pk}",
            payload={},
            height=10,
            timeout=20,
        )
        for t in txs
    ]
    result = RestakeResult()
    before = _race_lost("keys_broadcast_record")
    stake_txs_record_broadcasts([(p, "sent", None, "") for p in prepared], result)
    entries = RemediationEntry.objects.filter(outcome=RemediationOutcome.BROADCAST)
    assert list(entries.values_list("key_id", flat=True)) == [keys[0].pk]
    assert StakeTransaction.objects.get(pk=txs[0].pk).broadcast_state == BroadcastState.SENT
    assert StakeTransaction.objects.get(pk=txs[1].pk).broadcast_state == BroadcastState.BROADCASTING
    assert (result.sent, result.races_lost) == (1, 1)
    assert _race_lost("keys_broadcast_record") == before + 1
