from __future__ import annotations

import pytest

from fleetops.lib import clock
from migrations_app.keys.metrics import collect_states
from migrations_app.models.keys import Key
from tests.migrations_app.keys_fixtures import make_keys

pytestmark = pytest.mark.django_db


def test_the_collector_reports_keys_by_status_failed_keys_and_the_oldest_scheduled_age(org):
    keys = make_keys(org, 3)
    Key.objects.filter(pk=keys[0].pk).update(
        migration_status="failed", migration_max_attempts=5, migration_attempts=5
    )
    Key.objects.filter(pk=keys[1].pk).update(
        migration_status="scheduled", migration_scheduled_at=clock.now().replace(year=2020)
    )
    families = {f.name: f for f in collect_states()}
    by_status = {s.labels["status"]: s.value for s in families["fleetops_keys_by_migration_status"].samples}
    assert by_status == {"none": 1, "scheduled": 1, "retrying": 0, "succeeded": 0, "failed": 1}
    assert families["fleetops_keys_failed"].samples[0].value == 1
    assert families["fleetops_keys_oldest_scheduled_age_seconds"].samples[0].value > 86400


def test_the_metrics_endpoint_exposes_the_key_gauges(client, org):
    make_keys(org, 1)
    body = client.get("/metrics").content.decode()
    assert 'fleetops_keys_by_migration_status{status="none"} 1.0' in body
    # The early kick's failures are the outbox's, by task (deploy/prometheus/keys.rules.yml).
    assert "fleetops_outbox_send_failures_total" in body
