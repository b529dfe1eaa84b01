"""The curtailment API refuses unknown and read-only fields, wrong JSON types and over-long keys by
name, and a refused request changes nothing."""

from __future__ import annotations

import pytest

from curtailment.models import CurtailmentEvent, EventState
from curtailment.planning import StartRequest, validate_start
from fleetops.api.serializers import READ_ONLY_FIELD, UNKNOWN_FIELD
from fleetops.audit.models import AuditEvent
from fleetops.lib.errors import ValidationFailed

pytestmark = pytest.mark.django_db
BASE = "/api/v1/curtailment"


def _fields(response) -> dict:
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    return error["fields"]


@pytest.fixture
def event(operator, fleet) -> CurtailmentEvent:
    response = operator.token_client().post(
        f"{BASE}/events", {"target_kw": 3, "reason": "grid"}, format="json"
    )
    assert response.status_code == 201, response.content
    return CurtailmentEvent.objects.get(uuid=response.json()["uuid"])


def test_a_patch_naming_read_only_fields_is_refused_whole(operator, event):
    client = operator.token_client()
    audit_rows = AuditEvent.objects.count()
    body = {"restore_batch_size": 2, "state": "cancelled", "target_kw": 999}

    response = client.patch(f"{BASE}/events/{event.uuid}", body, format="json")

    assert _fields(response) == {"state": [READ_ONLY_FIELD], "target_kw": [READ_ONLY_FIELD]}
    event.refresh_from_db()
    assert (event.restore_batch_size, event.state, event.target_kw) == (0, EventState.PENDING, 3.0)
    assert AuditEvent.objects.count() == audit_rows


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("preview", {"target_kw": 3, "dry": True}, {"dry": UNKNOWN_FIELD}),
        ("events", {"target_kw": 3, "reason": "r", "state": "active"}, {"state": READ_ONLY_FIELD}),
        (
            "events",
            {"target_kw": 3, "reason": "r", "uuid": "x", "x-y": 1},
            {"uuid": READ_ONLY_FIELD, "x-y": UNKNOWN_FIELD},
        ),
        ("events/{uuid}/stop", {"reason": "r", "target_state": "failed"}, {"target_state": UNKNOWN_FIELD}),
        ("events/{uuid}", {"reason": "new", "targets": []}, {"targets": UNKNOWN_FIELD}),
    ],
)
def test_extra_keys_are_refused_by_name_on_every_command(operator, event, path, body, named):
    client = operator.token_client()
    url = f"{BASE}/{path.format(uuid=event.uuid)}"
    response = (
        client.patch(url, body, format="json")
        if path == "events/{uuid}"
        else client.post(url, body, format="json")
    )

    assert _fields(response) == {k: [v] for k, v in named.items()}
    assert CurtailmentEvent.objects.count() == 1
    event.refresh_from_db()
    assert (event.state, event.reason) == (EventState.PENDING, "grid")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"target_kw": True}, "target_kw"),
        ({"target_kw": "5"}, "target_kw"),
        ({"target_kw": 3, "tolerance_kw": False}, "tolerance_kw"),
        ({"target_kw": 3, "include_maintenance": "false"}, "include_maintenance"),
        ({"target_kw": 3, "include_maintenance": 0}, "include_maintenance"),
        ({"target_kw": 3, "candidate_min_power_w_override": True}, "candidate_min_power_w_override"),
        (
            {"target_kw": 3, "device_identifiers": ["m-001", 7], "scope_type": "device_list"},
            "device_identifiers",
        ),
        ({"target_kw": 3, "priority": 1}, "priority"),
    ],
)
def test_wrong_json_types_are_refused_by_name(viewer, operator, fleet, body, field):
    preview = viewer.token_client().post(f"{BASE}/preview", body, format="json")
    start = operator.token_client().post(f"{BASE}/events", {**body, "reason": "r"}, format="json")
    assert field in _fields(preview)
    assert field in _fields(start)
    assert not CurtailmentEvent.objects.exists()


def test_a_number_too_large_for_a_float_is_refused_by_name(operator, fleet):
    response = operator.token_client().generic(
        "POST", f"{BASE}/events", '{"target_kw": 1e400, "reason": "r"}', content_type="application/json"
    )
    assert set(_fields(response)) == {"target_kw"}
    assert not CurtailmentEvent.objects.exists()


def test_over_long_keys_name_their_fields(operator, fleet):
    long = "k" * 257
    body = {
        "target_kw": 3,
        "reason": "r",
        "external_source": long,
        "external_reference": long,
        "idempotency_key": long,
    }
    response = operator.token_client().post(f"{BASE}/events", body, format="json")
    assert set(_fields(response)) == {"external_source", "external_reference", "idempotency_key"}
    assert not CurtailmentEvent.objects.exists()


def test_the_service_names_an_over_long_key_too():
    with pytest.raises(ValidationFailed) as refused:
        validate_start(StartRequest(target_kw=3, reason="r", external_reference="x" * 257))
    assert set(refused.value.fields) == {"external_reference"}
