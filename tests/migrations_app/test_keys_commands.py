from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from fleetops.audit.models import AuditEvent
from fleetops.notifications.models import NotificationChannel
from migrations_app.models.keys import AddressGroup, Key, OrgKeyConfig
from tests.migrations_app.keys_fixtures import make_group, make_keys

pytestmark = pytest.mark.django_db


def test_keys_retry_retries_every_failed_key_as_the_named_operator(operator, org):
    keys = make_keys(org, 2, group=make_group(org))
    Key.objects.filter(pk=keys[0].pk).update(
        migration_status="failed", migration_attempts=5, migration_max_attempts=5
    )
    out = StringIO()
    call_command(
        "keys_retry",
        "--org",
        org.slug,
        "--user",
        operator.user.username,
        "--reason",
        "rpc fixed",
        "--all-failed",
        stdout=out,
    )
    assert "retried 1 key(s)" in out.getvalue()
    audit = AuditEvent.objects.get(action="keys.migration_retried")
    assert audit.actor_label == operator.user.username and audit.reason == "rpc fixed"


def test_keys_retry_refuses_a_viewer(viewer, org):
    keys = make_keys(org, 1, group=make_group(org))
    with pytest.raises(CommandError):
        call_command(
            "keys_retry",
            "--org",
            org.slug,
            "--user",
            viewer.user.username,
            "--reason",
            "x",
            "--ids",
            str(keys[0].pk),
        )


def test_the_demo_seed_is_idempotent_and_wires_the_chain_and_a_failure_channel(org):
    org.slug = "demo"
    org.save()
    with override_settings(DEBUG=True):
        for _ in range(2):
            call_command(
                "keys_demo_seed", "--rpc-url", "http://127.0.0.1:9", "--keys", "12", stdout=StringIO()
            )
    assert Key.objects.filter(org=org).count() == 12
    assert AddressGroup.objects.filter(org=org).count() == 3
    assert OrgKeyConfig.objects.get(org=org).max_attempts == 3
    assert NotificationChannel.objects.get(org=org).subscriptions.get().event_type == "keys.migration_failed"
