"""The forever tables partitioned by chain and height range: ranges created ahead, the DEFAULT
safety net, rollback / reindex / verify across a range boundary, retention dropping whole ranges
(audited), and the lists still right across ranges. Ranges of 10 heights, so a few blocks cross."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection, connections

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib.errors import Forbidden, ValidationFailed
from fleetops.observability.leases import lease_acquire
from indexer import partitions
from indexer.blocks import lease_name
from indexer.ingest import blocks_commit, blocks_rewrite, blocks_rollback
from indexer.models import Block, Chain, Enrichment, Event, IndexerState, Transaction
from indexer.retention import (
    PARTITION_DROPPED,
    RETENTION_CHANGED,
    chain_set_retention,
    partitions_maintain,
    partitions_retention_apply,
)
from indexer.verify import digests_from_source, digests_stored, range_checksum
from tests.indexer.test_ingest import make_chain_blocks

SIZE = 10
TABLES = [m._meta.db_table for m in partitions.PARTITIONED]


@pytest.fixture(autouse=True)
def small_ranges(settings):
    settings.FLEETOPS_INDEXER_PARTITION_HEIGHTS = SIZE
    partitions.partitions_forget()
    yield
    partitions.partitions_forget()


@pytest.fixture
def chain(org, db):
    chain = Chain.objects.create(org=org, slug="sim", chain_id="fleetops-sim-1", finality_depth=2)
    IndexerState.objects.create(chain=chain)
    return chain


@pytest.fixture
def lease(chain):
    grant = lease_acquire(name=lease_name(chain), holder="writer-1", ttl=timedelta(seconds=30))
    assert grant is not None
    return grant


def _ranges(chain, table="indexer_event"):
    return [(p.start, p.end) for p in partitions.range_partitions(chain_pk=chain.pk, table=table)]


def _where(model, chain):
    """{height: partition name} of the chain's rows of `model`."""
    with connection.cursor() as cur:
        cur.execute(
            f"SELECT DISTINCT height, tableoid::regclass::text FROM {model._meta.db_table} "
            "WHERE chain_id = %s",
            [chain.pk],
        )
        return dict(cur.fetchall())


def _commit(chain, lease, blocks):
    return blocks_commit(chain=chain, blocks=blocks, lease=lease)


# --- ranges ahead ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_ensure_creates_the_missing_ranges_of_every_table_and_is_idempotent(chain):
    created = partitions.partitions_ensure(chain=chain, up_to_height=25, from_height=1)
    for table in TABLES:
        assert f"{table}_c{chain.pk}" in created
        assert _ranges(chain, table) == [(0, 10), (10, 20), (20, 30)]
    assert partitions.partitions_ensure(chain=chain, up_to_height=25, from_height=1) == []
    assert partitions.partitions_ensure(chain=chain, up_to_height=31) == [
        f"{table}_c{chain.pk}_h30" for table in TABLES
    ]


@pytest.mark.django_db
def test_committed_rows_land_in_the_range_of_their_height(chain, lease):
    partitions.partitions_ensure(chain=chain, up_to_height=25, from_height=1)
    _commit(chain, lease, make_chain_blocks(1, 25))
    for model in (Block, Transaction, Event):
        table = model._meta.db_table
        where = _where(model, chain)
        assert where[9] == f"{table}_c{chain.pk}_h0"
        assert where[10] == where[19] == f"{table}_c{chain.pk}_h10"
        assert where[25] == f"{table}_c{chain.pk}_h20"


@pytest.mark.django_db
def test_an_insert_beyond_the_ranges_lands_in_the_default_and_ensure_moves_it_into_the_next(chain, lease):
    partitions.partitions_ensure(chain=chain, up_to_height=5, from_height=1)
    _commit(chain, lease, make_chain_blocks(1, 14))
    default = f"indexer_event_c{chain.pk}_default"
    assert _where(Event, chain)[12] == default
    before = range_checksum(digests_stored(chain=chain, first=1, last=14).values())

    assert partitions.partitions_ensure(chain=chain, up_to_height=14) == [
        f"{table}_c{chain.pk}_h10" for table in TABLES
    ]
    where = _where(Event, chain)
    assert {where[h] for h in range(10, 15)} == {f"indexer_event_c{chain.pk}_h10"}
    assert default not in where.values()
    assert range_checksum(digests_stored(chain=chain, first=1, last=14).values()) == before


