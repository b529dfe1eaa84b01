"""Indexes for the audit log's search and actor filter.

The search document is an expression (see `fleetops.audit.selectors.search_document_sql`, whose
text this must match); its GIN index lets a search on millions of rows be an index lookup. Both
indexes are built CONCURRENTLY so a deploy does not lock the append-only table against writes.
"""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models

SEARCH_DOCUMENT = (
    "to_tsvector('simple'::regconfig, translate(action || ' ' || actor_label || ' ' || target_type"
    " || ' ' || target_id || ' ' || target_label || ' ' || request_id || ' ' || reason,"
    " '._:-/@', '      '))"
)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [("audit", "0002_append_only_trigger")]

    operations = [
        migrations.RunSQL(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS audit_search_document ON audit_auditevent "
            f"USING gin (({SEARCH_DOCUMENT}))",
            "DROP INDEX CONCURRENTLY IF EXISTS audit_search_document",
        ),
        AddIndexConcurrently(
            model_name="auditevent",
            index=models.Index(fields=["actor_type", "actor_id", "-id"], name="audit_actor"),
        ),
    ]
