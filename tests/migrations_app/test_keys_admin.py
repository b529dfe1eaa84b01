from __future__ import annotations

import pytest

from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from migrations_app.models.keys import Key
from tests.migrations_app.keys_fixtures import make_group, make_keys

pytestmark = pytest.mark.django_db
CHANGELIST = "/admin/migrations_app/key/"


@pytest.fixture
def setup(org):
    source, target = make_group(org, "a"), make_group(org, "b")
    keys = make_keys(org, 3, group=source)
    return source, target, keys


def test_the_changelist_shows_status_badges_and_the_stuck_filter(client, viewer, setup):
    _, _, keys = setup
    Key.objects.filter(pk=keys[0].pk).update(
        migration_status="retrying",
        migration_attempts=1,
        migration_max_attempts=5,
        migration_next_attempt_at=clock.now().replace(year=2999),
        migration_scheduled_at=clock.now().replace(year=2020),
    )
    client.force_login(viewer.user)
    page = client.get(CHANGELIST)
    assert page.status_code == 200
    assert "Retrying #2 of 5 — next in" in page.content.decode()
    stuck = client.get(CHANGELIST, {"stuck": "yes"}).content.decode()
    assert keys[0].address in stuck and keys[1].address not in stuck
    assert "migrate_keys" not in page.content.decode()  # viewers get no actions


def test_the_migrate_action_previews_the_exact_ids_and_moves_exactly_those(client, operator, setup, org):
    source, target, keys = setup
    client.force_login(operator.user)
    ids = [str(k.pk) for k in keys[:2]]
    preview = client.post(CHANGELIST, {"action": "migrate_keys", "_selected_action": ids})
    assert preview.status_code == 200
    body = preview.content.decode()
    assert "<strong>2</strong> keys will move" in body and keys[0].address in body
    make_keys(org, 1, group=source, start=10)
    applied = client.post(
        CHANGELIST,
        {
            "action": "migrate_keys",
            "_selected_action": ids,
            "apply": "1",
            "target_group": target.pk,
            "reason": "rebalance",
            "key_ids": ",".join(ids),
        },
    )
    assert applied.status_code == 302
    assert sorted(Key.objects.filter(address_group=target).values_list("pk", flat=True)) == [
        k.pk for k in keys[:2]
    ]
    assert AuditEvent.objects.get(action="keys.migrated").reason == "rebalance"


def test_the_retry_action_asks_for_a_reason_and_retries_failed_keys(client, operator, setup):
    _, _, keys = setup
    Key.objects.filter(pk=keys[0].pk).update(
        migration_status="failed", migration_attempts=5, migration_max_attempts=5
    )
    client.force_login(operator.user)
    ids = [str(keys[0].pk), str(keys[1].pk)]
    asked = client.post(CHANGELIST, {"action": "retry_keys", "_selected_action": ids})
    assert asked.status_code == 200 and b"reason" in asked.content
    done = client.post(
        CHANGELIST, {"action": "retry_keys", "_selected_action": ids, "apply": "1", "reason": "fee"}
    )
    assert done.status_code == 302
    assert Key.objects.get(pk=keys[0].pk).migration_status == "scheduled"
    assert Key.objects.get(pk=keys[1].pk).migration_status == "none"


def test_the_key_page_has_history_and_transactions_and_the_retry_button(client, operator, setup):
    _, _, keys = setup
    Key.objects.filter(pk=keys[0].pk).update(
        migration_status="failed", migration_attempts=5, migration_max_attempts=5
    )
    client.force_login(operator.user)
    page = client.get(f"{CHANGELIST}{keys[0].pk}/change/").content.decode()
    assert "migration history" in page.lower() and "stake transactions" in page.lower()
    assert 'class="state-machine"' in page and "keys.migration" in page  # drawn from the machine
    assert "action/retry/" in page
    done = client.post(f"{CHANGELIST}{keys[0].pk}/action/retry/", {"reason": "fixed"})
    assert done.status_code == 302
    assert Key.objects.get(pk=keys[0].pk).migration_manual_retries == 1


def test_another_organizations_key_is_not_found_in_the_console(client, outsider, setup):
    _, _, keys = setup
    client.force_login(outsider.user)
    assert client.get(f"{CHANGELIST}{keys[0].pk}/change/").status_code in (302, 404)
    assert keys[0].address not in client.get(CHANGELIST).content.decode()


def test_the_dashboard_card_shows_keys_by_status(client, operator, setup):
    _, _, keys = setup
    Key.objects.filter(pk=keys[0].pk).update(
        migration_status="failed", migration_attempts=5, migration_max_attempts=5
    )
    client.force_login(operator.user)
    page = client.get("/admin/").content.decode()
    assert "Key migrations" in page and keys[0].address[:20] in page
