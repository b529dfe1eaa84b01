"""The keys API refuses unknown fields (at any depth) and wrong JSON types by name, and a refused
request schedules nothing."""

from __future__ import annotations

import pytest

from fleetops.api.serializers import UNKNOWN_FIELD
from fleetops.audit.models import AuditEvent
from migrations_app.models.keys import Key
from tests.migrations_app.keys_fixtures import make_group, make_keys

pytestmark = pytest.mark.django_db
BASE = "/api/v1/keys"


@pytest.fixture
def setup(org):
    source, target = make_group(org, "a"), make_group(org, "b")
    return source, target, make_keys(org, 3, group=source)


def _fields(response) -> dict:
    assert response.status_code == 400, response.content
    return response.json()["error"]["fields"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"force": True}, {"force": [UNKNOWN_FIELD]}),
        ({"filter_status": "failed"}, {"filter": {"status": [UNKNOWN_FIELD]}}),
        ({"dry_run": "false"}, {"dry_run": ["Expected true or false, got a string."]}),
        ({"target_group": True}, {"target_group": ["Expected an integer, got a boolean."]}),
    ],
)
def test_migrate_refuses_extra_and_mistyped_keys_by_name(operator, setup, extra, expected):
    source, target, _ = setup
    body = {"target_group": target.pk, "filter": {"address_group": source.pk}, "reason": "move", **extra}
    if "filter_status" in body:
        # An unknown key inside the nested filter is named under it.
        body["filter"]["status"] = body.pop("filter_status")
    client = operator.token_client()
    audit_rows = AuditEvent.objects.count()

    response = client.post(f"{BASE}/migrate", body, format="json")

    assert _fields(response) == expected
    assert not Key.objects.filter(address_group=target).exists()
    assert AuditEvent.objects.count() == audit_rows


def test_key_ids_must_be_integers_item_by_item(operator, setup):
    _, target, keys = setup
    body = {"target_group": target.pk, "key_ids": [keys[0].pk, True, "3"], "reason": "move"}
    fields = _fields(operator.token_client().post(f"{BASE}/migrate", body, format="json"))
    assert set(fields["key_ids"]) == {"1", "2"}
    assert not Key.objects.filter(address_group=target).exists()


def test_key_ids_and_filter_together_name_both(operator, setup):
    source, target, keys = setup
    body = {"target_group": target.pk, "key_ids": [keys[0].pk], "filter": {"address_group": source.pk}}
    assert set(_fields(operator.token_client().post(f"{BASE}/migrate", body, format="json"))) == {
        "key_ids",
        "filter",
    }


def test_retry_refuses_an_extra_key(operator, setup):
    _, _, keys = setup
    response = operator.token_client().post(
        f"{BASE}/{keys[0].pk}/retry", {"reason": "again", "max_attempts": 9}, format="json"
    )
    assert _fields(response) == {"max_attempts": [UNKNOWN_FIELD]}
