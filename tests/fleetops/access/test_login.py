from __future__ import annotations

import pytest
from django.test import override_settings

from fleetops.audit.models import AuditEvent, PlatformAction

pytestmark = pytest.mark.django_db


def _login(client, username, password):
    return client.post("/admin/login/?next=/admin/", {"username": username, "password": password})


def test_a_failed_login_is_audited_without_the_password(client, viewer):
    response = _login(client, viewer.user.username, "wrong password 1")

    assert response.status_code == 200
    event = AuditEvent.objects.get(action=PlatformAction.LOGIN_FAILED)
    assert event.metadata["username"] == viewer.user.username
    assert "wrong password" not in str(event.metadata)
    assert event.org is None


def test_a_successful_login_is_audited(client, viewer):
    response = _login(client, viewer.user.username, "correct horse battery")
    assert response.status_code == 302
    assert AuditEvent.objects.filter(action=PlatformAction.LOGIN, actor_id=str(viewer.user.pk)).exists()


@override_settings(AXES_FAILURE_LIMIT=3)
def test_repeated_failures_lock_the_account_even_with_the_right_password(client, viewer):
    for attempt in range(3):
        _login(client, viewer.user.username, f"wrong {attempt}")

    locked = _login(client, viewer.user.username, "correct horse battery")

    assert locked.status_code == 429
    assert b"Too many failed logins" in locked.content
    assert "_auth_user_id" not in client.session
    assert AuditEvent.objects.filter(action=PlatformAction.LOGIN_LOCKED_OUT).exists()
    # Someone else from the same address is not locked out by this user's failures.
    assert _login(client, "someone-else", "x").status_code == 200
