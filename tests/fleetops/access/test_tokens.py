from __future__ import annotations

from datetime import timedelta

import pytest
from rest_framework.test import APIClient

from fleetops.access.authentication import TOKEN_EXPIRED, TOKEN_INVALID, TOKEN_OWNER_INACTIVE, TOKEN_REVOKED
from fleetops.access.models import ApiToken, Role
from fleetops.access.permissions import INTERACTIVE_REQUIRED
from fleetops.access.services import TOKEN_ROLE_TOO_HIGH, api_token_create, api_token_revoke
from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent, PlatformAction
from fleetops.lib import clock
from fleetops.lib.errors import Forbidden, ValidationFailed
from fleetops.lib.reason import REASON_MAX_LENGTH, REASON_TOO_LONG

pytestmark = pytest.mark.django_db


def _bearer(plaintext: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    return client


def test_it_shows_the_token_once_and_stores_only_a_hash(operator):
    response = operator.session().post("/api/v1/tokens/", {"name": "ci", "role": "viewer"}, format="json")

    assert response.status_code == 201
    plaintext = response.json()["token"]
    assert plaintext.startswith("fo_")
    token = ApiToken.objects.get(pk=response.json()["id"])
    assert plaintext.split("_", 2)[2] not in token.secret_hash
    assert token.secret_hash == ApiToken.hash_secret(plaintext.split("_", 2)[2])
    listed = operator.session().get("/api/v1/tokens/").json()["results"]
    assert [row["key_id"] for row in listed] == [token.key_id]
    assert "token" not in listed[0] and "secret_hash" not in listed[0]
    assert (
        AuditEvent.objects.filter(action=PlatformAction.TOKEN_CREATED, target_id=str(token.pk)).count() == 1
    )


def test_it_refuses_a_token_role_above_the_users(operator):
    response = operator.session().post("/api/v1/tokens/", {"name": "x", "role": "admin"}, format="json")

    assert response.status_code == 403
    assert response.json()["error"]["message"] == TOKEN_ROLE_TOO_HIGH
    assert not ApiToken.objects.exists()
    with pytest.raises(Forbidden):
        api_token_create(
            user=operator.user, org=operator.org, token_role=Role.ADMIN, name="x", actor=Actor.system("t")
        )


def test_a_token_cannot_mint_tokens(operator):
    response = operator.token_client().post("/api/v1/tokens/", {"name": "x", "role": "viewer"}, format="json")
    assert response.status_code == 403
    assert response.json()["error"]["message"] == INTERACTIVE_REQUIRED
    assert ApiToken.objects.count() == 1


@pytest.mark.parametrize(
    "header",
    ["Bearer fo_nope_nope", "Bearer garbage", "Bearer fo__", "Token fo_abc_def"],
)
def test_malformed_or_unknown_tokens_are_401(header, db):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    response = client.get("/api/v1/me/")
    assert response.status_code == 401
    assert response.json()["error"] == {
        "code": "authentication_failed",
        "message": TOKEN_INVALID,
        "fields": {},
    }


def test_a_correct_key_id_with_a_wrong_secret_is_401(viewer):
    issued = api_token_create(
        user=viewer.user, org=viewer.org, token_role="viewer", name="t", actor=Actor.system("t")
    )
    forged = issued.plaintext[:-4] + "AAAA"
    assert _bearer(forged).get("/api/v1/me/").status_code == 401
    assert _bearer(issued.plaintext).get("/api/v1/me/").status_code == 200


def test_revoked_expired_and_orphaned_tokens_are_refused(viewer):
    actor = Actor.for_user(viewer.user)
    revoked = api_token_create(user=viewer.user, org=viewer.org, token_role="viewer", name="r", actor=actor)
    api_token_revoke(token=revoked.token, actor=actor, reason="leaked in a log")
    assert _bearer(revoked.plaintext).get("/api/v1/me/").json()["error"]["message"] == TOKEN_REVOKED

    soon = api_token_create(
        user=viewer.user,
        org=viewer.org,
        token_role="viewer",
        name="e",
        actor=actor,
        expires_at=clock.now() + timedelta(minutes=5),
    )
    with clock.frozen(clock.now() + timedelta(minutes=6)):
        assert _bearer(soon.plaintext).get("/api/v1/me/").json()["error"]["message"] == TOKEN_EXPIRED

    live = api_token_create(user=viewer.user, org=viewer.org, token_role="viewer", name="l", actor=actor)
    viewer.user.memberships.all().delete()
    assert _bearer(live.plaintext).get("/api/v1/me/").json()["error"]["message"] == TOKEN_OWNER_INACTIVE


def test_it_records_last_use_at_most_once_a_minute(viewer):
    issued = api_token_create(
        user=viewer.user, org=viewer.org, token_role="viewer", name="t", actor=Actor.system("t")
    )
    client = _bearer(issued.plaintext)
    start = clock.now()
    with clock.frozen(start):
        client.get("/api/v1/me/")
        first = ApiToken.objects.get(pk=issued.token.pk).last_used_at
        assert first == start
    with clock.frozen(start + timedelta(seconds=30)):
        client.get("/api/v1/me/")
        assert ApiToken.objects.get(pk=issued.token.pk).last_used_at == first
    with clock.frozen(start + timedelta(seconds=61)):
        client.get("/api/v1/me/")
        assert ApiToken.objects.get(pk=issued.token.pk).last_used_at == start + timedelta(seconds=61)


def test_revoke_needs_a_reason_is_audited_and_is_idempotent(viewer):
    client = viewer.session()
    token = ApiToken.objects.get(
        pk=client.post("/api/v1/tokens/", {"name": "a", "role": "viewer"}).json()["id"]
    )

    missing = client.post(f"/api/v1/tokens/{token.pk}/revoke/", {}, format="json")
    assert missing.status_code == 400
    assert "reason" in missing.json()["error"]["fields"]

    first = client.post(f"/api/v1/tokens/{token.pk}/revoke/", {"reason": "rotating"}, format="json")
    second = client.post(f"/api/v1/tokens/{token.pk}/revoke/", {"reason": "again"}, format="json")
    assert first.status_code == second.status_code == 200
    assert first.json()["revoked_at"] == second.json()["revoked_at"]
    events = AuditEvent.objects.filter(action=PlatformAction.TOKEN_REVOKED)
    assert [e.reason for e in events] == ["rotating"]


def test_only_the_owner_or_an_admin_can_revoke(viewer, operator, admin_member):
    token_id = viewer.session().post("/api/v1/tokens/", {"name": "a", "role": "viewer"}).json()["id"]

    # Another member does not even see it.
    assert operator.session().post(f"/api/v1/tokens/{token_id}/revoke/", {"reason": "x"}).status_code == 404
    assert (
        admin_member.session()
        .post(f"/api/v1/tokens/{token_id}/revoke/", {"reason": "offboarding"})
        .status_code
        == 200
    )
    event = AuditEvent.objects.get(action=PlatformAction.TOKEN_REVOKED)
    assert event.actor_label == admin_member.user.username


def test_an_operator_minting_an_admin_token_is_refused_and_the_refusal_is_audited(operator):
    with pytest.raises(Forbidden, match=TOKEN_ROLE_TOO_HIGH):
        api_token_create(
            user=operator.user,
            org=operator.org,
            token_role="admin",
            name="x",
            actor=Actor.for_user(operator.user),
        )
    denied = AuditEvent.objects.get(action="access.denied")
    assert denied.org == operator.org
    assert denied.actor_id == str(operator.user.pk)
    assert denied.metadata["what"] == "access.token_create"
    assert denied.metadata["asked"] == {"role": "admin", "owner": operator.user.get_username()}
    assert not ApiToken.objects.exists()


def test_a_reason_over_the_one_cap_is_refused_naming_the_field(viewer):
    issued = api_token_create(
        user=viewer.user, org=viewer.org, token_role="viewer", name="r", actor=Actor.system("t")
    )
    with pytest.raises(ValidationFailed) as error:
        api_token_revoke(
            token=issued.token, actor=Actor.for_user(viewer.user), reason="x" * (REASON_MAX_LENGTH + 1)
        )
    assert error.value.fields == {"reason": [REASON_TOO_LONG]}
    assert api_token_revoke(token=issued.token, actor=Actor.for_user(viewer.user), reason="  rotated  ")
    issued.token.refresh_from_db()
    assert issued.token.revoked_reason == "rotated"


def test_a_token_its_owner_organization_and_role_are_one_query(operator):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from rest_framework.request import Request
    from rest_framework.test import APIRequestFactory

    from fleetops.access.authentication import ApiTokenAuthentication
    from fleetops.access.context import resolve_org_access
    from fleetops.access.models import Membership

    issued = api_token_create(
        user=operator.user,
        org=operator.org,
        token_role=Role.OPERATOR,
        name="ci",
        actor=Actor.for_user(operator.user),
    )
    auth = ApiTokenAuthentication()

    def request() -> Request:
        raw = APIRequestFactory().get("/api/v1/me/", HTTP_AUTHORIZATION=f"Bearer {issued.plaintext}")
        return Request(raw, authenticators=[auth])

    request().user  # noqa: B018 - the first use also records last_used_at
    Membership.objects.filter(user=operator.user).update(role=Role.VIEWER)
    with CaptureQueriesContext(connection) as captured:
        req = request()
        user = req.user
        access = resolve_org_access(req)

    assert len(captured) == 1, [q["sql"][:80] for q in captured.captured_queries]
    assert user == operator.user and access.org == operator.org
    # The lower of the token's role and the owner's membership role, as it is now.
    assert access.role == Role.VIEWER
