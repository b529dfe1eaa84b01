"""Idempotency-Key: replay, 422 on a different body, 409 while in flight (real concurrent requests),
release on failure, takeover of a crashed holder, 24 h pruning."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from fleetops.access.models import ApiToken
from fleetops.api.idempotency import KEY_IN_FLIGHT, KEY_REUSED, idempotency_prune
from fleetops.api.models import IdempotencyKey
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from tests import urls as test_urls

pytestmark = pytest.mark.urls("tests.urls")
URL = "/api/v1/test/command/"


@pytest.fixture(autouse=True)
def _reset_gate():
    test_urls.calls.clear()
    test_urls.gate.update(entered=None, release=None)
    yield
    test_urls.gate.update(entered=None, release=None)


@pytest.mark.django_db
def test_same_key_and_body_replays_the_stored_response(operator):
    client = operator.token_client()
    first = client.post(URL, {"a": 1}, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    second = client.post(URL, {"a": 1}, format="json", HTTP_IDEMPOTENCY_KEY="k-1")

    assert first.status_code == second.status_code == 201
    assert first.json() == second.json() == {"n": 1, "echo": {"a": 1}}
    assert second["Idempotent-Replayed"] == "true"
    assert len(test_urls.calls) == 1


@pytest.mark.django_db
def test_same_key_with_a_different_body_is_422(operator):
    client = operator.token_client()
    client.post(URL, {"a": 1}, format="json", HTTP_IDEMPOTENCY_KEY="k-2")
    response = client.post(URL, {"a": 2}, format="json", HTTP_IDEMPOTENCY_KEY="k-2")

    assert response.status_code == 422
    assert response.json()["error"] == {"code": "idempotency_key_reused", "message": KEY_REUSED, "fields": {}}
    assert len(test_urls.calls) == 1


@pytest.mark.django_db
def test_keys_are_per_organization(operator, outsider):
    operator.token_client().post(URL, {"a": 1}, format="json", HTTP_IDEMPOTENCY_KEY="shared")
    response = outsider.token_client().post(URL, {"a": 1}, format="json", HTTP_IDEMPOTENCY_KEY="shared")
    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response
    assert len(test_urls.calls) == 2


@pytest.mark.django_db
def test_a_failed_request_releases_its_key(operator):
    client = operator.token_client()
    refused = client.post(URL, {"fail": "conflict"}, format="json", HTTP_IDEMPOTENCY_KEY="k-3")
    assert refused.status_code == 409
    assert not IdempotencyKey.objects.filter(key="k-3").exists()
    ok = client.post(URL, {"a": 1}, format="json", HTTP_IDEMPOTENCY_KEY="k-3")
    assert ok.status_code == 201


@pytest.mark.django_db
@pytest.mark.parametrize("key", ["", "x" * 256, "naïve"])
def test_an_invalid_key_is_400(operator, key):
    response = operator.token_client().post(URL, {"a": 1}, format="json", HTTP_IDEMPOTENCY_KEY=key)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_idempotency_key"
    assert test_urls.calls == []


@pytest.mark.django_db(transaction=True)
def test_a_concurrent_request_with_the_same_key_gets_409_then_the_replay(operator):
    client_a = operator.token_client()
    client_b = operator.token_client()
    test_urls.gate.update(entered=threading.Event(), release=threading.Event())
    results = {}

    def first():
        try:
            results["a"] = client_a.post(URL, {"a": 1}, format="json", HTTP_IDEMPOTENCY_KEY="race")
        finally:
            connection.close()

    thread = threading.Thread(target=first)
    thread.start()
    assert test_urls.gate["entered"].wait(10)
    test_urls.gate["entered"] = None

    in_flight = client_b.post(URL, {"a": 1}, format="json", HTTP_IDEMPOTENCY_KEY="race")
    different = client_b.post(URL, {"a": 9}, format="json", HTTP_IDEMPOTENCY_KEY="race")
    test_urls.gate["release"].set()
    thread.join(10)
    replay = client_b.post(URL, {"a": 1}, format="json", HTTP_IDEMPOTENCY_KEY="race")

    assert in_flight.status_code == 409
    assert in_flight.json()["error"] == {
        "code": "idempotency_in_flight",
        "message": KEY_IN_FLIGHT,
        "fields": {},
    }
    assert different.status_code == 422
    assert results["a"].status_code == 201
    assert replay.status_code == 201 and replay.json() == results["a"].json()
    assert len(test_urls.calls) == 1


@pytest.mark.django_db(transaction=True)
def test_many_simultaneous_requests_with_one_key_execute_once(operator):
    clients = [operator.token_client() for _ in range(6)]
    barrier = threading.Barrier(len(clients))
    statuses = []

    def send(client):
        try:
            barrier.wait(10)
            statuses.append(
                client.post(URL, {"a": 1}, format="json", HTTP_IDEMPOTENCY_KEY="storm").status_code
            )
        finally:
            connection.close()

    threads = [threading.Thread(target=send, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)

    assert len(statuses) == 6
    assert set(statuses) <= {201, 409}
    assert len(test_urls.calls) == 1
    assert IdempotencyKey.objects.get(key="storm").state == "completed"


@pytest.mark.django_db
def test_a_crashed_holder_is_taken_over_after_the_stale_period(operator, settings):
    client = operator.token_client()
    now = clock.now()
    IdempotencyKey.objects.create(
        org=operator.org,
        key="orphan",
        fingerprint=_fingerprint({"a": 1}),
        method="POST",
        path=URL,
        created_at=now - timedelta(minutes=10),
        locked_at=now - timedelta(minutes=10),
    )
    settings.FLEETOPS_IDEMPOTENCY_STALE_SECONDS = 300

    response = client.post(URL, {"a": 1}, format="json", HTTP_IDEMPOTENCY_KEY="orphan")

    assert response.status_code == 201
    assert IdempotencyKey.objects.get(key="orphan").state == "completed"


@pytest.mark.django_db
def test_keys_are_pruned_after_24_hours(operator):
    client = operator.token_client()
    with clock.frozen(clock.now() - timedelta(hours=25)):
        client.post(URL, {"a": 1}, format="json", HTTP_IDEMPOTENCY_KEY="old")
    client.post(URL, {"a": 1}, format="json", HTTP_IDEMPOTENCY_KEY="new")

    assert idempotency_prune() == 1
    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["new"]


@pytest.mark.django_db
def test_token_creation_replay_never_reveals_the_secret_again(operator):
    client = operator.session()
    first = client.post(
        "/api/v1/tokens/", {"name": "ci", "role": "viewer"}, format="json", HTTP_IDEMPOTENCY_KEY="t"
    )
    again = client.post(
        "/api/v1/tokens/", {"name": "ci", "role": "viewer"}, format="json", HTTP_IDEMPOTENCY_KEY="t"
    )

    assert first.json()["token"].startswith("fo_")
    assert again.json()["token"] is None
    assert again.json()["id"] == first.json()["id"]
    assert ApiToken.objects.count() == 1
    content = IdempotencyKey.objects.get(key="t").response_content
    assert content is not None
    stored = bytes(content)
    assert first.json()["token"].encode() not in stored
    # Apart from the secret, the replay is the first answer byte for byte.
    assert again.content == first.content.replace(f'"{first.json()["token"]}"'.encode(), b"null")


def _fingerprint(body):
    from fleetops.api.idempotency import request_fingerprint

    return request_fingerprint(method="POST", path=URL, body=body)


@pytest.mark.django_db
def test_a_refusal_inside_an_idempotent_request_keeps_its_audit_row_though_the_request_rolls_back(operator):
    client = operator.session()
    response = client.post(
        "/api/v1/tokens/", {"name": "ci", "role": "admin"}, format="json", HTTP_IDEMPOTENCY_KEY="too-high"
    )

    assert response.status_code == 403
    denied = AuditEvent.objects.get(action="access.denied")
    assert denied.metadata["what"] == "access.token_create"
    assert denied.metadata["asked"]["role"] == "admin"
    assert not ApiToken.objects.exists()
    assert not IdempotencyKey.objects.filter(key="too-high").exists()  # released: the key may be reused


@pytest.mark.django_db
def test_a_replay_is_the_first_response_byte_for_byte(operator):
    """Microsecond timestamps and the serializer's key order survive: the stored copy is the bytes
    sent, not a re-encoded jsonb value (which drops microseconds and sorts keys)."""
    token = operator.token_client()  # the token being revoked
    token_row = ApiToken.objects.get(user=operator.user)
    client = operator.session()
    url = f"/api/v1/tokens/{token_row.pk}/revoke/"
    with clock.frozen(datetime(2026, 3, 1, 12, 34, 56, 789012, tzinfo=UTC)):
        first = client.post(url, {"reason": "rotated"}, format="json", HTTP_IDEMPOTENCY_KEY="bytes")
    replay = client.post(url, {"reason": "rotated"}, format="json", HTTP_IDEMPOTENCY_KEY="bytes")

    assert first.status_code == replay.status_code == 200
    assert "Idempotent-Replayed" not in first and replay["Idempotent-Replayed"] == "true"
    body = first.json()
    assert body["revoked_at"] == "2026-03-01T12:34:56.789012Z"
    assert len(body) > 5 and list(body) != sorted(body)  # an order jsonb would not keep
    assert replay.content == first.content
    assert replay["Content-Type"] == first["Content-Type"] == "application/json"
    assert token.get("/api/v1/me/").status_code == 401  # revoked once, not twice


@pytest.mark.django_db
def test_a_replay_repeats_the_status_and_location_header(operator):
    client = operator.token_client()
    first = client.post(
        URL, {"location": "/api/v1/test/command/7"}, format="json", HTTP_IDEMPOTENCY_KEY="loc"
    )
    replay = client.post(
        URL, {"location": "/api/v1/test/command/7"}, format="json", HTTP_IDEMPOTENCY_KEY="loc"
    )

    assert first.status_code == replay.status_code == 201
    assert first["Location"] == replay["Location"] == "/api/v1/test/command/7"
    assert replay.content == first.content
    assert len(test_urls.calls) == 1


@pytest.mark.django_db(transaction=True)
def test_responses_stored_before_the_byte_store_still_replay(operator):
    """A row written by the previous schema (a jsonb body only) is carried over by the migration
    and replays its body."""
    before, after = [("api", "0002_cache_table")], [("api", "0003_idempotency_response_bytes")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    old_model = executor.loader.project_state(before).apps.get_model("api", "IdempotencyKey")
    now = clock.now()
    old_model.objects.create(
        org_id=operator.org.pk,
        key="legacy",
        fingerprint=_fingerprint({"a": 1}),
        method="POST",
        path=URL,
        state="completed",
        response_status=201,
        response_body={"n": 1, "echo": {"a": "é"}},
        created_at=now,
        locked_at=now,
        completed_at=now,
    )
    executor = MigrationExecutor(connection)
    executor.migrate(after)
    # ... and on to the app's latest schema, which the request path needs (the rate counters).
    executor = MigrationExecutor(connection)
    executor.migrate([node for node in executor.loader.graph.leaf_nodes() if node[0] == "api"])

    replay = operator.token_client().post(URL, {"a": 1}, format="json", HTTP_IDEMPOTENCY_KEY="legacy")

    assert replay.status_code == 201
    assert replay["Content-Type"] == "application/json"
    assert replay["Idempotent-Replayed"] == "true"
    assert json.loads(replay.content) == {"n": 1, "echo": {"a": "é"}}
    assert test_urls.calls == []