@pytest.mark.django_db
def test_a_chain_without_partitions_writes_into_the_table_default_and_ensure_adopts_its_rows(chain, lease):
    blocks = make_chain_blocks(1, 12)
    _commit(chain, lease, blocks)
    assert set(_where(Block, chain).values()) == {"indexer_block_default"}
    partitions.partitions_ensure(chain=chain, up_to_height=12, from_height=1)
    assert set(_where(Block, chain).values()) == {
        f"indexer_block_c{chain.pk}_h0",
        f"indexer_block_c{chain.pk}_h10",
    }
    assert Event.objects.filter(chain=chain).count() == 12 * 4
    stored = digests_stored(chain=chain, first=1, last=12)
    assert stored == digests_from_source(blocks)


@pytest.mark.django_db
def test_the_writer_hook_keeps_half_a_range_ahead_and_asks_nothing_while_ahead(
    chain, django_assert_num_queries
):
    partitions.partitions_ahead(chain, 3)
    assert _ranges(chain) == [(0, 10), (10, 20)]
    with django_assert_num_queries(0):
        partitions.partitions_ahead(chain, 4)
    partitions.partitions_ahead(chain, 16)
    assert _ranges(chain)[-1] == (20, 30)


@pytest.mark.django_db(transaction=True)
def test_concurrent_ensures_create_each_range_once(org):
    chain = Chain.objects.create(org=org, slug="race", chain_id="race-1")
    errors: list[BaseException] = []
    created: list[list[str]] = []
    barrier = threading.Barrier(3)

    def run() -> None:
        try:
            barrier.wait(timeout=10)
            created.append(partitions.partitions_ensure(chain=chain, up_to_height=35, from_height=0))
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    names = [name for batch in created for name in batch]
    assert len(names) == len(set(names)) == 3 * (1 + 4)  # per table: the chain's partition + 4 ranges
    assert _ranges(chain) == [(0, 10), (10, 20), (20, 30), (30, 40)]


# --- rollback, reindex, verify across a boundary -----------------------------------------------------


@pytest.mark.django_db
def test_rollback_across_a_range_boundary_removes_every_row_above_and_reingests(chain, lease):
    partitions.partitions_ensure(chain=chain, up_to_height=25, from_height=1)
    blocks = make_chain_blocks(1, 25)
    _commit(chain, lease, blocks)
    removed = blocks_rollback(chain=chain, to_height=8, lease=lease, actor=Actor.system("t"), reason="reorg")
    assert removed == 17
    for model in (Block, Transaction, Event):
        assert max(_where(model, chain)) == 8
    assert _commit(chain, lease, blocks[8:]) == 25
    assert digests_stored(chain=chain, first=1, last=25) == digests_from_source(blocks)


@pytest.mark.django_db
def test_reindex_across_a_range_boundary_rewrites_identical_rows(chain, lease):
    partitions.partitions_ensure(chain=chain, up_to_height=25, from_height=1)
    blocks = make_chain_blocks(1, 25)
    _commit(chain, lease, blocks)
    before = digests_stored(chain=chain, first=1, last=25)
    assert blocks_rewrite(chain=chain, blocks=blocks[4:16], lease=lease) == 12
    after = digests_stored(chain=chain, first=1, last=25)
    assert range_checksum(after.values()) == range_checksum(before.values())
    assert after == digests_from_source(blocks)
    assert Event.objects.filter(chain=chain).count() == 25 * 4


@pytest.mark.django_db
def test_verify_digests_span_ranges_and_flag_a_damaged_height_in_either(chain, lease):
    partitions.partitions_ensure(chain=chain, up_to_height=25, from_height=1)
    blocks = make_chain_blocks(1, 25)
    _commit(chain, lease, blocks)
    assert digests_stored(chain=chain, first=5, last=15) == digests_from_source(blocks[4:15])
    Event.objects.filter(chain=chain, height__in=[9, 11], phase="end_block").delete()
    stored = digests_stored(chain=chain, first=5, last=15)
    source = digests_from_source(blocks[4:15])
    assert [h for h in source if stored[h] != source[h]] == [9, 11]


# --- retention ---------------------------------------------------------------------------------------


@pytest.fixture
def indexed(chain, lease):
    partitions.partitions_ensure(chain=chain, up_to_height=25, from_height=1)
    _commit(chain, lease, make_chain_blocks(1, 25))
    Enrichment.objects.bulk_create(
        Enrichment(chain=chain, height=h, phase="tx", tx_index=0, event_index=0, payload="x") for h in (3, 12)
    )
    return chain


