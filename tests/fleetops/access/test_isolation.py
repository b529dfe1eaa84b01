"""Another organization's objects are 404, never 403, on every surface."""

from __future__ import annotations

import pytest
from django.db import transaction

from fleetops.access.models import ApiToken, Role
from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.audit.services import record
from tests.factories import MembershipFactory

pytestmark = pytest.mark.django_db


def _event(org, action="test.thing"):
    with transaction.atomic():
        return record(action=action, actor=Actor.system("test"), org=org)


def test_audit_detail_of_another_org_is_404(viewer, other_org):
    theirs = _event(other_org)
    mine = _event(viewer.org)
    client = viewer.session()

    assert client.get(f"/api/v1/audit/{mine.pk}/").status_code == 200
    response = client.get(f"/api/v1/audit/{theirs.pk}/")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_audit_list_shows_only_the_requests_org(viewer, other_org):
    _event(other_org, "theirs.only")
    _event(viewer.org, "mine.only")

    actions = [row["action"] for row in viewer.token_client().get("/api/v1/audit/").json()["results"]]

    assert "mine.only" in actions
    assert "theirs.only" not in actions


def test_naming_an_org_you_do_not_belong_to_is_404(viewer, other_org):
    client = viewer.session()
    response = client.get("/api/v1/audit/", HTTP_X_FLEETOPS_ORG=other_org.slug)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "organization_not_found"
    unknown = client.get("/api/v1/audit/", HTTP_X_FLEETOPS_ORG="no-such-org")
    assert unknown.json() == response.json()


def test_a_token_cannot_be_pointed_at_another_org(viewer, other_org):
    MembershipFactory(user=viewer.user, org=other_org, role=Role.ADMIN)
    client = viewer.token_client()
    assert client.get("/api/v1/audit/", HTTP_X_FLEETOPS_ORG=other_org.slug).status_code == 404


def test_a_member_of_several_orgs_must_name_one_in_a_session(viewer, other_org):
    MembershipFactory(user=viewer.user, org=other_org, role=Role.VIEWER)
    client = viewer.session()

    response = client.get("/api/v1/audit/")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "organization_required"
    assert client.get("/api/v1/audit/", HTTP_X_FLEETOPS_ORG=other_org.slug).status_code == 200


def test_revoking_another_orgs_token_is_404(admin_member, outsider):
    theirs = outsider.token_client()
    token = ApiToken.objects.get(user=outsider.user)
    response = admin_member.session().post(f"/api/v1/tokens/{token.pk}/revoke/", {"reason": "x"})
    assert response.status_code == 404
    token.refresh_from_db()
    assert token.revoked_at is None
    assert theirs.get("/api/v1/me/").status_code == 200


def test_admin_changelist_and_change_page_hide_other_orgs(admin_member, outsider, client):
    outsider.token_client()
    mine = _event(admin_member.org, "mine.admin")
    theirs = _event(outsider.org, "theirs.admin")
    client.force_login(admin_member.user)

    page = client.get("/admin/audit/auditevent/")
    assert page.status_code == 200
    assert b"mine.admin" in page.content
    assert b"theirs.admin" not in page.content
    assert client.get(f"/admin/audit/auditevent/{mine.pk}/change/").status_code == 200
    # Django's admin answers a missing object with a redirect to the index and a message.
    hidden = client.get(f"/admin/audit/auditevent/{theirs.pk}/change/")
    assert hidden.status_code == 302
    assert client.get("/admin/access/apitoken/").content.count(b"gus-globex") == 0
    assert AuditEvent.objects.filter(pk=theirs.pk).exists()
