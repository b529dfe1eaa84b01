from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from curtailment.models import CurtailmentEvent, CurtailmentTarget, DeviceSample, OrgCurtailmentConfig
from curtailment.planning import StartRequest
from curtailment.services import curtailment_start
from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock

pytestmark = pytest.mark.django_db


def _event(member, **kw):
    kw.setdefault("target_kw", 6.0)
    kw.setdefault("reason", "grid request")
    return curtailment_start(org=member.org, actor=Actor.for_user(member.user), req=StartRequest(**kw)).event


def test_the_start_page_previews_then_starts(client, operator, fleet):
    client.force_login(operator.user)
    form = {
        "org": operator.org.slug,
        "target_kw": "7",
        "tolerance_kw": "0",
        "priority": "normal",
        "reason": "peak price",
        "restore_batch_interval_sec": "30",
    }
    preview = client.post("/admin/curtailment/curtailmentevent/start/", {**form, "preview": "1"})
    assert preview.status_code == 200
    assert b"Plan: 3 devices" in preview.content
    assert not CurtailmentEvent.objects.exists()

    started = client.post("/admin/curtailment/curtailmentevent/start/", {**form, "confirm": "1"})
    event = CurtailmentEvent.objects.get()
    assert started.status_code == 302
    assert started["Location"].endswith(f"/{event.pk}/change/")
    assert event.reason == "peak price"


def test_the_start_page_shows_insufficient_load_and_changes_nothing(client, operator, fleet):
    client.force_login(operator.user)
    page = client.post(
        "/admin/curtailment/curtailmentevent/start/",
        {"org": operator.org.slug, "target_kw": "900", "priority": "normal", "reason": "x", "confirm": "1"},
    )
    assert page.status_code == 200
    assert b"insufficient curtailable load" in page.content
    assert not CurtailmentEvent.objects.exists()


def test_viewers_cannot_open_the_start_page_and_the_refusal_is_audited(client, viewer, fleet):
    client.force_login(viewer.user)
    assert client.get("/admin/curtailment/curtailmentevent/start/").status_code == 403
    denied = AuditEvent.objects.get(action="access.denied")
    assert denied.actor_id == str(viewer.user.pk)
    assert (denied.metadata["surface"], denied.metadata["what"]) == (
        "admin",
        "curtailment.start (start page)",
    )


def test_the_event_page_shows_targets_snapshot_chart_and_the_allowed_buttons(
    client, operator, admin_member, fleet
):
    event = _event(operator)
    target = event.targets.first()
    DeviceSample.objects.create(
        device_id=target.device_id, taken_at=clock.now(), power_w=2900, hash_rate_hs=1
    )
    client.force_login(operator.user)
    page = client.get(f"/admin/curtailment/curtailmentevent/{event.pk}/change/").content.decode()
    assert "Decision snapshot" in page and "<polyline" in page
    assert "m-009" in page
    assert "action/stop/" in page and "action/update/" in page
    assert "action/terminate/" not in page  # admin only
    client.force_login(admin_member.user)
    assert (
        "action/terminate/"
        in client.get(f"/admin/curtailment/curtailmentevent/{event.pk}/change/").content.decode()
    )


def test_object_actions_ask_for_a_reason_call_the_service_and_deny_by_role(client, operator, fleet):
    event = _event(operator)
    client.force_login(operator.user)
    url = f"/admin/curtailment/curtailmentevent/{event.pk}/action/stop/"
    assert client.post(url, {"reason": ""}).status_code == 200  # form with its error
    assert CurtailmentEvent.objects.get().state == "pending"
    assert client.post(url, {"reason": "price dropped"}).status_code == 302
    assert CurtailmentEvent.objects.get().state == "restoring"
    assert AuditEvent.objects.get(action="curtailment.stopped").reason == "price dropped"

    denied = client.post(
        f"/admin/curtailment/curtailmentevent/{event.pk}/action/terminate/",
        {"reason": "x", "target_state": "cancelled"},
    )
    assert denied.status_code == 403
    assert AuditEvent.objects.filter(action="access.denied").exists()
    assert CurtailmentEvent.objects.get().state == "restoring"


