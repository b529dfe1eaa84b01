"""Indexes for the console's event search: a trigram index on UPPER(reason) (what `reason__icontains`
compares) and the external reference. pg_trgm ships with PostgreSQL and is a trusted extension (the
database owner may create it). Built CONCURRENTLY so a deploy does not lock the events table."""

from django.contrib.postgres.indexes import GinIndex, OpClass
from django.contrib.postgres.operations import AddIndexConcurrently, TrigramExtension
from django.db import migrations, models
from django.db.models.functions import Upper


class Migration(migrations.Migration):
    atomic = False

    dependencies = [("curtailment", "0002_target_cancelled_and_kw_labels")]

    operations = [
        TrigramExtension(),
        # The SQL by hand: Django renders this expression with its operator class inside the
        # expression's parentheses, which PostgreSQL refuses.
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AddIndex(
                    model_name="curtailmentevent",
                    index=GinIndex(OpClass(Upper("reason"), name="gin_trgm_ops"), name="curtailevent_reason_trgm"),
                ),
            ],
            database_operations=[
                migrations.RunSQL(
                    "CREATE INDEX CONCURRENTLY IF NOT EXISTS curtailevent_reason_trgm "
                    "ON curtailment_curtailmentevent USING gin ((UPPER(reason)) gin_trgm_ops)",
                    "DROP INDEX CONCURRENTLY IF EXISTS curtailevent_reason_trgm",
                ),
            ],
        ),
        AddIndexConcurrently(
            model_name="curtailmentevent",
            index=models.Index(
                condition=models.Q(("external_reference__isnull", False)),
                fields=["external_reference"],
                name="curtailevent_external_ref",
            ),
        ),
    ]
