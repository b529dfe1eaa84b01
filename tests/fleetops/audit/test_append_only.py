from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import DatabaseError, connection, transaction

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent, PlatformAction
from fleetops.audit.services import AuditOutsideTransaction, audit_prune, record
from fleetops.lib import clock

pytestmark = pytest.mark.django_db


def _event(org=None, *, at=None):
    if at is None:
        with transaction.atomic():
            return record(action="test.thing", actor=Actor.system("test"), org=org)
    with clock.frozen(at), transaction.atomic():
        return record(action="test.thing", actor=Actor.system("test"), org=org)


def test_rows_cannot_be_updated_through_the_orm_or_sql(org):
    event = _event(org)
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEvent.objects.filter(pk=event.pk).update(reason="rewritten")
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        event.reason = "rewritten"
        event.save()
    with (
        pytest.raises(DatabaseError, match="append-only"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute("UPDATE audit_auditevent SET action = 'x'")
    event.refresh_from_db()
    assert event.reason == ""


def test_rows_cannot_be_deleted_not_even_old_ones_without_the_prune_flag(org):
    old = _event(org, at=clock.now() - timedelta(days=400))
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEvent.objects.filter(pk=old.pk).delete()
    with (
        pytest.raises(DatabaseError, match="append-only"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute("DELETE FROM audit_auditevent")
    assert AuditEvent.objects.filter(pk=old.pk).exists()


def test_the_prune_flag_never_unlocks_rows_younger_than_30_days(org):
    young = _event(org, at=clock.now() - timedelta(days=10))
    with (
        pytest.raises(DatabaseError, match="append-only"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute("SET LOCAL fleetops.audit_prune = 'on'")
        cursor.execute("DELETE FROM audit_auditevent WHERE id = %s", [young.pk])
    assert AuditEvent.objects.filter(pk=young.pk).exists()


def test_prune_deletes_only_rows_past_retention_and_records_itself(org):
    old = [_event(org, at=clock.now() - timedelta(days=500)) for _ in range(3)]
    kept = _event(org, at=clock.now() - timedelta(days=100))

    deleted = audit_prune(older_than_days=400, actor=Actor.system("test"))

    assert deleted == 3
    assert not AuditEvent.objects.filter(pk__in=[e.pk for e in old]).exists()
    assert AuditEvent.objects.filter(pk=kept.pk).exists()
    pruned = AuditEvent.objects.get(action=PlatformAction.AUDIT_PRUNED)
    assert pruned.metadata["deleted"] == 3


def test_prune_refuses_a_retention_under_30_days():
    with pytest.raises(ValueError):
        audit_prune(older_than_days=7, actor=Actor.system("test"))
    from django.core.management.base import CommandError

    with pytest.raises(CommandError):
        call_command("audit_prune", "--older-than-days", "7")


def test_record_captures_actor_target_changes_and_the_request_id(client, viewer):
    response = client.get("/health/live", HTTP_X_REQUEST_ID="req-123")
    assert response["X-Request-ID"] == "req-123"

    from fleetops.observability.context import bound

    with bound(request_id="req-abc"), transaction.atomic():
        event = record(
            action="test.changed",
            actor=Actor.for_user(viewer.user),
            org=viewer.org,
            target=viewer.org,
            reason="because",
            changes={"state": ["a", "b"]},
        )
    event.refresh_from_db()
    assert (event.actor_type, event.actor_id, event.actor_label) == (
        "user",
        str(viewer.user.pk),
        viewer.user.username,
    )
    assert (event.target_type, event.target_id) == ("access.organization", str(viewer.org.pk))
    assert event.changes == {"state": ["a", "b"]}
    assert event.request_id == "req-abc"


def test_an_unsafe_request_id_is_replaced(client, db):
    response = client.get("/health/live", HTTP_X_REQUEST_ID="bad id\nwith newline")
    assert response["X-Request-ID"] != "bad id\nwith newline"
    assert len(response["X-Request-ID"]) == 32


@pytest.mark.django_db(transaction=True)
def test_record_refuses_to_run_outside_a_transaction(org):
    with pytest.raises(AuditOutsideTransaction):
        record(action="test.loose", actor=Actor.system("test"), org=org)
    assert not AuditEvent.objects.filter(action="test.loose").exists()
    with transaction.atomic():
        record(action="test.loose", actor=Actor.system("test"), org=org)
    assert AuditEvent.objects.filter(action="test.loose").count() == 1