def test_terminate_from_the_admin_reports_the_in_flight_gate_on_the_form(client, admin_member, fleet):
    event = _event(admin_member)
    CurtailmentTarget.objects.update(state="dispatched")
    client.force_login(admin_member.user)
    page = client.post(
        f"/admin/curtailment/curtailmentevent/{event.pk}/action/terminate/",
        {"reason": "stuck", "target_state": "cancelled"},
    )
    assert page.status_code == 200
    assert b"in-flight curtail commands" in page.content
    assert CurtailmentEvent.objects.get().state == "pending"


def test_the_devices_changelist_shows_the_lock_and_its_query_count_is_flat(client, operator, fleet):
    _event(operator)
    client.force_login(operator.user)
    with CaptureQueriesContext(connection) as queries:
        page = client.get("/admin/curtailment/device/")
    assert page.status_code == 200
    assert "locked (pending)" in page.content.decode()
    from tests.curtailment.conftest import make_fleet

    make_fleet(operator.org, 40, start=100)
    with CaptureQueriesContext(connection) as more:
        client.get("/admin/curtailment/device/")
    assert len(more) == len(queries)


def test_only_admins_edit_the_org_config_and_the_change_is_audited(client, operator, admin_member):
    client.force_login(operator.user)
    assert client.get("/admin/curtailment/orgcurtailmentconfig/add/").status_code == 403
    client.force_login(admin_member.user)
    response = client.post(
        "/admin/curtailment/orgcurtailmentconfig/add/",
        {
            "org": admin_member.org.pk,
            "gateway_url": "http://127.0.0.1:9/",
            "max_duration_default_sec": 7200,
            "candidate_min_power_w": 1500,
            "post_event_cooldown_sec": 600,
            "restore_interval_cap_sec": 300,
            "curtail_confirm_timeout_sec": 300,
        },
    )
    assert response.status_code == 302, response.content[:2000]
    assert OrgCurtailmentConfig.objects.get().max_duration_default_sec == 7200
    audit = AuditEvent.objects.get(action="curtailment.config_updated")
    assert audit.changes["max_duration_default_sec"] == [14400, 7200]


def test_the_dashboard_has_a_curtailment_card(client, operator, fleet):
    _event(operator)
    client.force_login(operator.user)
    page = client.get("/admin/").content.decode()
    assert 'id="card-curtailment"' in page
    assert "never ran" in page  # no reconciler tick yet


def test_the_reconciler_status_endpoint(viewer):
    body = viewer.token_client().get("/api/v1/curtailment/reconciler").json()
    assert body["last_tick_at"] is None and body["live_events"] == 0


def test_the_event_page_draws_its_state_machine_with_the_current_state(client, operator, fleet):
    event = _event(operator)
    client.force_login(operator.user)
    page = client.get(f"/admin/curtailment/curtailmentevent/{event.pk}/change/").content.decode()
    assert 'aria-label="curtailment.event state diagram"' in page
    assert 'class="state current" data-state="pending"' in page
    assert page.count('class="state current"') == 1


def test_a_stop_reason_past_the_one_cap_is_refused_on_the_form(client, operator, fleet):
    from fleetops.lib.reason import REASON_MAX_LENGTH

    event = _event(operator)
    client.force_login(operator.user)
    url = f"/admin/curtailment/curtailmentevent/{event.pk}/action/stop/"
    page = client.post(url, {"reason": "x" * (REASON_MAX_LENGTH + 1)})
    assert page.status_code == 200 and b"errorlist" in page.content
    assert CurtailmentEvent.objects.get().state == "pending"
    assert client.post(url, {"reason": "x" * REASON_MAX_LENGTH}).status_code == 302
    assert AuditEvent.objects.get(action="curtailment.stopped").reason == "x" * REASON_MAX_LENGTH
