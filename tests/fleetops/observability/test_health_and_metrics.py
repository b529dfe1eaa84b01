from __future__ import annotations

import logging

import pytest

from fleetops.observability import registry
from fleetops.observability.heartbeats import heartbeat_beat
from fleetops.observability.logging import RequestContextFilter

pytestmark = pytest.mark.django_db


def test_live_does_no_io(client, django_assert_num_queries):
    with django_assert_num_queries(0):
        assert client.get("/health/live").json() == {"status": "ok"}


def test_ready_reports_a_failing_registered_check_as_503(client):
    assert client.get("/health/ready").status_code == 200
    registry.register_readiness_check("test-lease", lambda: "writer lease not held")
    try:
        response = client.get("/health/ready")
    finally:
        registry._readiness_checks.pop("test-lease")
    assert response.status_code == 503
    assert response.json()["problems"] == {"test-lease": "writer lease not held"}


def test_metrics_exposes_platform_and_database_derived_metrics(client):
    heartbeat_beat(name="test.loop", ok=True, duration=0.2)
    body = client.get("/metrics").content.decode()
    assert "# TYPE fleetops_platform_race_lost_total counter" in body
    assert "# TYPE fleetops_celery_task_duration_seconds histogram" in body
    assert 'fleetops_platform_heartbeat_age_seconds{name="test.loop"}' in body
    assert "django_http_requests_total_by_method_total" in body


def test_metrics_can_require_a_token(client, settings):
    settings.FLEETOPS_METRICS_TOKEN = "s3cret"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret").status_code == 200


def test_ops_status_is_staff_only_and_reports_every_check(client, viewer, django_user_model):
    assert client.get("/ops/status").status_code == 302
    nonstaff = django_user_model.objects.create_user("plain", password="x" * 12, is_staff=False)
    client.force_login(nonstaff)
    assert client.get("/ops/status").status_code == 302
    client.force_login(viewer.user)
    heartbeat_beat(name="test.loop", ok=False, error="boom")
    data = client.get("/ops/status?format=json").json()
    names = {check["name"]: check for check in data["checks"]}
    assert {"database", "broker", "beat schedules", "heartbeats", "leases"} <= set(names)
    assert names["database"]["status"] == "ok"
    assert names["heartbeats"]["status"] == "warn"
    assert names["heartbeats"]["rows"][0]["why"] == "last iteration failed: boom"
    assert "not ok: test.loop" in names["heartbeats"]["summary"]
    html = client.get("/ops/status")
    assert b"System status" in html.content


def test_logs_carry_the_request_id_and_actor():
    from fleetops.observability.context import bound

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    with bound(request_id="rid-1", actor="ada"):
        RequestContextFilter().filter(record)
    assert (getattr(record, "request_id", None), getattr(record, "actor", None)) == ("rid-1", "ada")


def test_a_schedule_is_late_only_after_twice_its_period(client, viewer):
    from datetime import timedelta

    from django_celery_beat.models import PeriodicTask

    from fleetops.audit.actors import Actor
    from fleetops.lib import clock
    from fleetops.observability.platform_checks import check_beat
    from fleetops.observability.sync import schedules_sync

    schedules_sync(actor=Actor.system("test"))
    assert check_beat().status == "ok"  # just created, never ran: not late yet

    PeriodicTask.objects.filter(name="platform.worker_heartbeat").update(last_run_at=clock.now())
    with clock.frozen(clock.now() + timedelta(seconds=2 * 30 + 61)):
        result = check_beat()
    late = {row["schedule"] for row in result.rows if row["late"]}
    assert result.status == "warn"
    assert "platform.worker_heartbeat" in late
    assert "platform.audit_prune" not in late  # daily, created two minutes ago
