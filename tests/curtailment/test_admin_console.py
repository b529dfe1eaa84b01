"""The event pages as each role sees them: the update form keeps the event's title apart from the
audit reason, a viewer is not offered what they cannot do and meets a console page (not a bare 403)
when they try, and a terminate cancels the targets nothing was sent to."""

from __future__ import annotations

import re

import pytest

from curtailment.models import CurtailmentEvent, CurtailmentTarget
from curtailment.planning import StartRequest
from curtailment.services import curtailment_start
from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent

pytestmark = pytest.mark.django_db
EVENTS = "/admin/curtailment/curtailmentevent"


def _event(member, **kw):
    kw.setdefault("target_kw", 6.0)
    kw.setdefault("reason", "grid request 42")
    kw.setdefault("restore_batch_interval_sec", 30)
    return curtailment_start(org=member.org, actor=Actor.for_user(member.user), req=StartRequest(**kw)).event


def _value(page: str, name: str) -> str | None:
    tag = re.search(rf'<input[^>]*name="{name}"[^>]*>', page)
    if tag is None:
        return None
    value = re.search(r'value="([^"]*)"', tag.group(0))
    return value.group(1) if value else ""


def test_the_update_form_is_prefilled_with_the_events_values(client, operator, fleet):
    event = _event(operator, max_duration_seconds=3600)
    client.force_login(operator.user)
    page = client.get(f"{EVENTS}/{event.pk}/action/update/").content.decode()
    assert _value(page, "title") == "grid request 42"
    assert _value(page, "restore_batch_interval_sec") == "30"
    assert _value(page, "max_duration_seconds") == "3600"
    assert page.count("<h1>") == 1  # the page title once


def test_an_update_keeps_the_title_and_puts_the_reason_in_the_audit_log(client, operator, fleet):
    event = _event(operator)
    client.force_login(operator.user)
    form = {
        "title": "grid request 42",
        "restore_batch_size": "",
        "restore_batch_interval_sec": "45",
        "max_duration_seconds": "",
        "reason": "slower restore asked by the site",
    }
    assert client.post(f"{EVENTS}/{event.pk}/action/update/", form).status_code == 302
    event.refresh_from_db()
    assert (event.reason, event.restore_batch_interval_sec) == ("grid request 42", 45)
    row = AuditEvent.objects.get(action="curtailment.updated")
    assert row.reason == "slower restore asked by the site"
    assert row.changes == {"restore_batch_interval_sec": [30, 45]}


def test_a_new_title_is_an_edit_of_its_own_with_the_reason_apart(client, operator, fleet):
    event = _event(operator)
    client.force_login(operator.user)
    form = {"title": "grid request 43", "restore_batch_interval_sec": "30", "reason": "typo in the ticket"}
    assert client.post(f"{EVENTS}/{event.pk}/action/update/", form).status_code == 302
    event.refresh_from_db()
    assert event.reason == "grid request 43"
    row = AuditEvent.objects.get(action="curtailment.updated")
    assert row.reason == "typo in the ticket"
    assert row.changes == {"reason": ["grid request 42", "grid request 43"]}


def test_an_update_that_changes_nothing_writes_nothing(client, operator, fleet):
    event = _event(operator)
    client.force_login(operator.user)
    form = {"title": "grid request 42", "restore_batch_interval_sec": "30", "reason": "just checking"}
    response = client.post(f"{EVENTS}/{event.pk}/action/update/", form, follow=True)
    assert b"Nothing changed" in response.content
    assert not AuditEvent.objects.filter(action="curtailment.updated").exists()


def test_the_api_update_still_sets_the_title_from_reason(operator, fleet):
    event = _event(operator)
    client = operator.token_client()
    response = client.patch(f"/api/v1/curtailment/events/{event.uuid}", {"reason": "renamed"}, format="json")
    assert response.status_code == 200, response.content
    event.refresh_from_db()
    assert event.reason == "renamed"
    assert AuditEvent.objects.get(action="curtailment.updated").reason == "renamed"


def test_a_viewer_is_not_offered_the_start_link_and_an_operator_is(client, viewer, operator, fleet):
    client.force_login(viewer.user)
    dashboard = client.get("/admin/").content.decode()
    assert "All events" in dashboard
    assert "/admin/curtailment/curtailmentevent/start/" not in dashboard
    client.force_login(operator.user)
    assert "/admin/curtailment/curtailmentevent/start/" in client.get("/admin/").content.decode()


def test_a_refusal_is_a_console_page_naming_the_role_and_is_audited(client, viewer, fleet):
    client.force_login(viewer.user)
    page = client.get(f"{EVENTS}/start/")
    assert page.status_code == 403
    html = page.content.decode()
    assert "Starting an event needs the operator role." in html
    assert 'id="site-name"' in html and "Permission denied" in html  # inside the admin layout
    assert "Your role: <strong>Viewer</strong>" in html
    assert AuditEvent.objects.filter(action="access.denied").count() == 1


def test_a_refused_object_action_names_the_role_it_needs(client, operator, fleet):
    event = _event(operator)
    client.force_login(operator.user)
    page = client.get(f"{EVENTS}/{event.pk}/action/terminate/")
    assert page.status_code == 403
    html = page.content.decode()
    assert "Terminate needs the Admin role." in html and 'id="site-name"' in html
    assert AuditEvent.objects.filter(action="access.denied").exists()
    assert CurtailmentEvent.objects.get().state == "pending"


def test_terminating_a_pending_event_cancels_targets_never_sent_a_command(client, admin_member, fleet):
    event = _event(admin_member)
    client.force_login(admin_member.user)
    response = client.post(
        f"{EVENTS}/{event.pk}/action/terminate/",
        {"target_state": "cancelled", "reason": "site withdrew the request"},
        follow=True,
    )
    assert b"targets never sent a command are cancelled" in response.content
    states = set(CurtailmentTarget.objects.filter(event=event).values_list("state", "last_error"))
    assert states == {("cancelled", "")}
    assert AuditEvent.objects.get(action="curtailment.admin_terminated").reason == "site withdrew the request"
    page = client.get(f"{EVENTS}/{event.pk}/change/").content.decode()
    assert "site withdrew the request" not in page.split("Targets")[-1]  # not shown as a target's error


def test_kilowatts_are_spelled_kw(client, operator, fleet):
    event = _event(operator)
    client.force_login(operator.user)
    for url in (f"{EVENTS}/", f"{EVENTS}/{event.pk}/change/", f"{EVENTS}/start/"):
        page = client.get(url).content.decode()
        assert "Target kW" in page, url
        assert "Target kw" not in page, url
