"""The console's search by request id, on an index (built CONCURRENTLY: requests keep enqueueing)."""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [("outbox", "0001_initial")]

    operations = [
        AddIndexConcurrently(
            model_name="outboxmessage",
            index=models.Index(fields=["request_id"], name="outbox_request_id"),
        ),
    ]