@pytest.mark.django_db
def test_retention_drops_only_whole_ranges_below_the_horizon_with_one_audit_row_each(indexed, admin_member):
    chain = indexed
    assert chain_set_retention(
        chain=chain, retain_heights=12, actor=Actor.for_user(admin_member.user), reason="keep a little"
    )
    # tip 25, keep 12 heights: the horizon is 14, so only [0, 10) lies wholly below it.
    dropped = partitions_retention_apply(chain=chain)
    assert [(d.start, d.end) for d in dropped] == [(0, 10)]
    for table in TABLES:
        assert _ranges(chain, table) == [(10, 20), (20, 30)]
    assert min(_where(Event, chain)) == 10
    assert Block.objects.filter(chain=chain).count() == 16
    assert list(Enrichment.objects.filter(chain=chain).values_list("height", flat=True)) == [12]
    assert IndexerState.objects.get(chain=chain).oldest_indexed_height == 10
    audit = AuditEvent.objects.get(action=PARTITION_DROPPED)
    assert audit.metadata["from_height"] == 0 and audit.metadata["to_height"] == 9
    assert sorted(audit.metadata["partitions"]) == sorted(f"{t}_c{chain.pk}_h0" for t in TABLES)
    assert audit.changes == {"oldest_indexed_height": [1, 10]}
    assert partitions_retention_apply(chain=chain) == []


@pytest.mark.django_db
def test_retention_never_drops_the_range_holding_the_tip(indexed, admin_member):
    chain = indexed
    chain_set_retention(
        chain=chain, retain_heights=3, actor=Actor.for_user(admin_member.user), reason="tight"
    )
    dropped = partitions_retention_apply(chain=chain)
    assert [(d.start, d.end) for d in dropped] == [(0, 10), (10, 20)]
    assert _ranges(chain) == [(20, 30)]
    assert max(_where(Block, chain)) == 25
    assert AuditEvent.objects.filter(action=PARTITION_DROPPED).count() == 2


@pytest.mark.django_db
def test_a_chain_kept_forever_drops_nothing(indexed):
    assert partitions_retention_apply(chain=indexed) == []
    assert len(_ranges(indexed)) == 3


@pytest.mark.django_db
def test_changing_retention_needs_the_admin_role_and_a_valid_value(chain, operator, admin_member):
    with pytest.raises(Forbidden):
        chain_set_retention(chain=chain, retain_heights=100, actor=Actor.for_user(operator.user), reason="r")
    assert AuditEvent.objects.filter(action="access.denied").count() == 1
    bad: Any
    for bad in (2, 0, -5, "100", True, 1.5):  # finality depth 2: at least 3
        with pytest.raises(ValidationFailed):
            chain_set_retention(
                chain=chain, retain_heights=bad, actor=Actor.for_user(admin_member.user), reason="r"
            )
    admin = Actor.for_user(admin_member.user)
    assert chain_set_retention(chain=chain, retain_heights=100, actor=admin, reason="r") is True
    assert chain_set_retention(chain=chain, retain_heights=100, actor=admin, reason="r") is False
    assert chain_set_retention(chain=chain, retain_heights=None, actor=admin, reason="forever") is True
    changes = [a.changes for a in AuditEvent.objects.filter(action=RETENTION_CHANGED).order_by("id")]
    assert changes == [{"retain_heights": [None, 100]}, {"retain_heights": [100, None]}]
    assert Chain.objects.get(pk=chain.pk).retain_heights is None


@pytest.mark.django_db
def test_maintenance_creates_ranges_ahead_of_the_tip_and_applies_retention(indexed, admin_member):
    Chain.objects.filter(pk=indexed.pk).update(retain_heights=12)
    result = partitions_maintain()
    assert result.failed == {}
    assert [(d.start, d.end) for d in result.dropped["sim"]] == [(0, 10)]
    # tip 25 plus one range of headroom
    assert _ranges(indexed) == [(10, 20), (20, 30), (30, 40)]
    call_command("indexer_partitions", "--chain", "sim", stdout=_Sink())


class _Sink:
    def write(self, text: str) -> None:
        self.text = getattr(self, "text", "") + text


# --- reads across ranges -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_events_api_walks_every_row_across_ranges_newest_first(indexed, viewer):
    client = viewer.token_client()
    url, rows = f"/api/v1/indexer/chains/{indexed.slug}/events?page_size=7", []
    while url:
        body = client.get(url).json()
        rows += body["results"]
        url = body["next"]
    ids = [r["id"] for r in rows]
    assert ids == sorted(Event.objects.filter(chain=indexed).values_list("id", flat=True), reverse=True)
    heights = client.get(f"/api/v1/indexer/chains/{indexed.slug}/blocks", {"height_min": 8, "height_max": 12})
    assert [b["height"] for b in heights.json()["results"]] == [12, 11, 10, 9, 8]


