"""The indexer API: org scoping, the role matrix, filters, keyset walks, pinned query counts,
idempotent actions and the one error shape."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from fleetops.api.filters import HEIGHT_ORDER
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.lib.reason import REASON_MAX_LENGTH, REASON_REQUIRED
from fleetops.observability.leases import lease_acquire
from indexer.api.views import TX_HASH_INVALID
from indexer.blocks import lease_name
from indexer.models import (
    ConnectionStatus,
    DegradedReason,
    Enrichment,
    Event,
    IndexerState,
    SyncSource,
    Transaction,
)
from indexer.selectors import CHAIN_NOT_FOUND
from indexer.services import ROLLBACK_RANGE
from tests.factories import make_indexed_chain

pytestmark = pytest.mark.django_db
BASE = "/api/v1/indexer/chains"


@pytest.fixture
def chain(org):
    return make_indexed_chain(org, blocks=30)


@pytest.fixture
def foreign_chain(other_org):
    return make_indexed_chain(other_org, slug="globex-chain", blocks=2)


def _error(response):
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "fields"}
    return body["error"]


def _walk(client, url, page_size=None):
    """Follow `next` links to the end; returns every row and the number of pages. `page_size` is
    for a first URL without a query string (`next` links carry theirs)."""
    rows, pages = [], 0
    while url:
        response = client.get(url, {"page_size": page_size} if page_size and pages == 0 else None)
        assert response.status_code == 200, response.content
        body = response.json()
        rows.extend(body["results"])
        url = body["next"]
        pages += 1
    return rows, pages


# --- status ------------------------------------------------------------------------------------------


def test_status_shows_heights_lag_mode_leader_sources_and_backlog(chain, viewer):
    IndexerState.objects.filter(chain=chain).update(head_height=42, mode="normal", poison_height=31)
    lease_acquire(name=lease_name(chain), holder="host-a:123", ttl=timedelta(seconds=30))
    now = clock.now()
    SyncSource.objects.create(
        chain=chain,
        name="archive",
        rpc_url="http://archive:26657",
        priority=1,
        connection_status=ConnectionStatus.CONNECTED_DEGRADED,
        degraded_reasons=[DegradedReason.HISTORIC_RANGE_FAILED],
        consecutive_failures=2,
        first_failure_at=now - timedelta(minutes=1),
        last_success_at=now,
        head_height=42,
    )
    Enrichment.objects.bulk_create(
        [
            Enrichment(chain=chain, height=h, phase="tx", tx_index=0, event_index=0, payload="x", status=s)
            for h, s in ((1, "pending"), (2, "pending"), (3, "failed"), (4, "ok"))
        ]
    )
    response = viewer.session().get(f"{BASE}/sim/status")
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["head_height"], body["last_indexed_height"], body["lag_blocks"]) == (42, 30, 12)
    assert (body["mode"], body["paused"], body["poison_height"]) == ("normal", False, 31)
    assert body["leader"]["holder"] == "host-a:123" and body["leader"]["live"] is True
    assert body["enrichment_backlog"] == {"pending": 2, "retrying": 0, "failed": 1, "undecodable": 0}
    [source] = body["sources"]
    assert source["connection_status"] == 4
    assert source["connection_status_label"] == "connected (degraded)"
    assert source["degraded_reasons"] == [
        {"code": "historic_range_failed", "label": "historic range failed (partial data)"}
    ]
    assert (source["health"], source["health_label"], source["consecutive_failures"]) == (3, "degraded", 2)


def test_another_orgs_chain_is_not_found_everywhere(chain, foreign_chain, admin_member):
    client = admin_member.session()
    for path in ("status", "blocks", "txs", "events", "enrichments"):
        response = client.get(f"{BASE}/{foreign_chain.slug}/{path}")
        assert response.status_code == 404, path
        assert _error(response)["message"] == CHAIN_NOT_FOUND
    for path in ("pause", "resume", "retry-poison", "enrichments/requeue"):
        assert client.post(f"{BASE}/{foreign_chain.slug}/{path}", {"reason": "r"}).status_code == 404
    assert (
        client.post(f"{BASE}/{foreign_chain.slug}/rollback", {"reason": "r", "to_height": 1}).status_code
        == 404
    )
    assert IndexerState.objects.get(chain=foreign_chain).paused is False
    assert [c["slug"] for c in client.get(BASE).json()["results"]] == ["sim"]


# --- the role matrix ---------------------------------------------------------------------------------

READS = ["status", "blocks", "txs", "events", "enrichments"]
ACTIONS = {
    "pause": ("admin", {"reason": "maintenance"}),
    "retry-poison": ("admin", {"reason": "fixed"}),
    "rollback": ("admin", {"reason": "bad node", "to_height": 25}),
    "enrichments/requeue": ("operator", {"reason": "decoder fixed"}),
}
RANK = {"viewer": 1, "operator": 2, "admin": 3}


@pytest.mark.parametrize("role", ["viewer", "operator", "admin"])
def test_every_role_reads_and_only_the_right_roles_act(chain, members, role):
    IndexerState.objects.filter(chain=chain).update(poison_height=31, poison_attempts=3)
    client = members[role].token_client()
    for path in READS:
        assert client.get(f"{BASE}/sim/{path}").status_code == 200, path
    for path, (needed, body) in ACTIONS.items():
        response = client.post(f"{BASE}/sim/{path}", body)
        expected = 200 if RANK[role] >= RANK[needed] else 403
        assert response.status_code == expected, (path, response.content)
        if expected == 403:
            assert _error(response)["code"] == "permission_denied"
    state = IndexerState.objects.get(chain=chain)
    if role == "admin":
        assert (state.paused, state.poison_attempts, state.rollback_requested_to) == (True, 0, 25)
    else:
        assert (state.paused, state.poison_attempts, state.rollback_requested_to) == (False, 3, None)


def test_anonymous_requests_are_refused_in_the_error_shape(chain, client):
    response = client.get(f"{BASE}/sim/status")
    assert response.status_code in (401, 403)
    assert _error(response)["code"] in ("not_authenticated", "permission_denied")


# --- actions -----------------------------------------------------------------------------------------


def test_pause_and_resume_answer_whether_they_changed_something(chain, admin_member):
    client = admin_member.token_client()
    first = client.post(f"{BASE}/sim/pause", {"reason": "node upgrade"})
    again = client.post(f"{BASE}/sim/pause", {"reason": "node upgrade"})
    assert first.status_code == again.status_code == 200
    assert (first.json()["changed"], first.json()["status"]["paused"]) == (True, True)
    assert again.json()["changed"] is False
    resumed = client.post(f"{BASE}/sim/resume", {"reason": "done"})
    assert resumed.json()["changed"] is True and resumed.json()["status"]["paused"] is False
    assert list(
        AuditEvent.objects.filter(action__startswith="indexer.")
        .order_by("id")
        .values_list("action", "actor_type")
    ) == [("indexer.paused", "api_token"), ("indexer.resumed", "api_token")]


def test_an_action_replays_with_the_same_idempotency_key_and_writes_one_audit_row(chain, admin_member):
    client = admin_member.token_client()
    body = {"reason": "bad node", "to_height": 20}
    first = client.post(f"{BASE}/sim/rollback", body, HTTP_IDEMPOTENCY_KEY="rb-1")
    replay = client.post(f"{BASE}/sim/rollback", body, HTTP_IDEMPOTENCY_KEY="rb-1")
    other = client.post(f"{BASE}/sim/rollback", {**body, "to_height": 21}, HTTP_IDEMPOTENCY_KEY="rb-1")
    assert first.status_code == replay.status_code == 200
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.json() == first.json()
    assert first.json()["status"]["rollback_requested"]["to_height"] == 20
    assert other.status_code == 422
    assert AuditEvent.objects.filter(action="indexer.rollback_requested").count() == 1


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("pause", {}, "reason"),
        ("pause", {"reason": ""}, "reason"),
        ("resume", {"reason": "x" * (REASON_MAX_LENGTH + 1)}, "reason"),
        ("rollback", {"reason": "r"}, "to_height"),
        ("rollback", {"reason": "r", "to_height": "ten"}, "to_height"),
        ("rollback", {"reason": "r", "to_height": -1}, "to_height"),
        ("rollback", {"reason": "r", "to_height": 30}, "to_height"),
        ("enrichments/requeue", {"reason": "r", "ids": []}, "ids"),
        ("enrichments/requeue", {"reason": "r", "ids": ["a"]}, "ids"),
        ("enrichments/requeue", {"ids": [1]}, "reason"),
    ],
)
def test_bad_action_input_is_a_400_in_the_one_shape_and_changes_nothing(
    chain, admin_member, path, body, field
):
    response = admin_member.token_client().post(f"{BASE}/sim/{path}", body)
    assert response.status_code == 400, response.content
    error = _error(response)
    assert field in error["fields"]
    state = IndexerState.objects.get(chain=chain)
    assert (state.paused, state.rollback_requested_to) == (False, None)
    assert not AuditEvent.objects.filter(action__startswith="indexer.").exists()


def test_a_blank_reason_and_an_out_of_range_height_carry_the_service_messages(chain, admin_member):
    client = admin_member.token_client()
    blank = client.post(f"{BASE}/sim/pause", {"reason": "   "})
    # The one reason rule (`fleetops.lib.reason`), named on its field.
    assert blank.status_code == 400
    assert _error(blank)["fields"]["reason"] == [REASON_REQUIRED]
    assert _error(blank)["message"] == f"reason: {REASON_REQUIRED}"
    high = client.post(f"{BASE}/sim/rollback", {"reason": "r", "to_height": 30})
    assert _error(high)["message"] == ROLLBACK_RANGE.format(low=0, high=29)


def test_retry_poison_without_a_poison_height_is_a_409(chain, admin_member):
    response = admin_member.token_client().post(f"{BASE}/sim/retry-poison", {"reason": "r"})
    assert response.status_code == 409
    assert _error(response)["code"] == "no_poison_height"


def test_requeue_by_ids_and_all_returns_the_count(chain, operator):
    rows = Enrichment.objects.bulk_create(
        [
            Enrichment(chain=chain, height=h, phase="tx", tx_index=0, event_index=0, payload="x", status=s)
            for h, s in ((1, "failed"), (2, "undecodable"), (3, "ok"))
        ]
    )
    client = operator.token_client()
    first = client.post(f"{BASE}/sim/enrichments/requeue", {"reason": "fixed", "ids": [rows[0].pk]})
    assert first.json() == {"requeued": 1}
    rest = client.post(f"{BASE}/sim/enrichments/requeue", {"reason": "fixed"})
    assert rest.json() == {"requeued": 1}
    failed = client.get(f"{BASE}/sim/enrichments", {"status": "failed"}).json()["results"]
    pending = client.get(f"{BASE}/sim/enrichments", {"status": "pending"}).json()["results"]
    assert failed == [] and {r["id"] for r in pending} == {rows[0].pk, rows[1].pk}


# --- lists -------------------------------------------------------------------------------------------


def test_the_keyset_walk_returns_every_event_exactly_once_newest_first(chain, viewer):
    rows, pages = _walk(viewer.token_client(), f"{BASE}/sim/events", 7)
    ids = [r["id"] for r in rows]
    expected = list(Event.objects.filter(chain=chain).order_by("-id").values_list("id", flat=True))
    assert len(expected) == 120
    assert ids == expected
    assert pages == 18  # 17 full pages of 7 and one of 1


def test_the_unfiltered_page_is_the_documented_rows_as_the_orm_reads_them(chain, viewer):
    import json

    from indexer.api.serializers import EVENT_FIELDS

    client = viewer.token_client()
    first = client.get(f"{BASE}/sim/events", {"page_size": 20}).json()
    second = client.get(first["next"]).json()
    expected = list(Event.objects.filter(chain=chain).order_by("-id").values(*EVENT_FIELDS)[:40])
    assert first["results"] + second["results"] == json.loads(json.dumps(expected))
    # The same rows as the filtered (ORM) path reads them.
    typed = client.get(f"{BASE}/sim/events", {"height_min": 0, "page_size": 40}).json()["results"]
    assert typed == first["results"] + second["results"]


def test_a_walk_stays_exact_while_the_writer_inserts_newer_events(org, viewer):
    from tests.indexer.test_ingest import make_chain_blocks

    chain = make_indexed_chain(org, blocks=10)
    client = viewer.token_client()
    page = client.get(f"{BASE}/sim/events", {"page_size": 15}).json()
    before = set(Event.objects.filter(chain=chain).values_list("id", flat=True))
    # The writer commits 5 more blocks between two page reads: they sort before the cursor.
    from indexer.ingest import blocks_commit

    grant = lease_acquire(name=lease_name(chain), holder="w", ttl=timedelta(seconds=30))
    assert grant is not None
    parent = chain_last_hash(chain)
    blocks_commit(chain=chain, blocks=make_chain_blocks(11, 5, parent=parent, salt="sim"), lease=grant)
    rest, _ = _walk(client, page["next"])
    seen = [r["id"] for r in page["results"]] + [r["id"] for r in rest]
    assert len(seen) == len(set(seen)) == len(before)
    assert set(seen) == before


def chain_last_hash(chain):
    from indexer.models import Block

    return Block.objects.filter(chain=chain).order_by("-height").values_list("hash", flat=True).first()


def test_event_filters_by_height_range_type_and_tx_hash(chain, viewer):
    client = viewer.token_client()
    url = f"{BASE}/sim/events"
    ranged = client.get(url, {"height_min": 5, "height_max": 6, "page_size": 200}).json()["results"]
    assert {r["height"] for r in ranged} == {5, 6} and len(ranged) == 8
    typed = client.get(url, {"type": "fee_market", "page_size": 200}).json()["results"]
    assert len(typed) == 30 and {r["type"] for r in typed} == {"fee_market"}
    tx = Transaction.objects.get(chain=chain, height=7, index=1)
    by_tx = client.get(url, {"tx_hash": tx.hash.lower()}).json()["results"]
    assert [(r["height"], r["phase"], r["tx_index"], r["type"]) for r in by_tx] == [(7, "tx", 1, "transfer")]
    assert client.get(url, {"tx_hash": "A" * 64}).json()["results"] == []
    combined = client.get(url, {"type": "transfer", "height_min": 29}).json()["results"]
    assert [(r["height"], r["tx_index"]) for r in combined] == [(30, 1), (30, 0), (29, 1), (29, 0)]


def test_blocks_and_txs_list_newest_first_with_their_filters(chain, viewer):
    client = viewer.token_client()
    blocks = client.get(f"{BASE}/sim/blocks", {"height_max": 10, "page_size": 3}).json()
    assert [b["height"] for b in blocks["results"]] == [10, 9, 8]
    rest, _ = _walk(client, blocks["next"])
    assert [b["height"] for b in rest] == [7, 6, 5, 4, 3, 2, 1]
    txs = client.get(f"{BASE}/sim/txs", {"height_min": 29}).json()["results"]
    assert [(t["height"], t["index"]) for t in txs] == [(30, 1), (30, 0), (29, 1), (29, 0)]
    tx = Transaction.objects.get(chain=chain, height=3, index=0)
    assert [t["hash"] for t in client.get(f"{BASE}/sim/txs", {"hash": tx.hash}).json()["results"]] == [
        tx.hash
    ]


@pytest.mark.parametrize(
    ("path", "params", "field", "message"),
    [
        ("events", {"height_min": "abc"}, "height_min", None),
        ("events", {"height_max": "-1"}, "height_max", None),
        ("events", {"height_min": "1.5"}, "height_min", None),
        ("events", {"height_min": 9, "height_max": 3}, "height_max", HEIGHT_ORDER),
        ("events", {"tx_hash": "xyz"}, "tx_hash", TX_HASH_INVALID),
        ("events", {"tx_hash": "G" * 64}, "tx_hash", TX_HASH_INVALID),
        ("events", {"page_size": 0}, "page_size", None),
        ("events", {"page_size": 100_000}, "page_size", None),
        ("events", {"cursor": "forged"}, "cursor", None),
        ("txs", {"hash": "12"}, "hash", TX_HASH_INVALID),
        ("blocks", {"height_max": "x"}, "height_max", None),
        ("enrichments", {"status": "bogus"}, "status", None),
    ],
)
def test_bad_filters_are_a_400_in_the_one_shape(chain, viewer, path, params, field, message):
    response = viewer.token_client().get(f"{BASE}/sim/{path}", params)
    assert response.status_code == 400, response.content
    error = _error(response)
    assert field in error["fields"], error
    if message:
        assert error["fields"][field] == [message]
        assert error["message"] == f"{field}: {message}"


def test_a_cursor_is_bound_to_its_filters(chain, viewer):
    client = viewer.token_client()
    first = client.get(f"{BASE}/sim/events", {"type": "transfer", "page_size": 5}).json()
    cursor = first["next"].split("cursor=")[1].split("&")[0]
    response = client.get(f"{BASE}/sim/events", {"type": "fee_market", "cursor": cursor})
    assert response.status_code == 400
    assert _error(response)["code"] == "invalid_cursor"


# --- query counts ------------------------------------------------------------------------------------


def _queries(client, url, params):
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url, params)
    assert response.status_code == 200, response.content
    return len(captured)


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("events", {}),
        ("events", {"type": "transfer", "height_min": 2}),
        ("blocks", {"height_min": 1}),
        ("txs", {}),
        ("enrichments", {"status": "failed"}),
    ],
)
def test_list_query_counts_are_pinned_and_independent_of_page_size(chain, viewer, path, extra):
    client = viewer.session()
    # Warm the session and the process's chain hint so both counts measure the same work.
    client.get(f"{BASE}/sim/{path}")
    small = _queries(client, f"{BASE}/sim/{path}", {**extra, "page_size": 2})
    large = _queries(client, f"{BASE}/sim/{path}", {**extra, "page_size": 100})
    # An empty page (no failed enrichments here) also looks the chain up: a 404 or an empty list.
    assert small == large == SESSION_LIST_QUERIES + (path == "enrichments")


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("events", {}),
        ("events", {"type": "transfer", "height_min": 2}),
        ("blocks", {"height_min": 1}),
        ("txs", {}),
        ("enrichments", {}),
    ],
)
def test_an_api_token_page_costs_three_queries(chain, viewer, path, extra):
    if path == "enrichments":
        Enrichment.objects.create(chain=chain, height=1, phase="tx", tx_index=0, event_index=0, payload="x")
    client = viewer.token_client()
    client.get(f"{BASE}/sim/{path}")  # the first page of the process also looks the chain up
    with CaptureQueriesContext(connection) as captured:
        response = client.get(f"{BASE}/sim/{path}", {**extra, "page_size": 100})
    assert response.status_code == 200 and response.json()["results"]
    assert len(captured) == TOKEN_LIST_QUERIES, [q["sql"][:80] for q in captured.captured_queries]


def test_a_chain_hint_of_a_deleted_chain_is_a_404_not_an_empty_page(chain, viewer):
    client = viewer.token_client()
    assert client.get(f"{BASE}/sim/events").json()["results"]
    chain.delete()

    response = client.get(f"{BASE}/sim/events")

    assert response.status_code == 404
    assert _error(response)["message"] == CHAIN_NOT_FOUND


def test_a_chain_hint_of_a_replaced_chain_reads_the_new_chain(chain, viewer):
    client = viewer.token_client()
    assert client.get(f"{BASE}/sim/events").json()["results"]
    chain.delete()
    replacement = make_indexed_chain(viewer.org, blocks=3)

    rows = client.get(f"{BASE}/sim/events").json()["results"]

    assert rows and {row["id"] for row in rows} <= set(
        Event.objects.filter(chain=replacement).values_list("id", flat=True)
    )


def test_a_chain_hint_never_crosses_organizations(chain, foreign_chain, viewer, outsider):
    viewer.token_client().get(f"{BASE}/sim/events")
    # The other organization's client names its own chain's slug and gets its own rows only.
    theirs = outsider.token_client()
    rows = theirs.get(f"{BASE}/globex-chain/events").json()["results"]
    assert rows and {r["id"] for r in rows} <= set(
        Event.objects.filter(chain=foreign_chain).values_list("id", flat=True)
    )
    assert theirs.get(f"{BASE}/sim/events").status_code == 404


def test_the_tx_hash_filter_costs_one_more_query(chain, viewer):
    client = viewer.session()
    client.get(f"{BASE}/sim/events")
    tx = Transaction.objects.get(chain=chain, height=2, index=0)
    assert _queries(client, f"{BASE}/sim/events", {"tx_hash": tx.hash}) == SESSION_LIST_QUERIES + 1


def test_the_status_query_count_does_not_grow_with_sources(chain, viewer):
    client = viewer.session()
    SyncSource.objects.create(chain=chain, name="a", rpc_url="http://a:1")
    one = _queries(client, f"{BASE}/sim/status", {})
    SyncSource.objects.bulk_create(
        [SyncSource(chain=chain, name=f"s{i}", rpc_url="http://s:1") for i in range(5)]
    )
    assert _queries(client, f"{BASE}/sim/status", {}) == one == SESSION_STATUS_QUERIES


# session, user, memberships, organization, the user's rate counter (one upsert), then the page
# itself, which scopes the chain inside (the process's chain hint, guarded by an EXISTS)
SESSION_LIST_QUERIES = 6
# the token with its owner, organization, membership role and the address's failed-token count; the
# user's rate counter; the page
TOKEN_LIST_QUERIES = 3
# session, user, memberships, organization, the rate counter, the chain (with its state), then
# instead of a page: leases, sources, enrichment backlog
SESSION_STATUS_QUERIES = 9
