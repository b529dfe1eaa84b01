"""The protocols API, admin, dashboard card and metrics: org scoping, statuses with cursors, lag and
handoff, keyset walks with filters, the admin's role-gated "Start history migration"."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from fleetops.api.filters import HEIGHT_ORDER
from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.lib.errors import ValidationFailed
from fleetops.outbox.models import OutboxStatus
from migrations_app.models import (
    Cursor,
    MigrationStatus,
    Protocol,
    ProtocolBalance,
    ProtocolNftOwner,
    ProtocolStateChange,
    ProtocolWriteSpan,
)
from migrations_app.protocols import metrics, services
from migrations_app.protocols.history import NOT_CLASSIFIED
from migrations_app.protocols.selectors import PROTOCOL_NOT_FOUND
from migrations_app.protocols.services import protocol_history_request
from tests.factories import make_indexed_chain
from tests.migrations_app.protocol_fixtures import assert_queued_with_its_request

pytestmark = pytest.mark.django_db
BASE = "/api/v1/protocols"
ADMIN = "/admin/migrations_app"


@pytest.fixture
def chain(org):
    return make_indexed_chain(org, blocks=40)


@pytest.fixture
def protocol(chain) -> Protocol:
    now = clock.now()
    p = Protocol.objects.create(
        protocol_id="SEP41",
        chain=chain,
        name="SEP-41",
        classification_status=MigrationStatus.SUCCESS,
        history_migration_status=MigrationStatus.SUCCESS,
        history_handed_off_at=now,
        history_handoff_height=31,
    )
    Cursor.objects.create(name=p.history_cursor_name, height=40, updated_at=now)
    ProtocolWriteSpan.objects.create(
        protocol=p, writer="history", from_height=1, to_height=30, created_at=now, updated_at=now
    )
    ProtocolWriteSpan.objects.create(
        protocol=p, writer="live", from_height=31, to_height=40, created_at=now, updated_at=now
    )
    ProtocolStateChange.objects.bulk_create(
        ProtocolStateChange(
            protocol=p,
            chain=chain,
            height=h,
            phase="tx",
            tx_index=i,
            event_index=0,
            kind="transfer",
            account=f"acct{h % 3}",
            counterparty="bob",
            asset="tok1",
            amount=Decimal(h * 10 + i),
        )
        for h in range(1, 41)
        for i in range(2)
    )
    ProtocolBalance.objects.create(protocol=p, asset="tok1", account="bob", amount=Decimal(500), height=40)
    return p


@pytest.fixture
def foreign(other_org) -> Protocol:
    chain = make_indexed_chain(other_org, slug="globex-chain", blocks=2)
    return Protocol.objects.create(protocol_id="SEP50", chain=chain, name="SEP-50")


def _error(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    return body["error"]


def test_the_list_shows_statuses_cursors_lag_and_handoff_of_the_org_only(protocol, foreign, viewer):
    client = viewer.session()
    body = client.get(f"{BASE}/").json()
    assert [p["id"] for p in body] == ["SEP41"]
    row = body[0]
    assert row["history"]["status"] == "success" and row["history"]["cursor"] == 40
    assert row["history"]["lag_blocks"] == 0 and row["history"]["handed_off_at"]
    assert row["history_handoff_height"] == 31 and row["current_state"]["cursor"] is None
    assert client.get(f"{BASE}/SEP41").json()["indexed_height"] == 40


def test_another_orgs_protocol_is_not_found(protocol, foreign, viewer):
    response = viewer.session().get(f"{BASE}/SEP50")
    assert response.status_code == 404
    assert _error(response)["message"] == PROTOCOL_NOT_FOUND
    assert viewer.session().get(f"{BASE}/SEP50/state-changes").status_code == 404


def test_state_changes_walk_newest_first_by_keyset_with_filters(protocol, viewer):
    client = viewer.session()
    rows, url = [], f"{BASE}/SEP41/state-changes?page_size=7"
    while url:
        body = client.get(url).json()
        rows.extend(body["results"])
        url = body["next"]
    assert len(rows) == 80
    heights = [r["height"] for r in rows]
    assert heights == sorted(heights, reverse=True)
    assert len({(r["height"], r["tx_index"]) for r in rows}) == 80  # every row once
    body = client.get(
        f"{BASE}/SEP41/state-changes", {"account": "acct1", "height_min": 10, "height_max": 20}
    ).json()
    assert {r["account"] for r in body["results"]} == {"acct1"}
    assert all(10 <= r["height"] <= 20 for r in body["results"])
    assert body["results"][0]["amount"].isdigit()
    bad = client.get(f"{BASE}/SEP41/state-changes", {"height_min": 9, "height_max": 2})
    assert bad.status_code == 400 and HEIGHT_ORDER in str(_error(bad)["fields"])
    assert client.get(f"{BASE}/SEP41/state-changes", {"kind": "steal"}).status_code == 400


def test_the_state_change_page_costs_the_same_queries_whatever_its_size(protocol, viewer):
    client = viewer.session()
    client.get(f"{BASE}/SEP41/state-changes?page_size=1")
    with CaptureQueriesContext(connection) as small:
        client.get(f"{BASE}/SEP41/state-changes?page_size=1")
    with CaptureQueriesContext(connection) as big:
        client.get(f"{BASE}/SEP41/state-changes?page_size=50")
    assert len(small) == len(big)


def test_balances_and_owners_are_listed(protocol, viewer):
    client = viewer.session()
    assert client.get(f"{BASE}/SEP41/balances").json()["results"] == [
        {"asset": "tok1", "account": "bob", "amount": "500", "height": 40}
    ]
    ProtocolNftOwner.objects.create(protocol=protocol, asset="punks", token_id="1", owner="ann", height=3)
    assert client.get(f"{BASE}/SEP41/owners", {"owner": "ann"}).json()["results"][0]["token_id"] == "1"


# --- admin -----------------------------------------------------------------------------------------------


@pytest.fixture
def queued(sent_tasks) -> Any:
    return sent_tasks


def test_start_history_migration_is_admin_only_asks_a_reason_and_queues_the_task(
    client, chain, operator, admin_member, queued, django_capture_on_commit_callbacks
):
    protocol = Protocol.objects.create(
        protocol_id="SEP41", chain=chain, name="x", classification_status=MigrationStatus.SUCCESS
    )
    url = f"{ADMIN}/protocol/{protocol.pk}/action/start_history/"
    client.force_login(operator.user)
    assert (
        "action/start_history/" not in client.get(f"{ADMIN}/protocol/{protocol.pk}/change/").content.decode()
    )
    assert client.post(url, {"reason": "x", "window_size": 100}).status_code == 403
    client.force_login(admin_member.user)
    page = client.get(f"{ADMIN}/protocol/{protocol.pk}/change/").content.decode()
    assert "action/start_history/" in page and "Who wrote which heights" in page
    assert client.post(url, {"reason": "", "window_size": 100}).status_code == 200  # the form again
    assert queued.messages() == []
    with django_capture_on_commit_callbacks(execute=False) as after_commit:
        response = client.post(url, {"reason": "backfill for the wallet", "window_size": 250})
    assert response.status_code == 302
    # The kick is an outbox message written by the request, in its transaction; nothing is sent yet.
    [message] = queued.messages()
    assert (message.task, message.status) == (services.HISTORY_TASK, OutboxStatus.PENDING)
    assert_queued_with_its_request(message, "protocol.history_requested")
    assert queued == []
    # The on-commit send never ran (a web process that died after the commit): the relay sends it.
    assert len(after_commit) == 1
    assert queued.relay_later() == 1
    assert queued == [
        (
            services.HISTORY_TASK,
            {"protocol_ids": ["SEP41"], "chain": "sim", "window_size": 250, "actor": queued[0][1]["actor"]},
        )
    ]
    assert queued[0][1]["actor"]["label"] == admin_member.user.username
    assert AuditEvent.objects.get(action="protocol.history_requested").reason == "backfill for the wallet"
    message.refresh_from_db()
    assert message.status == OutboxStatus.SENT and message.attempts == 1
    assert queued.relay_later() == 0  # sent once


def test_start_history_migration_of_an_unclassified_protocol_is_refused_on_the_form(
    client, chain, admin_member, queued
):
    protocol = Protocol.objects.create(
        protocol_id="SEP41", chain=chain, name="x", classification_status=MigrationStatus.FAILED
    )
    client.force_login(admin_member.user)
    # Not offered on the page, and refused with the service's message when posted anyway.
    assert (
        "action/start_history/" not in client.get(f"{ADMIN}/protocol/{protocol.pk}/change/").content.decode()
    )
    url = f"{ADMIN}/protocol/{protocol.pk}/action/start_history/"
    assert client.post(url, {"reason": "go", "window_size": 100}).status_code == 403
    with pytest.raises(ValidationFailed, match="is not classified"):
        protocol_history_request(protocol=protocol, actor=Actor.for_user(admin_member.user), reason="go")
    assert NOT_CLASSIFIED.startswith("protocol {id}")
    assert queued == [] and queued.messages() == []


def test_the_protocol_list_shows_cursor_and_lag_in_a_fixed_number_of_queries(
    client, protocol, chain, superuser
):
    client.force_login(superuser)
    assert protocol.history_cursor_name == "protocol_sim_SEP41_history_cursor"  # the admin's annotation
    with CaptureQueriesContext(connection) as one:
        page = client.get(f"{ADMIN}/protocol/").content.decode()
    assert 'class="field-history_cursor">40<' in page and 'class="field-lag">0<' in page
    Protocol.objects.create(protocol_id="SEP50", chain=chain, name="SEP-50")
    with CaptureQueriesContext(connection) as two:
        client.get(f"{ADMIN}/protocol/")
    assert len(two) == len(one)
    assert client.get(f"{ADMIN}/protocol/{protocol.pk}/change/").status_code == 200


def test_the_read_only_rows_render(client, protocol, superuser):
    client.force_login(superuser)
    assert client.get(f"{ADMIN}/protocolstatechange/").status_code == 200
    assert client.get(f"{ADMIN}/protocolstatechange/?q=acct1").status_code == 200


def test_the_dashboard_card_shows_the_protocols(client, protocol, superuser):
    client.force_login(superuser)
    page = client.get("/admin/").content.decode()
    assert "Protocol migrations" in page and "protocols-card" in page


def test_metrics_report_cursor_status_and_lag(protocol):
    registry = CollectorRegistry()

    class Wrap:
        def collect(self) -> Any:
            return metrics.collect_states()

    registry.register(Wrap())
    text = generate_latest(registry).decode()
    labels = 'chain="sim",migration="history",protocol="SEP41"'
    assert f"fleetops_protocol_migration_cursor{{{labels}}} 40.0" in text
    assert f"fleetops_protocol_migration_status{{{labels}}} 1.0" in text
    assert f"fleetops_protocol_migration_lag_blocks{{{labels}}} 0.0" in text
