"""Blocks, transactions and events become partitioned tables: LIST by chain, then RANGE by height
(see `indexer.partitions` for the layout and why). Django does not create partitioned tables, so
the database side is SQL; the model state only learns that the chain foreign key carries no index
of its own (within a chain's partition every row has the same chain, so it would never be used).

Forward, per table, in the migration's transaction: create the partitioned table and its DEFAULT
partition, one LIST partition per chain that has rows with the range partitions covering them, move
the rows (INSERT ... SELECT), drop the old table, then add the keys, indexes and the foreign key on
the partitioned table (built once over the loaded rows). The id sequence continues where the old
identity stood. Backward does the opposite: one plain table with an identity column again.

The rows are copied once: on a large existing index, run it in a maintenance window (it writes
about as fast as `INSERT ... SELECT` of the table with its indexes).
"""

# ruff: noqa: S608 - every name in these statements is a constant of this migration

from __future__ import annotations

from typing import Any

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

# Per table: its columns in order, its unique constraints and its plain indexes (as the models
# declare them), the name of the foreign key to indexer_chain and of the old chain_id index.
TABLES: dict[str, dict[str, Any]] = {
    "indexer_block": {
        "columns": "id, height, hash, parent_hash, time, proposer, tx_count, chain_id",
        "unique": {"block_identity": "UNIQUE (chain_id, height)"},
        "indexes": {"block_chain_hash": "(chain_id, hash)"},
        "fk": "indexer_block_chain_id_577145ca_fk_indexer_chain_id",
        "fk_index": "indexer_block_chain_id_577145ca",
    },
    "indexer_transaction": {
        "columns": 'id, height, "index", hash, code, gas_wanted, gas_used, chain_id',
        "unique": {"tx_identity": 'UNIQUE (chain_id, height, "index")'},
        "indexes": {"tx_chain_hash": "(chain_id, hash)"},
        "fk": "indexer_transaction_chain_id_c7d1c318_fk_indexer_chain_id",
        "fk_index": "indexer_transaction_chain_id_c7d1c318",
    },
    "indexer_event": {
        "columns": "id, height, phase, tx_index, event_index, type, attributes, chain_id",
        "unique": {
            "event_identity": "UNIQUE NULLS NOT DISTINCT (chain_id, height, phase, tx_index, event_index)"
        },
        "indexes": {
            "event_chain_type_height": "(chain_id, type, height)",
            "event_chain_id": "(chain_id, id)",
            "event_chain_type_id": "(chain_id, type, id)",
        },
        "fk": "indexer_event_chain_id_85d868ed_fk_indexer_chain_id",
        "fk_index": "indexer_event_chain_id_85d868ed",
    },
}
FK_SQL = "FOREIGN KEY (chain_id) REFERENCES indexer_chain(id) DEFERRABLE INITIALLY DEFERRED"


def _size() -> int:
    return int(getattr(settings, "FLEETOPS_INDEXER_PARTITION_HEIGHTS", 100_000))


def _next_id(cur: Any, table: str) -> int:
    cur.execute(f"SELECT pg_get_serial_sequence('{table}', 'id')")
    seq = cur.fetchone()[0]
    cur.execute(f"SELECT coalesce(max(id), 0) + 1 FROM {table}")
    top = int(cur.fetchone()[0])
    if seq is None:
        return top
    cur.execute(f"SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM {seq}")
    return max(top, int(cur.fetchone()[0]))


def _keys(cur: Any, table: str, spec: dict[str, Any], *, partitioned: bool) -> None:
    pk = "id, chain_id, height" if partitioned else "id"
    cur.execute(f"ALTER TABLE {table} ADD CONSTRAINT {table}_pkey PRIMARY KEY ({pk})")
    for name, definition in spec["unique"].items():
        cur.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")
    for name, columns in spec["indexes"].items():
        cur.execute(f"CREATE INDEX {name} ON {table} {columns}")
    if not partitioned:
        cur.execute(f"CREATE INDEX {spec['fk_index']} ON {table} (chain_id)")
    cur.execute(f"ALTER TABLE {table} ADD CONSTRAINT {spec['fk']} {FK_SQL}")


def partition(apps: Any, schema_editor: Any) -> None:
    size = _size()
    with schema_editor.connection.cursor() as cur:
        for table, spec in TABLES.items():
            new = f"{table}_partitioned"
            cur.execute(
                f"CREATE TABLE {new} (LIKE {table} INCLUDING CONSTRAINTS) PARTITION BY LIST (chain_id)"
            )
            cur.execute(f"CREATE TABLE {table}_default PARTITION OF {new} DEFAULT")
            cur.execute(f"SELECT chain_id, min(height), max(height) FROM {table} GROUP BY chain_id")
            for chain_id, low, high in cur.fetchall():
                parent = f"{table}_c{int(chain_id)}"
                cur.execute(
                    f"CREATE TABLE {parent} PARTITION OF {new} FOR VALUES IN ({int(chain_id)}) "
                    f"PARTITION BY RANGE (height)"
                )
                cur.execute(f"CREATE TABLE {parent}_default PARTITION OF {parent} DEFAULT")
                for start in range((max(0, low) // size) * size, high + 1, size):
                    cur.execute(
                        f"CREATE TABLE {parent}_h{start} PARTITION OF {parent} "
                        f"FOR VALUES FROM ({start}) TO ({start + size})"
                    )
            cols = spec["columns"]
            cur.execute(f"INSERT INTO {new} ({cols}) SELECT {cols} FROM {table}")
            next_id = _next_id(cur, table)
            cur.execute(f"DROP TABLE {table}")
            cur.execute(f"ALTER TABLE {new} RENAME TO {table}")
            # PostgreSQL 15 has no identity columns on partitioned tables: a sequence owned by the
            # column, which Django's RETURNING id and sequence resets treat the same way.
            cur.execute(f"CREATE SEQUENCE {table}_id_seq OWNED BY {table}.id")
            cur.execute(f"SELECT setval('{table}_id_seq', %s, false)", [next_id])
            cur.execute(f"ALTER TABLE {table} ALTER COLUMN id SET DEFAULT nextval('{table}_id_seq')")
            _keys(cur, table, spec, partitioned=True)


def unpartition(apps: Any, schema_editor: Any) -> None:
    with schema_editor.connection.cursor() as cur:
        for table, spec in TABLES.items():
            plain = f"{table}_plain"
            cur.execute(f"CREATE TABLE {plain} (LIKE {table} INCLUDING CONSTRAINTS)")
            cols = spec["columns"]
            cur.execute(f"INSERT INTO {plain} ({cols}) SELECT {cols} FROM {table}")
            next_id = _next_id(cur, table)
            cur.execute(f"DROP TABLE {table} CASCADE")
            cur.execute(f"ALTER TABLE {plain} RENAME TO {table}")
            cur.execute(f"ALTER TABLE {table} ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY")
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), %s, false)", [next_id])
            _keys(cur, table, spec, partitioned=False)


class Migration(migrations.Migration):
    dependencies = [
        ("indexer", "0004_live_settings_refused_sources"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(partition, unpartition)],
            state_operations=[
                migrations.AlterField(
                    model_name=name,
                    name="chain",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="+",
                        to="indexer.chain",
                    ),
                )
                for name in ("block", "transaction", "event")
            ],
        ),
        migrations.AddField(
            model_name="chain",
            name="retain_heights",
            field=models.PositiveIntegerField(
                blank=True,
                null=True,
                help_text=(
                    "Keep only this many heights below the indexed tip; older height ranges are "
                    "dropped a whole partition at a time. Empty: keep forever."
                ),
            ),
        ),
    ]
