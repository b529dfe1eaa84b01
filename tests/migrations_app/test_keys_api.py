from __future__ import annotations

import pytest

from fleetops.audit.models import AuditEvent
from migrations_app.models.keys import Key
from tests.migrations_app.keys_fixtures import make_group, make_keys

pytestmark = pytest.mark.django_db
BASE = "/api/v1/keys"


@pytest.fixture
def setup(org):
    source, target = make_group(org, "a"), make_group(org, "b")
    keys = make_keys(org, 4, group=source)
    return source, target, keys


def test_viewers_list_and_filter_keys_with_the_migration_label(viewer, setup):
    source, _, keys = setup
    Key.objects.filter(pk=keys[0].pk).update(
        migration_status="retrying",
        migration_attempts=2,
        migration_max_attempts=5,
        migration_last_error="boom",
    )
    client = viewer.token_client()
    listed = client.get(f"{BASE}/", {"migration_status": "retrying"})
    assert listed.status_code == 200, listed.content
    [item] = listed.json()["results"]
    assert item["id"] == keys[0].pk and item["migration"]["last_error"] == "boom"
    assert item["migration"]["badge"] == "Retrying #2 of 5 — in flight"
    assert len(client.get(f"{BASE}/", {"address_group": source.pk}).json()["results"]) == 4
    detail = client.get(f"{BASE}/{keys[0].pk}").json()
    assert detail["history"] == [] and detail["transactions"] == []


def test_migrate_dry_run_then_exact_ids_and_viewers_are_refused(viewer, operator, setup):
    source, target, _keys = setup
    body = {"target_group": target.pk, "filter": {"address_group": source.pk}, "dry_run": True}
    assert viewer.token_client().post(f"{BASE}/migrate", body, format="json").status_code == 403
    client = operator.token_client()
    preview = client.post(f"{BASE}/migrate", body, format="json")
    assert preview.status_code == 200, preview.content
    assert preview.json()["count"] == 4 and not Key.objects.filter(migration_status="scheduled").exists()
    ids = preview.json()["key_ids"]
    done = client.post(
        f"{BASE}/migrate",
        {"target_group": target.pk, "key_ids": ids, "reason": "move"},
        format="json",
        HTTP_IDEMPOTENCY_KEY="m-1",
    )
    assert done.status_code == 200 and done.json()["key_ids"] == ids
    replay = client.post(
        f"{BASE}/migrate",
        {"target_group": target.pk, "key_ids": ids, "reason": "move"},
        format="json",
        HTTP_IDEMPOTENCY_KEY="m-1",
    )
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert AuditEvent.objects.filter(action="keys.migrated").count() == 1


def test_bad_migrate_bodies_are_400_in_the_error_shape(operator, setup):
    _, target, keys = setup
    client = operator.token_client()
    both = client.post(
        f"{BASE}/migrate", {"target_group": target.pk, "key_ids": [keys[0].pk], "filter": {}}, format="json"
    )
    assert both.status_code == 400 and both.json()["error"]["code"]
    assert client.post(f"{BASE}/migrate", {"key_ids": [1]}, format="json").status_code == 400


def test_retry_needs_an_operator_and_a_reason(viewer, operator, setup):
    _, _, keys = setup
    Key.objects.filter(pk=keys[0].pk).update(
        migration_status="failed", migration_attempts=5, migration_max_attempts=5
    )
    assert (
        viewer.token_client().post(f"{BASE}/{keys[0].pk}/retry", {"reason": "x"}, format="json").status_code
        == 403
    )
    client = operator.token_client()
    assert client.post(f"{BASE}/{keys[0].pk}/retry", {}, format="json").status_code == 400
    done = client.post(f"{BASE}/{keys[0].pk}/retry", {"reason": "fixed"}, format="json")
    assert done.status_code == 200 and done.json()["migration"]["status"] == "scheduled"
    again = client.post(f"{BASE}/{keys[0].pk}/retry", {"reason": "fixed"}, format="json")
    assert again.status_code == 409
    bulk = client.post(f"{BASE}/retry", {"key_ids": [keys[0].pk, keys[1].pk], "reason": "r"}, format="json")
    assert bulk.status_code == 200 and bulk.json()["retried"] == []


def test_another_organizations_keys_and_groups_are_404_on_every_endpoint(outsider, setup):
    _source, target, keys = setup
    client = outsider.token_client()
    assert client.get(f"{BASE}/").json()["results"] == []
    assert client.get(f"{BASE}/groups").json()["results"] == []
    assert client.get(f"{BASE}/{keys[0].pk}").status_code == 404
    assert client.post(f"{BASE}/{keys[0].pk}/retry", {"reason": "x"}, format="json").status_code == 404
    assert (
        client.post(f"{BASE}/retry", {"key_ids": [keys[0].pk], "reason": "x"}, format="json").status_code
        == 404
    )
    moved = client.post(
        f"{BASE}/migrate", {"target_group": target.pk, "key_ids": [keys[0].pk]}, format="json"
    )
    assert moved.status_code == 404
    assert Key.objects.get(pk=keys[0].pk).migration_status == "none"
