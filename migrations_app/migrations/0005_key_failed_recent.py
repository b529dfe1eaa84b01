"""The dashboard's ten newest failed keys, read from an index of failed keys only (built
CONCURRENTLY: the schedule keeps writing keys)."""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [("migrations_app", "0004_console_read_indexes")]

    operations = [
        AddIndexConcurrently(
            model_name="key",
            index=models.Index(
                condition=models.Q(("migration_status", "failed")),
                fields=["-migration_updated_at"],
                name="key_failed_recent",
            ),
        ),
    ]
