"""The event page in the live console: its fragment (same partial as the page, scoped like it, pinned
queries), the power chart with commanded and observed power and the target band, and the "stuck"
flag at its thresholds."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.test import override_settings

from curtailment.admin import commanded_power
from curtailment.models import CurtailmentEvent, CurtailmentTarget, DesiredState, DeviceSample, EventState
from curtailment.planning import StartRequest
from curtailment.selectors import event_stuck, restore_allowance_seconds
from curtailment.services import curtailment_start
from fleetops.admin_live import FRAGMENT_HEADER
from fleetops.audit.actors import Actor
from fleetops.lib import clock

pytestmark = pytest.mark.django_db
EVENTS = "/admin/curtailment/curtailmentevent"


def _event(member, **kw):
    kw.setdefault("target_kw", 6.0)
    kw.setdefault("tolerance_kw", 1.0)
    kw.setdefault("reason", "grid request")
    return curtailment_start(org=member.org, actor=Actor.for_user(member.user), req=StartRequest(**kw)).event


def test_the_event_page_is_live_and_its_fragment_is_the_same_partial(client, viewer, operator, fleet):
    event = _event(operator)
    client.force_login(viewer.user)
    page = client.get(f"{EVENTS}/{event.pk}/change/").content.decode()
    assert f'data-live="curtailment-event" data-live-url="{EVENTS}/{event.pk}/live/?targets_page=1"' in page
    assert "fleetops/console.js" in page
    fragment = client.get(f"{EVENTS}/{event.pk}/live/", {"targets_page": 1})
    assert fragment.status_code == 200 and fragment[FRAGMENT_HEADER] == "1"
    body = fragment.content.decode()
    assert 'id="curtailment-event-targets"' in body and 'data-live-field="state">pending<' in body
    assert "data-live-status" in body and "m-00" in body
    assert 'id="curtailment-event-targets"' in page  # the page rendered the same partial first
    assert "/action/" not in body  # a viewer reads; acting stays on the page's role-gated actions


def test_another_organizations_event_fragment_is_not_found(client, operator, outsider, fleet):
    event = _event(operator)
    client.force_login(outsider.user)
    assert client.get(f"{EVENTS}/{event.pk}/live/").status_code == 404
    assert client.get(f"{EVENTS}/{event.pk}/change/").status_code in (302, 404)


def test_the_event_fragment_query_count_is_pinned(client, operator, fleet, django_assert_max_num_queries):
    event = _event(operator)
    client.force_login(operator.user)
    client.get(f"{EVENTS}/{event.pk}/live/")
    with django_assert_max_num_queries(10):
        assert client.get(f"{EVENTS}/{event.pk}/live/").status_code == 200


def test_the_power_chart_draws_observed_commanded_and_the_target_band(client, operator, fleet):
    event = _event(operator, target_kw=6.0, tolerance_kw=1.0)
    now = clock.now()
    targets = list(CurtailmentTarget.objects.filter(event=event))
    CurtailmentTarget.objects.filter(event=event).update(last_dispatched_at=now)
    DeviceSample.objects.bulk_create(
        [DeviceSample(device_id=t.device_id, taken_at=now, power_w=100, hash_rate_hs=1) for t in targets]
    )
    client.force_login(operator.user)
    body = client.get(f"{EVENTS}/{event.pk}/live/").content.decode()
    assert '<polyline class="fo-series"' in body
    assert "<title>observed</title>" in body and "<title>commanded</title>" in body
    assert 'class="fo-band"' in body
    baseline_kw = sum(t.baseline_power_w or 0.0 for t in targets) / 1000
    assert f"target {baseline_kw - 6.0:.1f} kW ± 1" in body
    assert re.search(r'class="fo-x-label"[^>]*>\d\d:\d\d<', body)  # a time axis


def test_commanded_power_steps_down_at_curtail_commands_and_back_at_restores(operator, fleet):
    event = _event(operator)
    start = event.created_at - timedelta(minutes=2)
    t1, t2 = event.created_at + timedelta(seconds=30), event.created_at + timedelta(minutes=5)
    commands = [
        (DesiredState.CURTAILED, t1, 3000.0),  # curtailed at t1, still curtailed
        (DesiredState.CURTAILED, None, 3000.0),  # not yet dispatched: nothing commanded
        (DesiredState.ACTIVE, t2, 3000.0),  # restored at t2 (curtailed from the event's start)
    ]
    points = commanded_power(event, commands=commands, start=start, baseline_w=9000.0)
    assert points == [(start, 9.0), (event.created_at, 6.0), (t1, 3.0), (t2, 6.0)]


def test_a_pending_event_is_stuck_only_past_its_threshold(operator, fleet):
    event = _event(operator)
    with override_settings(FLEETOPS_CURTAILMENT_PENDING_STUCK_SECONDS=600):
        assert event_stuck(event, now=event.created_at + timedelta(seconds=600)) == ""
        why = event_stuck(event, now=event.created_at + timedelta(seconds=601))
    assert why.startswith("pending for 10 min")


def test_a_restoring_event_is_stuck_past_its_restore_plan_plus_the_grace(operator, fleet):
    event = _event(operator)
    CurtailmentEvent.objects.filter(pk=event.pk).update(
        state=EventState.RESTORING, effective_batch_size=2, restore_batch_interval_sec=30
    )
    event.refresh_from_db()
    selected = event.decision_snapshot["selected_count"]
    with override_settings(FLEETOPS_CURTAILMENT_RESTORE_GRACE_SECONDS=60):
        allowance = restore_allowance_seconds(event)
        assert allowance == -(-selected // 2) * 30 + 60
        assert event_stuck(event, now=event.updated_at + timedelta(seconds=allowance)) == ""
        assert "restore plan allows" in event_stuck(
            event, now=event.updated_at + timedelta(seconds=allowance + 1)
        )


def test_active_and_finished_events_are_never_stuck(operator, fleet):
    event = _event(operator)
    for state in (EventState.ACTIVE, EventState.COMPLETED):
        event.state = state
        assert event_stuck(event, now=event.created_at + timedelta(days=30)) == ""


def test_the_changelist_and_the_page_flag_a_stuck_event(client, viewer, operator, fleet):
    event = _event(operator)
    CurtailmentEvent.objects.filter(pk=event.pk).update(created_at=clock.now() - timedelta(hours=2))
    client.force_login(viewer.user)
    listing = client.get(f"{EVENTS}/").content.decode()
    assert 'class="fo-stuck"' in listing
    fragment = client.get(f"{EVENTS}/{event.pk}/live/").content.decode()
    assert 'data-live-field="stuck"' in fragment and "expected active within" in fragment


def test_a_viewer_watches_the_live_page_but_cannot_act(client, viewer, operator, fleet):
    event = _event(operator)
    client.force_login(viewer.user)
    assert client.get(f"{EVENTS}/{event.pk}/live/").status_code == 200
    assert client.post(f"{EVENTS}/{event.pk}/action/stop/", {"reason": "x"}).status_code == 403
    assert CurtailmentEvent.objects.get(pk=event.pk).state == EventState.PENDING
