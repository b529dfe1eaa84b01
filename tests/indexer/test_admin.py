"""The indexer in the console: chain page with state, sources and lag chart, role-gated actions that
call the services, and read-only big-table changelists with flat query counts and no exact count."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.observability.leases import lease_acquire
from indexer.admin import BlockAdmin, EnrichmentAdmin, EventAdmin, TransactionAdmin
from indexer.blocks import lease_name
from indexer.models import (
    ChainLagSample,
    ConnectionStatus,
    DegradedReason,
    Enrichment,
    IndexerState,
    SyncSource,
    Transaction,
)
from indexer.services import ROLLBACK_RANGE
from tests.factories import make_indexed_chain

pytestmark = pytest.mark.django_db
ADMIN = "/admin/indexer"


@pytest.fixture
def chain(org):
    return make_indexed_chain(org, blocks=30)


def _page(client, url, **params):
    response = client.get(url, params)
    assert response.status_code == 200, response.content[:500]
    return response.content.decode()


def _heights(page):
    return re.findall(r'class="field-height">(?:<a href="[^"]*">)?(\d+)<', page)


def _source(chain, name="archive", **kw):
    now = clock.now()
    kw.setdefault("connection_status", ConnectionStatus.CONNECTED_DEGRADED)
    kw.setdefault("degraded_reasons", [DegradedReason.HISTORIC_RANGE_FAILED])
    kw.setdefault("last_success_at", now - timedelta(hours=1))
    return SyncSource.objects.create(chain=chain, name=name, rpc_url=f"http://{name}:26657", **kw)


# --- chains -----------------------------------------------------------------------------------------


def test_the_chain_page_shows_state_sources_with_reasons_and_the_lag_chart(client, chain, viewer):
    IndexerState.objects.filter(chain=chain).update(head_height=40, mode="normal", poison_height=31)
    lease_acquire(name=lease_name(chain), holder="host-a:77", ttl=timedelta(seconds=30))
    _source(chain)
    _source(
        chain,
        name="backup",
        connection_status=ConnectionStatus.CONNECTED,
        degraded_reasons=[],
        consecutive_failures=3,
        first_failure_at=clock.now() - timedelta(days=2),
    )
    now = clock.now()
    ChainLagSample.objects.bulk_create(
        [
            ChainLagSample(
                chain=chain, at=now - timedelta(minutes=m), head_height=40, indexed_height=40 - m % 7
            )
            for m in range(0, 120, 2)
        ]
        + [ChainLagSample(chain=chain, at=now - timedelta(days=2), head_height=1, indexed_height=0)]
    )
    client.force_login(viewer.user)
    page = _page(client, f"{ADMIN}/chain/{chain.pk}/change/")
    assert "Indexer state" in page
    assert "host-a:77" in page
    assert "<polyline" in page and "60 samples" in page  # the 2-day-old sample is outside the window
    assert "connected (degraded)" in page
    assert "historic range failed (partial data)" in page
    assert ">dead<" in page  # 3 failures for 2 days
    assert "<strong>31</strong>" in page  # poison height
    assert f"/chain/{chain.pk}/action/" not in page  # viewers get no buttons
    # The mode machine, drawn from its declaration, with the chain's mode highlighted.
    assert 'aria-label="indexer.mode state diagram"' in page
    assert '<g class="state current" data-state="normal">' in page


def test_the_source_page_draws_the_connection_machine_at_its_status(client, chain, viewer):
    source = _source(chain)
    client.force_login(viewer.user)
    page = _page(client, f"{ADMIN}/syncsource/{source.pk}/change/")
    assert 'aria-label="indexer.source_connection state diagram"' in page
    assert f'<g class="state current" data-state="{ConnectionStatus.CONNECTED_DEGRADED.value}">' in page


def test_the_chain_list_shows_mode_lag_and_leader_in_a_flat_number_of_queries(client, org, superuser):
    first = make_indexed_chain(org, slug="a", blocks=2, head_height=10, mode="degraded")
    lease_acquire(name=lease_name(first), holder="writer-a", ttl=timedelta(seconds=30))
    client.force_login(superuser)
    with CaptureQueriesContext(connection) as one:
        page = _page(client, f"{ADMIN}/chain/")
    assert "writer-a" in page and "degraded" in page and ">8<" in page
    for i in range(5):
        make_indexed_chain(org, slug=f"more-{i}")
    with CaptureQueriesContext(connection) as six:
        _page(client, f"{ADMIN}/chain/")
    assert len(six) == len(one)


def test_the_chain_list_shows_no_leader_once_the_lease_expired(client, chain, superuser):
    from fleetops.observability.models import Lease

    lease_acquire(name=lease_name(chain), holder="gone-writer", ttl=timedelta(seconds=30))
    client.force_login(superuser)
    assert "gone-writer" in _page(client, f"{ADMIN}/chain/")
    Lease.objects.filter(name=lease_name(chain)).update(expires_at=clock.now() - timedelta(seconds=1))
    page = _page(client, f"{ADMIN}/chain/")
    assert "gone-writer" not in page and 'class="field-leader">none<' in page


def test_object_actions_are_shown_by_role(client, chain, operator, admin_member):
    IndexerState.objects.filter(chain=chain).update(poison_height=31, poison_attempts=3)
    url = f"{ADMIN}/chain/{chain.pk}/change/"
    client.force_login(operator.user)
    page = _page(client, url)
    assert "action/requeue_failed/" in page
    for name in ("retry_poison", "pause", "rollback"):
        assert f"action/{name}/" not in page
    client.force_login(admin_member.user)
    page = _page(client, url)
    for name in ("retry_poison", "pause", "rollback", "requeue_failed"):
        assert f"action/{name}/" in page
    assert "action/resume/" not in page  # not paused


def test_pause_asks_for_a_reason_calls_the_service_and_is_refused_to_operators(
    client, chain, operator, admin_member
):
    url = f"{ADMIN}/chain/{chain.pk}/action/pause/"
    client.force_login(operator.user)
    assert client.post(url, {"reason": "x"}).status_code == 403
    assert AuditEvent.objects.filter(action="access.denied").exists()
    client.force_login(admin_member.user)
    assert client.post(url, {"reason": ""}).status_code == 200  # the form with its error
    assert IndexerState.objects.get(chain=chain).paused is False
    assert client.post(url, {"reason": "node upgrade"}).status_code == 302
    assert IndexerState.objects.get(chain=chain).paused is True
    assert AuditEvent.objects.get(action="indexer.paused").reason == "node upgrade"
    assert "action/resume/" in _page(client, f"{ADMIN}/chain/{chain.pk}/change/")
    assert client.post(f"{ADMIN}/chain/{chain.pk}/action/resume/", {"reason": "done"}).status_code == 302
    assert IndexerState.objects.get(chain=chain).paused is False


def test_retry_poison_from_the_admin_clears_the_attempts(client, chain, admin_member):
    IndexerState.objects.filter(chain=chain).update(poison_height=31, poison_attempts=3, mode="degraded")
    client.force_login(admin_member.user)
    response = client.post(f"{ADMIN}/chain/{chain.pk}/action/retry_poison/", {"reason": "parser fixed"})
    assert response.status_code == 302
    state = IndexerState.objects.get(chain=chain)
    assert (state.poison_attempts, state.mode) == (0, "catching_up")
    assert AuditEvent.objects.filter(action="indexer.poison_retried").count() == 1


def test_rollback_shows_a_confirmation_with_the_height_before_it_requests_anything(
    client, chain, admin_member
):
    url = f"{ADMIN}/chain/{chain.pk}/action/rollback/"
    client.force_login(admin_member.user)
    assert "to_height" in _page(client, url)
    confirm = client.post(url, {"to_height": 25, "reason": "node b served a fork"})
    assert confirm.status_code == 200
    text = confirm.content.decode()
    assert "Roll back sim to height 25?" in text
    assert "5 blocks" in text and "heights 26 to 30" in text
    assert 'name="confirm"' in text
    assert IndexerState.objects.get(chain=chain).rollback_requested_to is None

    done = client.post(url, {"to_height": 25, "reason": "node b served a fork", "confirm": "1"})
    assert done.status_code == 302
    state = IndexerState.objects.get(chain=chain)
    assert (state.rollback_requested_to, state.rollback_requested_reason) == (25, "node b served a fork")
    assert AuditEvent.objects.get(action="indexer.rollback_requested").changes == {
        "rollback_requested_to": [None, 25]
    }


def test_a_rollback_height_out_of_range_is_shown_on_the_form(client, chain, admin_member):
    client.force_login(admin_member.user)
    page = client.post(f"{ADMIN}/chain/{chain.pk}/action/rollback/", {"to_height": 30, "reason": "r"})
    assert page.status_code == 200
    assert ROLLBACK_RANGE.format(low=0, high=29) in page.content.decode()
    assert 'name="confirm"' not in page.content.decode()


def test_operators_cannot_reach_the_rollback_confirmation(client, chain, operator):
    client.force_login(operator.user)
    response = client.post(f"{ADMIN}/chain/{chain.pk}/action/rollback/", {"to_height": 25, "reason": "r"})
    assert response.status_code == 403
    assert IndexerState.objects.get(chain=chain).rollback_requested_to is None


def test_another_orgs_chain_is_not_found_in_the_admin(client, chain, outsider):
    client.force_login(outsider.user)
    response = client.get(f"{ADMIN}/chain/{chain.pk}/change/")
    assert response.status_code == 302  # Django's "doesn't exist, perhaps deleted" redirect
    assert client.post(f"{ADMIN}/chain/{chain.pk}/action/pause/", {"reason": "x"}).status_code == 404
    assert IndexerState.objects.get(chain=chain).paused is False


# --- sources ----------------------------------------------------------------------------------------


def test_the_sources_list_shows_status_badges_reasons_health_and_retry(client, chain, viewer):
    _source(chain, next_retry_at=clock.now() + timedelta(seconds=40))
    _source(
        chain,
        name="limited",
        connection_status=ConnectionStatus.CONNECTED,
        degraded_reasons=[],
        rate_limited_until=clock.now() + timedelta(minutes=1),
    )
    client.force_login(viewer.user)
    page = _page(client, f"{ADMIN}/syncsource/")
    assert "connected (degraded)" in page and "historic range failed (partial data)" in page
    assert "rate limited" in page
    assert "Add sync source" not in page


# --- big tables -------------------------------------------------------------------------------------

BIG = [("block", BlockAdmin), ("transaction", TransactionAdmin), ("event", EventAdmin)]


@pytest.mark.parametrize(("model", "model_admin"), BIG)
def test_big_changelists_run_a_fixed_number_of_queries_and_no_exact_count(
    client, org, viewer, monkeypatch, model, model_admin
):
    make_indexed_chain(org, blocks=60)
    client.force_login(viewer.user)
    counts = {}
    for shown in (10, 100):
        monkeypatch.setattr(model_admin, "list_per_page", shown)
        with CaptureQueriesContext(connection) as captured:
            page = _page(client, f"{ADMIN}/{model}/")
        counts[shown] = len(captured)
        for query in captured.captured_queries:
            sql = query["sql"]
            if "COUNT(" in sql:
                assert "LIMIT" in sql, sql  # a bounded count of the first rows, never the table
    assert counts[10] == counts[100]
    assert f"/{model}/add/" not in page and 'name="_selected_action"' not in page


@pytest.mark.parametrize(("model", "model_admin"), BIG)
def test_big_changelists_are_read_only_even_for_admins(client, chain, admin_member, model, model_admin):
    client.force_login(admin_member.user)
    assert client.get(f"{ADMIN}/{model}/add/").status_code == 403
    from django.contrib.admin import site

    [instance_admin] = [a for a in site._registry.values() if type(a) is model_admin]
    request = type("R", (), {"user": admin_member.user})()
    assert not instance_admin.has_add_permission(request)
    assert not instance_admin.has_change_permission(request)
    assert not instance_admin.has_delete_permission(request)


def test_search_uses_height_or_hash_and_the_chain_filter_orders_by_height(client, chain, viewer):
    client.force_login(viewer.user)
    tx = Transaction.objects.get(chain=chain, height=12, index=1)
    page = _page(client, f"{ADMIN}/transaction/", q=tx.hash.lower())
    assert _heights(page) == ["12"] and tx.hash in page
    heights = _heights(_page(client, f"{ADMIN}/block/", chain=chain.pk))
    assert heights[:3] == ["30", "29", "28"]
    assert _heights(_page(client, f"{ADMIN}/block/", q="7")) == ["7"]
    assert _heights(_page(client, f"{ADMIN}/block/", q="not-a-hash")) == []
    events = _page(client, f"{ADMIN}/event/", q="fee_market")
    assert events.count('class="field-type">fee_market<') == 30


def test_big_changelists_only_show_the_users_chains(client, chain, other_org, outsider):
    make_indexed_chain(other_org, slug="globex-chain", blocks=1)
    client.force_login(outsider.user)
    page = _page(client, f"{ADMIN}/block/")
    assert _heights(page) == ["1"]
    assert ">sim<" not in page


# --- enrichment -------------------------------------------------------------------------------------


def _enrichments(chain, statuses):
    return Enrichment.objects.bulk_create(
        [
            Enrichment(
                chain=chain, height=i + 1, phase="tx", tx_index=0, event_index=0, payload="x", status=s
            )
            for i, s in enumerate(statuses)
        ]
    )


def test_enrichment_requeue_asks_for_a_reason_and_calls_the_service_once_per_chain(client, chain, operator):
    rows = _enrichments(chain, ["failed", "undecodable", "ok"])
    client.force_login(operator.user)
    changelist = f"{ADMIN}/enrichment/"
    assert "requeue_selected" in _page(client, changelist, status__exact="failed")
    selected = [str(r.pk) for r in rows]
    ask = client.post(changelist, {"action": "requeue_selected", "_selected_action": selected})
    assert ask.status_code == 200 and b"Re-queue enrichment" in ask.content
    done = client.post(
        changelist,
        {"action": "requeue_selected", "_selected_action": selected, "apply": "1", "reason": "fixed"},
    )
    assert done.status_code == 302
    assert sorted(Enrichment.objects.values_list("status", flat=True)) == ["ok", "pending", "pending"]
    audit = AuditEvent.objects.get(action="indexer.enrichment_requeued")
    assert (audit.reason, audit.metadata["requeued"]) == ("fixed", 2)


def test_viewers_do_not_get_the_requeue_action(client, chain, viewer):
    rows = _enrichments(chain, ["failed"])
    client.force_login(viewer.user)
    assert "requeue_selected" not in _page(client, f"{ADMIN}/enrichment/")
    client.post(
        f"{ADMIN}/enrichment/",
        {"action": "requeue_selected", "_selected_action": [rows[0].pk], "apply": "1", "reason": "x"},
    )
    assert Enrichment.objects.get().status == "failed"


def test_the_enrichment_changelist_query_count_is_flat(client, chain, operator, monkeypatch):
    _enrichments(chain, ["failed"] * 120)
    client.force_login(operator.user)
    counts = []
    for shown in (10, 100):
        monkeypatch.setattr(EnrichmentAdmin, "list_per_page", shown)
        with CaptureQueriesContext(connection) as captured:
            _page(client, f"{ADMIN}/enrichment/", status__exact="failed")
        counts.append(len(captured))
    assert counts[0] == counts[1]


def test_the_chain_requeue_button_requeues_every_failed_row(client, chain, operator):
    _enrichments(chain, ["failed", "undecodable", "pending"])
    client.force_login(operator.user)
    response = client.post(f"{ADMIN}/chain/{chain.pk}/action/requeue_failed/", {"reason": "decoder fixed"})
    assert response.status_code == 302
    assert sorted(Enrichment.objects.values_list("status", flat=True)) == ["pending"] * 3


def test_the_chain_list_names_only_the_users_organizations(client, chain, other_org, viewer):
    make_indexed_chain(other_org, slug="globex-chain")
    client.force_login(viewer.user)
    page = _page(client, f"{ADMIN}/chain/")
    assert '">sim</a>' in page
    assert "globex-chain" not in page and other_org.name not in page


def test_the_enrichment_page_draws_its_machine_at_the_rows_status(client, chain, viewer):
    [row] = _enrichments(chain, ["undecodable"])
    client.force_login(viewer.user)
    page = _page(client, f"{ADMIN}/enrichment/{row.pk}/change/")
    assert 'aria-label="indexer.enrichment state diagram"' in page
    assert '<g class="state current" data-state="undecodable">' in page


# --- live settings and refused sources ------------------------------------------------------------------


def test_an_operator_tunes_limits_from_the_chain_page_and_a_viewer_may_not(client, chain, viewer, operator):
    url = f"{ADMIN}/chain/{chain.pk}/action/limits/"
    client.force_login(viewer.user)
    assert client.post(url, {"reason": "x", "max_in_flight": 2}).status_code == 403
    client.force_login(operator.user)
    assert "action/limits/" in _page(client, f"{ADMIN}/chain/{chain.pk}/change/")
    assert client.post(url, {"reason": "x", "max_in_flight": 0}).status_code == 200  # the form's error
    response = client.post(url, {"reason": "rpc latency spike", "max_in_flight": 2, "catchup_batch_size": 5})
    assert response.status_code == 302
    chain.refresh_from_db()
    assert (chain.max_in_flight, chain.catchup_batch_size) == (2, 5)
    assert AuditEvent.objects.get(action="indexer.settings_changed").changes == {
        "max_in_flight": [8, 2],
        "catchup_batch_size": [50, 5],
    }


def test_a_refused_source_shows_its_reason_and_an_operator_re_enables_it(client, chain, operator):
    source = _source(
        chain,
        name="typo",
        connection_status=ConnectionStatus.REFUSED,
        degraded_reasons=[],
        refused_reason="DNS error: ConnectError: [Errno -2] Name or service not known",
    )
    client.force_login(operator.user)
    page = _page(client, f"{ADMIN}/syncsource/")
    assert "refused" in page and "Name or service not known" in page
    detail = _page(client, f"{ADMIN}/syncsource/{source.pk}/change/")
    assert "action/reenable/" in detail and "action/settings/" in detail
    response = client.post(f"{ADMIN}/syncsource/{source.pk}/action/reenable/", {"reason": "DNS fixed"})
    assert response.status_code == 302
    source.refresh_from_db()
    assert (source.connection_status, source.refused_reason) == (ConnectionStatus.DISCONNECTED, "")
    assert AuditEvent.objects.get(action="indexer.source.reenabled").reason == "DNS fixed"
    assert "action/reenable/" not in _page(client, f"{ADMIN}/syncsource/{source.pk}/change/")


def test_an_operator_disables_a_source_from_its_page(client, chain, operator):
    source = _source(chain, connection_status=ConnectionStatus.CONNECTED, degraded_reasons=[])
    client.force_login(operator.user)
    url = f"{ADMIN}/syncsource/{source.pk}/action/settings/"
    assert client.post(url, {"reason": "maintenance", "enabled": "false"}).status_code == 302
    source.refresh_from_db()
    assert source.enabled is False
    assert AuditEvent.objects.get(action="indexer.source.settings_changed").changes == {
        "enabled": [True, False]
    }
