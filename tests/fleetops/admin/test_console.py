from __future__ import annotations

import pytest
from django.contrib.messages import get_messages
from django.db import connection
from django.test.utils import CaptureQueriesContext

from fleetops.access.models import ApiToken, Role
from fleetops.access.services import api_token_create
from fleetops.admin_site import FILTERED_COUNT_CAP, EstimatedCountPaginator
from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent, PlatformAction
from fleetops.observability import registry
from fleetops.observability.heartbeats import heartbeat_beat
from fleetops.observability.registry import DashboardCard
from tests.factories import record

pytestmark = pytest.mark.django_db


def test_the_index_is_an_ops_dashboard_with_registered_cards(client, viewer):
    heartbeat_beat(name="curtailment.reconciler", ok=True)

    def broken(request):
        raise RuntimeError("card context failed")

    registry.register_card(DashboardCard("broken", "Broken", "nope.html", broken, order=999))
    try:
        client.force_login(viewer.user)
        page = client.get("/admin/")
    finally:
        registry._cards.pop("broken")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Operations dashboard" in html
    assert 'id="card-platform"' in html and "curtailment.reconciler" in html
    assert "This card failed to load" in html  # one broken card does not take the page down


def test_unfiltered_big_tables_use_the_planner_estimate_not_count(org):
    for i in range(30):
        record(action="test.bulk", actor=Actor.system("t"), org=org, target_id=str(i))
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE audit_auditevent")
    import fleetops.admin_site as admin_site

    original = admin_site.EXACT_COUNT_BELOW
    admin_site.EXACT_COUNT_BELOW = 10
    try:
        with CaptureQueriesContext(connection) as queries:
            count = EstimatedCountPaginator(AuditEvent.objects.all(), 50).count
    finally:
        admin_site.EXACT_COUNT_BELOW = original
    assert count >= 10
    assert all("count(" not in q["sql"].lower() for q in queries.captured_queries)
    assert any("reltuples" in q["sql"] for q in queries.captured_queries)


def test_filtered_counts_are_capped(org):
    with CaptureQueriesContext(connection) as queries:
        EstimatedCountPaginator(AuditEvent.objects.filter(action="x"), 50).count  # noqa: B018
    assert f"LIMIT {FILTERED_COUNT_CAP + 1}" in queries.captured_queries[-1]["sql"]


def test_the_audit_changelist_query_count_does_not_grow_with_rows(client, admin_member):
    client.force_login(admin_member.user)
    record(action="test.one", actor=Actor.system("t"), org=admin_member.org)
    with CaptureQueriesContext(connection) as few:
        client.get("/admin/audit/auditevent/")
    for i in range(40):
        record(action="test.many", actor=Actor.system("t"), org=admin_member.org, target_id=str(i))
    with CaptureQueriesContext(connection) as many:
        client.get("/admin/audit/auditevent/")
    assert len(many) == len(few)


def test_the_audit_admin_is_read_only_even_for_superusers(client, superuser, org):
    event = record(action="test.x", actor=Actor.system("t"), org=org)
    client.force_login(superuser)
    assert client.get("/admin/audit/auditevent/add/").status_code == 403
    assert client.post(f"/admin/audit/auditevent/{event.pk}/delete/", {"post": "yes"}).status_code == 403
    page = client.get("/admin/audit/auditevent/").content.decode()
    assert "delete_selected" not in page


def test_a_reasoned_action_asks_for_a_reason_then_calls_the_service(client, admin_member, viewer):
    issued = api_token_create(
        user=viewer.user, org=viewer.org, token_role=Role.VIEWER, name="t", actor=Actor.system("t")
    )
    client.force_login(admin_member.user)
    url = "/admin/access/apitoken/"
    selection = {"action": "revoke_tokens", "_selected_action": [issued.token.pk]}

    confirm = client.post(url, selection)
    assert confirm.status_code == 200 and b"reason" in confirm.content
    empty = client.post(url, {**selection, "apply": "Confirm", "reason": ""})
    assert empty.status_code == 200  # the form again, with its error
    assert ApiToken.objects.get(pk=issued.token.pk).revoked_at is None

    done = client.post(url, {**selection, "apply": "Confirm", "reason": "left the team"})
    assert done.status_code == 302
    assert ApiToken.objects.get(pk=issued.token.pk).revoked_at is not None
    event = AuditEvent.objects.get(action=PlatformAction.TOKEN_REVOKED)
    assert (event.reason, event.actor_label) == ("left the team", admin_member.user.username)


def test_actions_are_hidden_from_roles_that_may_not_use_them(client, viewer):
    client.force_login(viewer.user)
    page = client.get("/admin/access/membership/")
    assert page.status_code == 200
    assert "delete_selected" not in page.content.decode()
    assert client.get("/admin/access/membership/add/").status_code == 403


def test_a_user_issues_a_token_in_the_admin_and_sees_it_once(client, operator):
    client.force_login(operator.user)
    response = client.post(
        "/admin/access/apitoken/add/",
        {"org": operator.org.pk, "name": "laptop", "role": "operator"},
        follow=True,
    )
    texts = [str(m) for m in get_messages(response.wsgi_request)]
    token = ApiToken.objects.get(user=operator.user)
    assert any(f"fo_{token.key_id}_" in text for text in texts)
    assert AuditEvent.objects.filter(action=PlatformAction.TOKEN_CREATED, target_id=str(token.pk)).exists()
    too_high = client.post(
        "/admin/access/apitoken/add/", {"org": operator.org.pk, "name": "x", "role": "admin"}
    )
    assert too_high.status_code == 200
    assert ApiToken.objects.count() == 1
    denied = AuditEvent.objects.get(action=PlatformAction.DENIED)
    assert (denied.metadata["surface"], denied.metadata["what"]) == ("admin", "access.token_create")
    assert denied.metadata["asked"]["role"] == "admin"
