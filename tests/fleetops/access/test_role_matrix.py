"""Role x endpoint matrix for the platform endpoints, over sessions and API tokens."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from fleetops.access.models import Role
from fleetops.audit.models import AuditEvent, PlatformAction

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.urls")]

ANON, VIEWER, OPERATOR, ADMIN, SUPER = "anonymous", "viewer", "operator", "admin", "superuser"

# (method, path, {who: expected status})
MATRIX = [
    ("get", "/health/live", {ANON: 200, VIEWER: 200, ADMIN: 200}),
    ("get", "/health/ready", {ANON: 200, VIEWER: 200, ADMIN: 200}),
    ("get", "/metrics", {ANON: 200, VIEWER: 200}),
    ("get", "/api/schema/", {ANON: 200, VIEWER: 200}),
    ("get", "/api/docs/", {ANON: 200, VIEWER: 200}),
    ("get", "/api/v1/me/", {ANON: 401, VIEWER: 200, OPERATOR: 200, ADMIN: 200, SUPER: 200}),
    ("get", "/api/v1/audit/", {ANON: 401, VIEWER: 200, OPERATOR: 200, ADMIN: 200, SUPER: 200}),
    ("get", "/api/v1/tokens/", {ANON: 401, VIEWER: 200, OPERATOR: 200, ADMIN: 200, SUPER: 200}),
    ("get", "/api/v1/test/roles/", {ANON: 401, VIEWER: 200, OPERATOR: 200, ADMIN: 200, SUPER: 200}),
    ("post", "/api/v1/test/roles/", {ANON: 401, VIEWER: 403, OPERATOR: 200, ADMIN: 200, SUPER: 200}),
    ("delete", "/api/v1/test/roles/", {ANON: 401, VIEWER: 403, OPERATOR: 403, ADMIN: 200, SUPER: 200}),
    ("get", "/ops/status", {ANON: 302, VIEWER: 200, ADMIN: 200, SUPER: 200}),
]


def _client(who: str, members, superuser, via_token: bool) -> APIClient:
    if who == ANON:
        return APIClient()
    if who == SUPER:
        client = APIClient()
        client.force_login(superuser)
        client.credentials(HTTP_X_FLEETOPS_ORG=members[Role.VIEWER].org.slug)
        return client
    member = members[who]
    return member.token_client() if via_token else member.session()


@pytest.mark.parametrize("via_token", [False, True], ids=["session", "token"])
@pytest.mark.parametrize(("method", "path", "expected"), MATRIX, ids=[f"{m} {p}" for m, p, _ in MATRIX])
def test_each_role_gets_the_documented_status(method, path, expected, via_token, members, superuser):
    for who, status in expected.items():
        if via_token and who in (ANON, SUPER):
            continue
        if via_token and path == "/ops/status":
            continue  # a staff page: sessions only
        response = getattr(_client(who, members, superuser, via_token), method)(path)
        assert response.status_code == status, f"{who} {method.upper()} {path}: {response.status_code}"
        if path.startswith("/api/v1/") and status >= 400:
            assert set(response.json()) == {"error"}
            assert set(response.json()["error"]) == {"code", "message", "fields"}


def test_a_denied_action_is_audited_with_the_missing_role(viewer):
    response = viewer.session().post("/api/v1/test/roles/")

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"
    assert "operator" in response.json()["error"]["message"]
    event = AuditEvent.objects.get(action=PlatformAction.DENIED)
    assert event.org == viewer.org
    assert event.actor_label == viewer.user.username
    assert event.metadata["required_role"] == "operator"
    assert event.metadata["role"] == "viewer"


def test_a_token_never_exceeds_its_owners_current_role(operator):
    client = operator.token_client(role=Role.OPERATOR)
    assert client.post("/api/v1/test/roles/").status_code == 200

    # Demote the owner: the token's effective role drops at once.
    operator.user.memberships.update(role=Role.VIEWER)
    assert client.post("/api/v1/test/roles/").status_code == 403
    assert client.get("/api/v1/test/roles/").status_code == 200


def test_a_viewer_token_of_an_admin_can_only_read(admin_member):
    client = admin_member.token_client(role=Role.VIEWER)
    assert client.get("/api/v1/test/roles/").status_code == 200
    assert client.post("/api/v1/test/roles/").status_code == 403
    assert client.delete("/api/v1/test/roles/").status_code == 403
