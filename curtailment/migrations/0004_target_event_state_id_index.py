"""The targets' (event, state) index becomes (event, state, id), so the restore claim reads the next
batch of pending targets in id order off the index instead of sorting every pending target of the
event each tick; the event's own foreign-key index goes (the unique (event, device) constraint and
the new index both lead with the event), one index fewer to write on every target state change.
Built and dropped CONCURRENTLY so a deploy does not lock the targets table."""

from django.contrib.postgres.operations import AddIndexConcurrently, RemoveIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [("curtailment", "0003_event_search_indexes")]

    operations = [
        AddIndexConcurrently(
            model_name="curtailmenttarget",
            index=models.Index(fields=["event", "state", "id"], name="curtailtarget_event_state_id"),
        ),
        RemoveIndexConcurrently(model_name="curtailmenttarget", name="curtailtarget_event_state"),
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="curtailmenttarget",
                    name="event",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=models.deletion.CASCADE,
                        related_name="targets",
                        to="curtailment.curtailmentevent",
                    ),
                ),
            ],
            database_operations=[
                migrations.RunSQL(
                    "DROP INDEX CONCURRENTLY IF EXISTS curtailment_curtailmenttarget_event_id_74221b25",
                    "CREATE INDEX CONCURRENTLY IF NOT EXISTS curtailment_curtailmenttarget_event_id_74221b25 "
                    "ON curtailment_curtailmenttarget (event_id)",
                ),
            ],
        ),
    ]
