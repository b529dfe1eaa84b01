from __future__ import annotations

import uuid

import pytest

from curtailment.models import CurtailmentEvent, CurtailmentTarget
from tests.curtailment.conftest import make_fleet

pytestmark = pytest.mark.django_db
BASE = "/api/v1/curtailment"


def _start(client, **body):
    body.setdefault("target_kw", 6.0)
    body.setdefault("reason", "grid request")
    return client.post(f"{BASE}/events", body, format="json")


def test_preview_is_open_to_viewers_and_writes_nothing(viewer, fleet):
    response = viewer.token_client().post(f"{BASE}/preview", {"target_kw": 7.0}, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert [c["device_identifier"] for c in body["candidates"]] == ["m-009", "m-008", "m-007"]
    assert body["candidates"][0]["reason_selected"] == "least_efficient_first"
    assert not CurtailmentEvent.objects.exists()


def test_insufficient_load_is_400_with_the_message_and_counts(viewer, fleet):
    response = viewer.token_client().post(f"{BASE}/preview", {"target_kw": 500}, format="json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "insufficient_load"
    assert error["message"].startswith("insufficient curtailable load: 30.000 kW available")


def test_start_needs_an_operator_and_returns_201_then_replays_200(viewer, operator, fleet):
    assert _start(viewer.token_client()).status_code == 403
    client = operator.token_client()
    created = _start(client, idempotency_key="dr-1")
    replay = _start(client, idempotency_key="dr-1")
    assert created.status_code == 201, created.content
    assert replay.status_code == 200
    assert created.json()["uuid"] == replay.json()["uuid"]
    assert created.json()["target_rollup"]["pending"] == 2
    assert created.json()["source_actor_type"] == "api_key"


def test_the_idempotency_header_replays_and_rejects_a_different_body(operator, fleet):
    client = operator.token_client()
    first = client.post(
        f"{BASE}/events", {"target_kw": 3, "reason": "r"}, format="json", HTTP_IDEMPOTENCY_KEY="h1"
    )
    again = client.post(
        f"{BASE}/events", {"target_kw": 3, "reason": "r"}, format="json", HTTP_IDEMPOTENCY_KEY="h1"
    )
    other = client.post(
        f"{BASE}/events", {"target_kw": 4, "reason": "r"}, format="json", HTTP_IDEMPOTENCY_KEY="h1"
    )
    assert first.status_code == again.status_code == 201
    assert again["Idempotent-Replayed"] == "true"
    assert other.status_code == 422
    assert CurtailmentEvent.objects.count() == 1
    assert CurtailmentEvent.objects.get().idempotency_key == "h1"


def test_admin_only_fields_are_403_for_operators(operator, fleet):
    response = _start(operator.token_client(), allow_unbounded=True)
    assert response.status_code == 403
    assert response.json()["error"]["message"] == "only admins can supply curtailment override fields"


def test_list_is_trimmed_and_scrubbed_and_filters_by_state(operator, fleet):
    client = operator.token_client()
    _start(client, external_source="grid", external_reference="x-1", target_kw=3)
    rows = client.get(f"{BASE}/events").json()["results"]
    assert len(rows) == 1
    assert "targets" not in rows[0] and "target_rollup" not in rows[0]
    assert "external_reference" not in rows[0] and "idempotency_key" not in rows[0]
    assert "skipped" not in rows[0]["decision_snapshot"]
    assert "skipped_aggregate" in rows[0]["decision_snapshot"]
    assert client.get(f"{BASE}/events?state=completed").json()["results"] == []
    assert client.get(f"{BASE}/events?state=bogus").status_code == 400


def test_get_targets_and_another_orgs_event_is_404(operator, outsider, fleet):
    make_fleet(outsider.org, 3, start=700)
    theirs = _start(outsider.token_client(), target_kw=3).json()["uuid"]
    mine = _start(operator.token_client(), target_kw=3).json()["uuid"]
    client = operator.token_client()

    assert client.get(f"{BASE}/events/{mine}").json()["decision_snapshot"]["selected_count"] == 1
    targets = client.get(f"{BASE}/events/{mine}/targets?page_size=1").json()
    assert [t["device_identifier"] for t in targets["results"]] == ["m-009"]
    for path in (f"/events/{theirs}", f"/events/{theirs}/targets", f"/events/{uuid.uuid4()}"):
        response = client.get(BASE + path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    assert client.post(f"{BASE}/events/{theirs}/stop", {}, format="json").status_code == 404


def test_update_stop_and_their_status_codes(operator, fleet):
    client = operator.token_client()
    event = _start(client, target_kw=3).json()["uuid"]
    assert client.patch(f"{BASE}/events/{event}", {}, format="json").status_code == 400
    assert (
        client.patch(f"{BASE}/events/{event}", {"max_duration_seconds": 99999}, format="json").status_code
        == 403
    )
    patched = client.patch(f"{BASE}/events/{event}", {"reason": "new reason"}, format="json")
    assert patched.json()["reason"] == "new reason"
    assert client.post(f"{BASE}/events/{event}/stop", {"force": True}, format="json").status_code == 403
    stopped = client.post(f"{BASE}/events/{event}/stop", {}, format="json")
    assert stopped.json()["state"] == "restoring"
    conflict = client.patch(f"{BASE}/events/{event}", {"reason": "late"}, format="json")
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "state_conflict"


def test_terminate_needs_an_admin_with_an_interactive_session(operator, admin_member, fleet):
    event = _start(admin_member.token_client(), target_kw=3).json()["uuid"]
    body = {"target_state": "cancelled", "reason": "stuck"}
    assert operator.session().post(f"{BASE}/events/{event}/terminate", body, format="json").status_code == 403
    assert (
        admin_member.token_client().post(f"{BASE}/events/{event}/terminate", body, format="json").status_code
        == 403
    )

    CurtailmentTarget.objects.update(state="dispatched")
    in_flight = admin_member.session().post(f"{BASE}/events/{event}/terminate", body, format="json")
    assert in_flight.status_code == 409
    assert in_flight.json()["error"]["code"] == "in_flight_commands"

    CurtailmentTarget.objects.update(state="pending")
    done = admin_member.session().post(f"{BASE}/events/{event}/terminate", body, format="json")
    assert done.status_code == 200
    assert done.json()["state"] == "cancelled"
    # Never sent a command: cancelled, not restore_failed.
    assert (done.json()["target_rollup"]["cancelled"], done.json()["target_rollup"]["restore_failed"]) == (
        1,
        0,
    )


def test_stop_and_terminate_reasons_follow_the_one_reason_rule(admin_member, fleet):
    from fleetops.lib.reason import REASON_MAX_LENGTH

    session = admin_member.session()
    event = _start(session, target_kw=3).json()["uuid"]
    too_long = "x" * (REASON_MAX_LENGTH + 1)
    stop = session.post(f"{BASE}/events/{event}/stop", {"reason": too_long}, format="json")
    assert stop.status_code == 400
    assert "reason" in stop.json()["error"]["fields"]
    terminate = f"{BASE}/events/{event}/terminate"
    for reason in ("", "   ", too_long):
        refused = session.post(terminate, {"target_state": "cancelled", "reason": reason}, format="json")
        assert refused.status_code == 400, reason
    assert CurtailmentEvent.objects.get().state == "pending"
    done = session.post(
        terminate, {"target_state": "cancelled", "reason": "x" * REASON_MAX_LENGTH}, format="json"
    )
    assert done.status_code == 200
    assert done.json()["state"] == "cancelled"