@pytest.mark.django_db
def test_the_admin_changelists_list_rows_across_ranges(indexed, superuser, client):
    client.force_login(superuser)
    for name in ("block", "transaction", "event"):
        for query in ({}, {"chain": indexed.pk}, {"q": "11"}):
            response = client.get(f"/admin/indexer/{name}/", query)
            assert response.status_code == 200, (name, query)
    page = client.get("/admin/indexer/block/", {"chain": indexed.pk}).content.decode()
    assert page.index(">25<") < page.index(">9<")  # newest first across the boundary
    event = Event.objects.filter(chain=indexed, height=15).first()
    assert client.get(f"/admin/indexer/event/{event.pk}/change/").status_code == 200


def test_the_ranges_needed_are_the_gaps_left_by_existing_ones():
    assert partitions._gaps(1, 25, 10, []) == [(0, 10), (10, 20), (20, 30)]
    assert partitions._gaps(1, 25, 10, [(10, 20)]) == [(0, 10), (20, 30)]
    # an old size of 7 left [0, 7) and [7, 14): only the remainders are created
    assert partitions._gaps(1, 25, 10, [(0, 7), (7, 14)]) == [(14, 20), (20, 30)]


@pytest.mark.django_db
def test_a_range_lookup_prunes_to_the_ranges_of_those_heights(indexed):
    with connection.cursor() as cur:
        cur.execute(
            "EXPLAIN SELECT * FROM indexer_event WHERE chain_id = %s AND height BETWEEN 12 AND 14",
            [indexed.pk],
        )
        plan = "\n".join(r[0] for r in cur.fetchall())
    assert f"indexer_event_c{indexed.pk}_h10" in plan
    assert "_h0 " not in plan and "_h20" not in plan and "default" not in plan


@pytest.mark.django_db
def test_the_admin_sets_retention_for_admins_only_with_an_audit_row(client, chain, operator, admin_member):
    url = f"/admin/indexer/chain/{chain.pk}/action/retention/"
    client.force_login(operator.user)
    assert client.post(url, {"retain_heights": 500, "reason": "disk"}).status_code == 403
    client.force_login(admin_member.user)
    assert "action/retention/" in client.get(f"/admin/indexer/chain/{chain.pk}/change/").content.decode()
    assert client.post(url, {"retain_heights": 500, "reason": "disk"}).status_code == 302
    assert Chain.objects.get(pk=chain.pk).retain_heights == 500
    assert client.post(url, {"retain_heights": "", "reason": "keep all"}).status_code == 302
    assert Chain.objects.get(pk=chain.pk).retain_heights is None
    assert AuditEvent.objects.filter(action=RETENTION_CHANGED).count() == 2


# --- the migration -----------------------------------------------------------------------------------

PLAIN = [("indexer", "0004_live_settings_refused_sources")]


def _relkind(table: str) -> str:
    with connection.cursor() as cur:
        cur.execute("SELECT relkind FROM pg_class WHERE relname = %s", [table])
        return str(cur.fetchone()[0])


@pytest.mark.django_db(transaction=True)
def test_the_migration_moves_every_row_into_partitions_and_back_and_ids_continue(org):
    from django.db.migrations.executor import MigrationExecutor

    from tests.factories import make_indexed_chain

    chain = make_indexed_chain(org, slug="main", blocks=23)
    before = range_checksum(digests_stored(chain=chain, first=1, last=23).values())
    top = Event.objects.order_by("-id").values_list("id", flat=True).first()
    executor = MigrationExecutor(connection)
    leaves = executor.loader.graph.leaf_nodes()
    try:
        executor.migrate(PLAIN)
        assert {_relkind(t) for t in TABLES} == {"r"}
        assert range_checksum(digests_stored(chain=chain, first=1, last=23).values()) == before
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(leaves)
    assert {_relkind(t) for t in TABLES} == {"p"}
    # The migration sized the ranges from the settings (10 heights here) over the rows it found.
    assert set(_where(Event, chain).values()) == {f"indexer_event_c{chain.pk}_h{s}" for s in (0, 10, 20)}
    assert range_checksum(digests_stored(chain=chain, first=1, last=23).values()) == before
    with connection.cursor() as cur:
        cur.execute("SELECT nextval('indexer_event_id_seq')")
        assert cur.fetchone()[0] > top
