"""Protocols per chain: the same protocol on two chains of one deployment is two protocols, each with
its own row, statuses, cursors and metrics; `--chain` is needed only when the ids are ambiguous; the
API's (chain, protocol id) URLs and the older id-only ones; the schema migration that moved existing
protocols to (chain, protocol id) keeping their rows."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError, connection, transaction
from django.db.migrations.executor import MigrationExecutor
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from migrations_app.models import Cursor, MigrationStatus, Protocol
from migrations_app.protocols import metrics
from migrations_app.protocols.history import MigrationInterrupted, history_migrate, history_validate
from migrations_app.protocols.selectors import PROTOCOL_AMBIGUOUS
from tests.factories import make_indexed_chain

BASE = "/api/v1/protocols"
ACTOR = Actor.system("test")


@pytest.fixture
def chains(org) -> tuple[Any, Any]:
    return make_indexed_chain(org, slug="alpha", blocks=12), make_indexed_chain(org, slug="beta", blocks=8)


def _snapshot() -> tuple[Any, ...]:
    return (
        sorted(Protocol.objects.values_list("protocol_id", "chain__slug", "history_migration_status")),
        sorted(Cursor.objects.values_list("name", "height")),
        AuditEvent.objects.filter(action__startswith="protocol.history").count(),
    )


@pytest.mark.django_db
def test_setup_registers_a_protocol_per_chain_and_asks_for_the_chain_when_there_are_several(chains):
    alpha, _ = chains
    with pytest.raises(CommandError, match=r"several chains exist \(alpha, beta\); say which with --chain"):
        call_command("protocol_setup", "--protocol-id", "SEP41")
    assert not Protocol.objects.exists()
    call_command("protocol_setup", "--protocol-id", "SEP41", "--chain", "alpha")
    call_command("protocol_setup", "--protocol-id", "SEP41", "--chain", "beta")
    call_command("protocol_setup", "--protocol-id", "SEP41", "--chain", "beta")  # safe to re-run
    rows = list(Protocol.objects.select_related("chain").filter(protocol_id="SEP41").order_by("chain__slug"))
    assert [(p.chain.slug, p.classification_status) for p in rows] == [
        ("alpha", MigrationStatus.SUCCESS),
        ("beta", MigrationStatus.SUCCESS),
    ]
    assert [p.history_cursor_name for p in rows] == [
        "protocol_alpha_SEP41_history_cursor",
        "protocol_beta_SEP41_history_cursor",
    ]
    assert AuditEvent.objects.filter(action="protocol.registered").count() == 2
    with pytest.raises(IntegrityError), transaction.atomic():
        Protocol.objects.create(protocol_id="SEP41", chain=alpha, name="twice")


@pytest.mark.django_db
def test_a_migration_needs_the_chain_only_when_the_ids_are_on_several(chains):
    alpha, _ = chains
    call_command("protocol_setup", "--protocol-id", "SEP41", "SEP50", "--chain", "alpha")
    call_command("protocol_setup", "--protocol-id", "SEP41", "--chain", "beta")
    before = _snapshot()
    with pytest.raises(
        CommandError, match=r"protocols SEP41 are registered on several chains \(alpha, beta\); say which"
    ):
        call_command("protocol_migrate", "history", "--protocol-id", "SEP41")
    with pytest.raises(CommandError, match=r"registered on several chains \(alpha, beta\)"):
        call_command("protocol_migrate", "current-state", "--protocol-id", "SEP41", "--start-height", "1")
    with pytest.raises(CommandError, match="no chain gamma"):
        call_command("protocol_migrate", "history", "--protocol-id", "SEP41", "--chain", "gamma")
    with pytest.raises(CommandError, match="protocol SEP50 is not set up"):
        call_command("protocol_migrate", "history", "--protocol-id", "SEP50", "--chain", "beta")
    assert _snapshot() == before
    # SEP50 runs on alpha only: no --chain needed.
    chain, todo, _ = history_validate(protocol_ids=["SEP50"])
    assert chain.pk == alpha.pk and [p.chain_id for p in todo] == [alpha.pk]


@pytest.mark.django_db(transaction=True)
def test_a_run_on_one_chain_leaves_the_same_protocol_on_the_other_chain_alone(chains):
    for slug in ("alpha", "beta"):
        call_command("protocol_setup", "--protocol-id", "SEP41", "--chain", slug)
    stop = threading.Event()
    stop.set()  # interrupted right after its start: cursor created, status settled as failed
    with pytest.raises(MigrationInterrupted):
        history_migrate(protocol_ids=["SEP41"], chain="beta", actor=ACTOR, stop=stop, workers=2)
    assert dict(Cursor.objects.values_list("name", "height")) == {"protocol_beta_SEP41_history_cursor": 0}
    statuses = dict(
        Protocol.objects.filter(protocol_id="SEP41").values_list("chain__slug", "history_migration_status")
    )
    assert statuses == {"alpha": MigrationStatus.NOT_STARTED, "beta": MigrationStatus.FAILED}

    registry = CollectorRegistry()

    class Wrap:
        def collect(self) -> Any:
            return metrics.collect_states()

    registry.register(Wrap())
    text = generate_latest(registry).decode()
    series = 'migration="history",protocol="SEP41"'
    assert f'fleetops_protocol_migration_status{{chain="alpha",{series}}} 3.0' in text
    assert f'fleetops_protocol_migration_status{{chain="beta",{series}}} 2.0' in text
    assert f'fleetops_protocol_migration_cursor{{chain="beta",{series}}} 0.0' in text
    assert 'fleetops_protocol_migration_cursor{chain="alpha"' not in text


@pytest.mark.django_db
def test_the_api_names_a_protocol_by_chain_and_id_and_keeps_the_id_alone_while_unambiguous(
    chains, viewer, other_org
):
    alpha, beta = chains
    Protocol.objects.create(protocol_id="SEP41", chain=alpha, name="SEP-41")
    Protocol.objects.create(protocol_id="SEP50", chain=alpha, name="SEP-50")
    foreign = make_indexed_chain(other_org, slug="globex-chain", blocks=2)
    Protocol.objects.create(protocol_id="SEP41", chain=foreign, name="SEP-41")
    client = viewer.session()
    assert [(p["id"], p["chain"]) for p in client.get(f"{BASE}/").json()] == [
        ("SEP41", "alpha"),
        ("SEP50", "alpha"),
    ]
    # One chain per protocol so far: the id alone still answers.
    assert client.get(f"{BASE}/SEP41").json()["chain"] == "alpha"
    assert client.get(f"{BASE}/SEP41/state-changes").status_code == 200
    Protocol.objects.create(protocol_id="SEP41", chain=beta, name="SEP-41")
    assert [p["chain"] for p in client.get(f"{BASE}/", {"chain": "beta"}).json()] == ["beta"]
    for path in ("alpha/SEP41", "beta/SEP41"):
        body = client.get(f"{BASE}/{path}").json()
        assert (body["chain"], body["id"]) == tuple(path.split("/"))
    assert client.get(f"{BASE}/beta/SEP41/state-changes").status_code == 200
    assert client.get(f"{BASE}/beta/SEP41/balances").status_code == 200
    for path in ("SEP41", "SEP41/state-changes", "SEP41/balances", "SEP41/owners"):
        response = client.get(f"{BASE}/{path}")
        assert response.status_code == 409, path
        error = response.json()["error"]
        assert error["code"] == "ambiguous"
        assert error["message"] == PROTOCOL_AMBIGUOUS.format(id="SEP41", chains="alpha, beta")
    assert client.get(f"{BASE}/SEP50").json()["chain"] == "alpha"
    # Another organization's chain is simply not found.
    assert client.get(f"{BASE}/globex-chain/SEP41").status_code == 404
    assert client.get(f"{BASE}/beta/SEP50").status_code == 404


# --- the schema migration --------------------------------------------------------------------------------

BEFORE = [("migrations_app", "0001_initial")]
AFTER = [("migrations_app", "0002_protocol_per_chain")]


@pytest.mark.django_db(transaction=True)
def test_the_migration_keys_existing_protocols_by_their_chain_and_keeps_their_rows(org):
    chain = make_indexed_chain(org, slug="main", blocks=3)
    executor = MigrationExecutor(connection)
    leaves = executor.loader.graph.leaf_nodes()
    executor.migrate(BEFORE)
    try:
        with connection.cursor() as cur:
            for pid in ("SEP41", "SEP50"):
                cur.execute(
                    "INSERT INTO migrations_app_protocol (id, chain_id, name, classification_status, "
                    "classification_error, history_migration_status, history_error, "
                    "current_state_migration_status, current_state_error, created_at, updated_at) "
                    "VALUES (%s, %s, %s, 'success', '', 'success', '', 'not_started', '', now(), now())",
                    [pid, chain.pk, pid],
                )
            cur.execute(
                "INSERT INTO migrations_app_protocolstatechange (protocol_id, chain_id, height, phase, "
                "tx_index, event_index, kind, account, counterparty, asset, amount, token_id) "
                "SELECT CASE WHEN h %% 2 = 0 THEN 'SEP41' ELSE 'SEP50' END, %s, h, 'tx', 0, 0, 'transfer', "
                "'ann', 'bob', 'tok', 1, '' FROM generate_series(1, 30) AS h",
                [chain.pk],
            )
            cur.execute(
                "INSERT INTO migrations_app_protocolwritespan (protocol_id, writer, from_height, to_height, "
                "created_at, updated_at) VALUES ('SEP41', 'history', 1, 30, now(), now())"
            )
            cur.execute(
                "INSERT INTO migrations_app_protocolbalance (protocol_id, asset, account, amount, height) "
                "VALUES ('SEP41', 'tok', 'bob', 15, 30)"
            )
            cur.execute(
                "INSERT INTO migrations_app_cursor (name, height, updated_at) VALUES "
                "('protocol_SEP41_history_cursor', 30, now()), "
                "('protocol_SEP50_current_state_cursor', 7, now()), ('unrelated', 1, now())"
            )
        executor = MigrationExecutor(connection)
        executor.migrate(AFTER)
        executor.loader.build_graph()
    finally:
        MigrationExecutor(connection).migrate(leaves)
    rows = {p.protocol_id: p for p in Protocol.objects.select_related("chain")}
    assert set(rows) == {"SEP41", "SEP50"}
    assert {p.chain_id for p in rows.values()} == {chain.pk}
    sep41, sep50 = rows["SEP41"], rows["SEP50"]
    assert sep41.history_migration_status == MigrationStatus.SUCCESS
    with connection.cursor() as cur:
        cur.execute(
            "SELECT protocol_id, count(*) FROM migrations_app_protocolstatechange GROUP BY protocol_id"
        )
        assert dict(cur.fetchall()) == {sep41.pk: 15, sep50.pk: 15}
        cur.execute("SELECT protocol_id FROM migrations_app_protocolwritespan")
        assert cur.fetchall() == [(sep41.pk,)]
        cur.execute("SELECT protocol_id, amount FROM migrations_app_protocolbalance")
        assert cur.fetchall() == [(sep41.pk, 15)]
    assert dict(Cursor.objects.values_list("name", "height")) == {
        "protocol_main_SEP41_history_cursor": 30,
        "protocol_main_SEP50_current_state_cursor": 7,
        "unrelated": 1,
    }
    assert sep41.history_cursor_name == "protocol_main_SEP41_history_cursor"
    # New rows take keys after the moved ones.
    beta = make_indexed_chain(org, slug="beta")
    assert Protocol.objects.create(protocol_id="SEP41", chain=beta, name="x").pk > max(sep41.pk, sep50.pk)
