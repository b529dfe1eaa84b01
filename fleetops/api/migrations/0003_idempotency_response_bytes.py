# Stored idempotent responses become the bytes sent (with status and headers) instead of a jsonb
# copy, so a replay is byte-for-byte the first answer. Rows stored before keep working: their body
# is rendered once from the jsonb copy, as the API's JSON renderer does.

import json

from django.db import migrations, models

CHUNK = 500


def backfill_response_bytes(apps, schema_editor):
    IdempotencyKey = apps.get_model("api", "IdempotencyKey")
    pending = IdempotencyKey.objects.filter(response_status__isnull=False, response_content__isnull=True)
    while True:
        rows = list(pending.only("pk", "response_body")[:CHUNK])
        if not rows:
            return
        for row in rows:
            if row.response_body is None:
                row.response_content = b""
                row.response_headers = {}
            else:
                text = json.dumps(row.response_body, ensure_ascii=False, separators=(",", ":"))
                row.response_content = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode()
                row.response_headers = {"Content-Type": "application/json"}
        IdempotencyKey.objects.bulk_update(rows, ["response_content", "response_headers"])


def restore_response_body(apps, schema_editor):
    IdempotencyKey = apps.get_model("api", "IdempotencyKey")
    for row in IdempotencyKey.objects.filter(response_content__isnull=False).iterator():
        content = bytes(row.response_content)
        row.response_body = json.loads(content) if content else None
        row.save(update_fields=["response_body"])


class Migration(migrations.Migration):

    dependencies = [
        ('access', '0002_apitoken_verbose_name'),
        ('api', '0002_cache_table'),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name='idempotencykey',
            name='idempotency_completed_has_response',
        ),
        migrations.AddField(
            model_name='idempotencykey',
            name='response_content',
            field=models.BinaryField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='idempotencykey',
            name='response_headers',
            field=models.JSONField(blank=True, default=dict),
        ),
        migrations.RunPython(backfill_response_bytes, restore_response_body, elidable=True),
        migrations.RemoveField(
            model_name='idempotencykey',
            name='response_body',
        ),
        migrations.AddConstraint(
            model_name='idempotencykey',
            constraint=models.CheckConstraint(condition=models.Q(('state', 'in_flight'), models.Q(('response_content__isnull', False), ('response_status__isnull', False)), _connector='OR'), name='idempotency_completed_has_response'),
        ),
    ]
