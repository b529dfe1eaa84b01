"""The chain page in the live console: fragment scoped like the page with pinned queries, the lag
chart's selectable window and its markers for reorgs, rollbacks and halts, and the dashboard card's
sparklines."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from fleetops.admin_live import FRAGMENT_HEADER
from fleetops.audit.actors import Actor
from fleetops.lib import clock
from indexer.admin.chains import lag_chart
from indexer.models import ChainLagSample, IndexerState
from tests.factories import make_indexed_chain, record

pytestmark = pytest.mark.django_db
CHAINS = "/admin/indexer/chain"


@pytest.fixture
def chain(org):
    return make_indexed_chain(org, blocks=10)


def _samples(chain, minutes, *, lag=5):
    now = clock.now()
    ChainLagSample.objects.bulk_create(
        [
            ChainLagSample(
                chain=chain, at=now - timedelta(minutes=m), head_height=100, indexed_height=100 - lag
            )
            for m in minutes
        ]
    )


def test_the_chain_page_is_live_and_its_fragment_is_the_same_partial(client, viewer, chain):
    _samples(chain, range(0, 60, 2))
    client.force_login(viewer.user)
    page = client.get(f"{CHAINS}/{chain.pk}/change/").content.decode()
    assert f'data-live="chain" data-live-url="{CHAINS}/{chain.pk}/live/?window=6h"' in page
    fragment = client.get(f"{CHAINS}/{chain.pk}/live/", {"window": "6h"})
    assert fragment.status_code == 200 and fragment[FRAGMENT_HEADER] == "1"
    body = fragment.content.decode()
    for part in (
        'id="indexer-state"',
        'id="indexer-sources-live"',
        'id="indexer-lag-chart"',
        "data-live-status",
    ):
        assert part in body and part in page
    assert "/action/" not in body


def test_another_organizations_chain_fragment_is_not_found(client, outsider, chain):
    client.force_login(outsider.user)
    assert client.get(f"{CHAINS}/{chain.pk}/live/").status_code == 404


def test_the_chain_fragment_query_count_does_not_grow_with_samples(
    client, viewer, chain, django_assert_max_num_queries
):
    _samples(chain, range(0, 60 * 24 * 7, 1))  # a week, one a minute
    client.force_login(viewer.user)
    client.get(f"{CHAINS}/{chain.pk}/live/")
    with django_assert_max_num_queries(12):
        assert client.get(f"{CHAINS}/{chain.pk}/live/", {"window": "7d"}).status_code == 200


@pytest.mark.parametrize(
    ("window", "expected", "samples"),
    [("1h", "1h", 30), ("24h", "24h", 60), ("7d", "7d", 61), ("2y", "6h", 60)],
)
def test_the_lag_window_is_chosen_by_query_parameter(client, viewer, chain, window, expected, samples):
    _samples(chain, [*range(0, 60, 2), *range(60, 360, 10), 60 * 48])
    client.force_login(viewer.user)
    body = client.get(f"{CHAINS}/{chain.pk}/change/", {"window": window}).content.decode()
    assert f"Lag over the last {expected}" in body
    assert f'data-window="{expected}" class="selected"' in body
    assert f"{samples} samples" in body
    assert f"live/?window={expected}" in body


def test_reorgs_rollbacks_and_halts_are_marked_where_they_happened(chain, admin_member):
    start = clock.now()
    actor = Actor.for_user(admin_member.user)
    with clock.frozen(start - timedelta(hours=3)):
        record(
            action="indexer.rolled_back",
            actor=actor,
            org=chain.org,
            target=chain,
            reason="reorg at 9: rolled back to the fork point 7",
        )
    with clock.frozen(start - timedelta(hours=1, minutes=30)):
        record(
            action="indexer.rolled_back", actor=actor, org=chain.org, target=chain, reason="operator asked"
        )
    with clock.frozen(start - timedelta(hours=1)):
        record(
            action="indexer.halted",
            actor=actor,
            org=chain.org,
            target=chain.state,
            reason="identity mismatch",
        )
    with clock.frozen(start - timedelta(hours=7)):
        record(
            action="indexer.halted",
            actor=actor,
            org=chain.org,
            target=chain.state,
            reason="before the window",
        )
    _samples(chain, [0, 30, 200])
    with clock.frozen(start):
        chart = lag_chart(chain, window="6h", width=648)  # plot: x 48 .. 640
    assert chart is not None
    assert [m.kind for m in chart["markers"]] == ["reorg", "rollback", "halt"]
    xs = [float(x) for x in re.findall(r'class="fo-marker [^"]*" x1="([\d.]+)"', chart["svg"])]
    assert xs == [round(48 + 592 * f, 1) for f in (3 / 6, 4.5 / 6, 5 / 6)]
    assert "identity mismatch" in chart["svg"]


def test_the_indexer_card_has_a_lag_sparkline_per_chain(client, viewer, chain):
    _samples(chain, range(0, 600, 10))
    IndexerState.objects.filter(chain=chain).update(head_height=100)
    client.force_login(viewer.user)
    body = client.get("/admin/live/card/indexer/").content.decode()
    assert f'data-trend="indexer-lag-{chain.slug}"' in body
    assert 'data-trend="indexer-enrichment-backlog"' in body
    assert re.search(rf'data-trend="indexer-lag-{chain.slug}"><svg class="fo-spark"[^>]*>.*?<polyline', body)


def test_the_indexer_card_query_count_does_not_grow_with_chains(
    client, viewer, org, chain, django_assert_max_num_queries
):
    _samples(chain, range(0, 600, 10))
    client.force_login(viewer.user)
    client.get("/admin/live/card/indexer/")
    with django_assert_max_num_queries(12) as one:
        client.get("/admin/live/card/indexer/")
    for slug in ("second", "third"):
        _samples(make_indexed_chain(org, slug=slug, blocks=2), range(0, 600, 10))
    with django_assert_max_num_queries(len(one.captured_queries)):
        assert client.get("/admin/live/card/indexer/").status_code == 200
