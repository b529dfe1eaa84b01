# A protocol is identified by (chain, protocol id) instead of the protocol id alone.
#
# Existing rows keep their data and the chain they already point at (`Protocol.chain`, set by
# `protocol_setup` from `--chain`): the old primary key (`SEP41`, …) moves to `protocol_id`, the
# rows get a numeric surrogate key that every table of the protocol follows (contracts, state
# changes, write spans, balances, owners), and the cursors are renamed after chain and protocol
# (`protocol_<ID>_history_cursor` -> `protocol_<chain>_<ID>_history_cursor`).

from django.db import migrations, models

P = "migrations_app_protocol"
CHILDREN = (
    "migrations_app_protocolcontract",
    "migrations_app_protocolstatechange",
    "migrations_app_protocolwritespan",
    "migrations_app_protocolbalance",
    "migrations_app_protocolnftowner",
)

# 1. Keep the protocol id, then relabel the key with numbers (the foreign keys are deferred, so the
#    rows follow within the transaction; checked before the type change below).
RELABEL = [
    f"UPDATE {P} SET protocol_id = id",  # noqa: S608 - table names are constants
    f"""UPDATE {P} p SET id = n.rank::text
        FROM (SELECT id, row_number() OVER (ORDER BY id) AS rank FROM {P}) n WHERE p.id = n.id""",  # noqa: S608
    *(
        f"UPDATE {child} c SET protocol_id = p.id FROM {P} p WHERE c.protocol_id = p.protocol_id"  # noqa: S608
        for child in CHILDREN
    ),
    "SET CONSTRAINTS ALL IMMEDIATE",
]
# 2. The identity starts after the relabelled keys.
RESTART_IDENTITY = (
    f"SELECT setval(pg_get_serial_sequence('{P}', 'id'), coalesce(max(id), 0) + 1, false) FROM {P}"  # noqa: S608
)
# 3. Cursors named after chain and protocol.
RENAME_CURSORS = f"""
UPDATE migrations_app_cursor c
SET name = 'protocol_' || ch.slug || '_' || p.protocol_id || '_' || m.migration || '_cursor'
FROM {P} p
JOIN indexer_chain ch ON ch.id = p.chain_id
CROSS JOIN (VALUES ('history'), ('current_state')) AS m(migration)
WHERE c.name = 'protocol_' || p.protocol_id || '_' || m.migration || '_cursor'
"""  # noqa: S608


class Migration(migrations.Migration):
    dependencies = [
        ("indexer", "0003_event_type_keyset_index"),
        ("migrations_app", "0001_initial"),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="protocol",
            options={"ordering": ["protocol_id", "chain_id"]},
        ),
        migrations.AddField(
            model_name="protocol",
            name="protocol_id",
            field=models.CharField(
                help_text="SEP41, SEP50, … (the classifier's id)", max_length=32, null=True
            ),
        ),
        migrations.RunSQL(RELABEL, reverse_sql=migrations.RunSQL.noop, elidable=False),
        migrations.AlterField(
            model_name="protocol",
            name="id",
            field=models.BigAutoField(primary_key=True, serialize=False),
        ),
        migrations.RunSQL(RESTART_IDENTITY, reverse_sql=migrations.RunSQL.noop),
        migrations.AlterField(
            model_name="protocol",
            name="protocol_id",
            field=models.CharField(help_text="SEP41, SEP50, … (the classifier's id)", max_length=32),
        ),
        migrations.RunSQL(RENAME_CURSORS, reverse_sql=migrations.RunSQL.noop),
        migrations.AddConstraint(
            model_name="protocol",
            constraint=models.UniqueConstraint(
                fields=("chain", "protocol_id"), name="protocol_chain_identity"
            ),
        ),
    ]
