"""Indexes for the console's key reads at fleet scale: the search by owner address; the stuck and
overdue filters and the dashboard's oldest due key (partial indexes, as small as the due set); a
key's stake transactions newest first. Built CONCURRENTLY so a deploy does not lock the tables
against the schedule's writes."""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("access", "0002_apitoken_verbose_name"),
        ("migrations_app", "0003_stake_tx_unknown_outcome"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="key",
            index=models.Index(fields=["owner_address"], name="key_owner_address"),
        ),
        AddIndexConcurrently(
            model_name="key",
            index=models.Index(
                condition=models.Q(("migration_status__in", ("scheduled", "retrying"))),
                fields=["migration_scheduled_at"],
                name="key_due_scheduled",
            ),
        ),
        AddIndexConcurrently(
            model_name="key",
            index=models.Index(
                condition=models.Q(
                    ("migration_next_attempt_at__isnull", True),
                    ("migration_status__in", ("scheduled", "retrying")),
                ),
                fields=["migration_updated_at"],
                name="key_in_flight",
            ),
        ),
        AddIndexConcurrently(
            model_name="staketransaction",
            index=models.Index(fields=["key", "-id"], name="staketx_key_id"),
        ),
    ]
