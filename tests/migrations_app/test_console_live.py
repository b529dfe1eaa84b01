"""Keys and protocols in the live console: the keys changelist rows refresh in place (scoped, pinned
queries), its secondary columns collapse into the row's details instead of disappearing, key history
and transactions are paginated tables, and the "stuck" flags of keys and protocols switch at their
thresholds."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.test import override_settings

from fleetops.admin_live import FRAGMENT_HEADER
from fleetops.lib import clock
from migrations_app.keys.admin import HISTORY_PER_PAGE
from migrations_app.keys.selectors import key_overdue, overdue_keys
from migrations_app.models import Cursor, MigrationStatus, Protocol
from migrations_app.models.keys import Key, RemediationEntry, StakeTransaction
from migrations_app.protocols.selectors import history_stuck
from tests.factories import make_indexed_chain
from tests.migrations_app.keys_fixtures import make_group, make_keys

pytestmark = pytest.mark.django_db
KEYS = "/admin/migrations_app/key"
PROTOCOLS = "/admin/migrations_app/protocol"


@pytest.fixture
def keys(org):
    return make_keys(org, 5, group=make_group(org, "a"))


def test_the_keys_changelist_rows_are_a_live_region(client, viewer, keys):
    client.force_login(viewer.user)
    page = client.get(f"{KEYS}/", {"migration_status__exact": "none"}).content.decode()
    match = re.search(
        r'<tbody id="keys-changelist-rows" data-live="keys-changelist" data-live-url="([^"]+)"', page
    )
    assert match, "the rows are not a live region"
    url = match.group(1).replace("&amp;", "&")
    assert url == f"{KEYS}/live/?migration_status__exact=none"
    fragment = client.get(url)
    assert fragment.status_code == 200 and fragment[FRAGMENT_HEADER] == "1"
    body = fragment.content.decode()
    assert all(k.address in body for k in keys)
    assert "data-live-status" in body and "<tr" in body
    assert "action-select" not in body  # a viewer has no actions, so no selection boxes either


def test_the_live_rows_follow_the_filters_and_the_organization(client, viewer, outsider, keys, other_org):
    Key.objects.filter(pk=keys[0].pk).update(migration_status="failed")
    theirs = make_keys(other_org, 1, start=100)[0]
    client.force_login(viewer.user)
    failed = client.get(f"{KEYS}/live/", {"migration_status__exact": "failed"}).content.decode()
    assert keys[0].address in failed and keys[1].address not in failed
    assert theirs.address not in client.get(f"{KEYS}/live/").content.decode()
    client.force_login(outsider.user)
    mine = client.get(f"{KEYS}/live/").content.decode()
    assert theirs.address in mine and keys[0].address not in mine


def test_the_keys_live_rows_query_count_does_not_grow_with_keys(
    client, operator, org, django_assert_max_num_queries
):
    make_keys(org, 3)
    client.force_login(operator.user)
    client.get(f"{KEYS}/live/")
    with django_assert_max_num_queries(12) as small:
        client.get(f"{KEYS}/live/")
    make_keys(org, 60, start=10)
    with django_assert_max_num_queries(len(small.captured_queries)):
        assert client.get(f"{KEYS}/live/").status_code == 200


def test_secondary_columns_collapse_into_the_row_details_never_silently(client, viewer, keys):
    Key.objects.filter(pk=keys[0].pk).update(
        migration_status="retrying",
        migration_attempts=2,
        migration_max_attempts=5,
        migration_last_error="node said no",
        migration_manual_retries=1,
        migration_next_attempt_at=clock.now() + timedelta(minutes=3),
    )
    client.force_login(viewer.user)
    page = client.get(f"{KEYS}/").content.decode()
    tiers = re.findall(r"@container fo-changelist \(max-width: (\d+)px\) \{(.*?)\n\}", page, re.S)
    assert [int(width) for width, _ in tiers] == [1400, 900]  # group and state first, then the rest
    wide, narrow = (rules for _, rules in tiers)
    for column in ("address_group", "state"):
        assert f".field-{column}" in wide
    for column in ("migration_next_attempt_at", "last_error", "migration_manual_retries"):
        assert f".field-{column}" in narrow
    for kept in ("migration_badge", "attempts", "stuck", "address"):
        assert f".field-{kept}," not in wide + narrow
    row = re.search(rf"{keys[0].address}.*?</tr>", page, re.S).group(0)
    details = re.search(r'<details class="fo-row-details"[^>]*>(.*?)</details>', row, re.S).group(1)
    assert (
        '<dt class="fo-d-last_error">Last error</dt><dd class="fo-d-last_error">node said no</dd>' in details
    )
    assert '<dt class="fo-d-migration_manual_retries">Migration manual retries</dt>' in details
    assert '<dd class="fo-d-migration_manual_retries">1</dd>' in details
    assert "Retrying #3 of 5" in row and "2/5" in row  # badge and attempts stay columns


def test_the_audit_enrichment_and_event_changelists_collapse_by_priority(client, superuser):
    client.force_login(superuser)
    for url, secondary in (
        ("/admin/audit/auditevent/", "target_type"),
        ("/admin/indexer/enrichment/", "next_attempt_at"),
        ("/admin/indexer/event/", "tx_index"),
    ):
        page = client.get(url).content.decode()
        assert "@container fo-changelist" in page and f".field-{secondary}" in page, url
        assert "fleetops/console.css" in page


def test_key_history_and_transactions_are_paginated_newest_first(client, viewer, keys):
    key = keys[0]
    now = clock.now()
    RemediationEntry.objects.bulk_create(
        [
            RemediationEntry(
                key=key, outcome="attempt_failed", attempt=1, message=f"entry {i:02d}", created_at=now
            )
            for i in range(45)
        ]
    )
    StakeTransaction.objects.create(
        key=key,
        round=1,
        attempt=1,
        status="failure",
        claimed_at=now,
        created_at=now,
        resolved_at=now,
        code=5,
        hash="",
    )
    client.force_login(viewer.user)
    page = client.get(f"{KEYS}/{key.pk}/change/").content.decode()
    history = re.search(r'id="key-history">(.*?)</fieldset>', page, re.S).group(1)
    assert history.count(">entry ") == HISTORY_PER_PAGE
    assert "entry 44" in history and "entry 24" not in history  # newest first
    assert "page 1 of 3 (45 rows)" in history and "?history_page=2" in history
    second = client.get(f"{KEYS}/{key.pk}/change/", {"history_page": 3}).content.decode()
    assert "entry 00" in second and "entry 44" not in second
    assert "Rejected by the node at CheckTx (code 5); never on chain" in page
    assert 'class="fo-fit-table"' in page and "inline-group" not in page


def test_a_key_is_stuck_past_its_next_attempt_plus_the_grace(keys):
    key = keys[0]
    now = clock.now()
    key.migration_status = "scheduled"
    key.migration_next_attempt_at = now - timedelta(seconds=600)
    with override_settings(FLEETOPS_KEYS_STUCK_SECONDS=600):
        assert key_overdue(key, now=now) == ""
        assert "not picked up" in key_overdue(key, now=now + timedelta(seconds=1))
        key.migration_next_attempt_at, key.migration_updated_at = None, now - timedelta(seconds=601)
        assert "in flight for" in key_overdue(key, now=now)  # claimed and never resolved
        key.migration_status = "failed"
        assert key_overdue(key, now=now + timedelta(days=9)) == ""  # not due: never stuck


def test_the_overdue_filter_matches_the_row_flag(client, viewer, keys):
    now = clock.now()
    Key.objects.filter(pk=keys[0].pk).update(
        migration_status="scheduled", migration_next_attempt_at=now - timedelta(hours=2)
    )
    Key.objects.filter(pk=keys[1].pk).update(
        migration_status="scheduled", migration_next_attempt_at=now - timedelta(seconds=30)
    )
    assert list(overdue_keys(Key.objects.all(), now=now)) == [Key.objects.get(pk=keys[0].pk)]
    client.force_login(viewer.user)
    page = client.get(f"{KEYS}/", {"stuck": "overdue"}).content.decode()
    assert keys[0].address in page and keys[1].address not in page
    assert page.count('class="fo-stuck"') == 1


@pytest.fixture
def protocol(org):
    chain = make_indexed_chain(org, blocks=5)
    return Protocol.objects.create(
        protocol_id="SEP41",
        chain=chain,
        name="SEP-41",
        classification_status=MigrationStatus.SUCCESS,
        history_migration_status=MigrationStatus.IN_PROGRESS,
        history_started_at=clock.now() - timedelta(hours=1),
    )


def test_a_history_migration_is_stuck_without_cursor_progress_past_the_threshold(protocol):
    now = clock.now()
    with override_settings(FLEETOPS_PROTOCOL_STUCK_SECONDS=900):
        moved = now - timedelta(seconds=900)
        assert history_stuck(protocol, cursor_moved_at=moved, now=now) == ""
        assert "no cursor progress for 15 min" in history_stuck(
            protocol, cursor_moved_at=moved, now=now + timedelta(seconds=1)
        )
        # No cursor yet: measured from the start of the migration.
        assert history_stuck(protocol, cursor_moved_at=None, now=now).startswith(
            "no cursor progress for 60 min"
        )
        protocol.history_migration_status = MigrationStatus.SUCCESS
        assert history_stuck(protocol, cursor_moved_at=None, now=now) == ""


def test_the_protocol_page_is_live_and_flags_a_stuck_migration(client, viewer, outsider, protocol):
    Cursor.objects.create(
        name=protocol.history_cursor_name, height=3, updated_at=clock.now() - timedelta(hours=2)
    )
    client.force_login(viewer.user)
    page = client.get(f"{PROTOCOLS}/{protocol.pk}/change/").content.decode()
    assert f'data-live="protocol" data-live-url="{PROTOCOLS}/{protocol.pk}/live/"' in page
    fragment = client.get(f"{PROTOCOLS}/{protocol.pk}/live/")
    assert fragment.status_code == 200 and fragment[FRAGMENT_HEADER] == "1"
    body = fragment.content.decode()
    assert 'id="protocol-status"' in body and 'data-live-field="stuck"' in body
    assert "no cursor progress for 120 min" in body
    assert 'class="fo-stuck"' in client.get(f"{PROTOCOLS}/").content.decode()
    client.force_login(outsider.user)
    assert client.get(f"{PROTOCOLS}/{protocol.pk}/live/").status_code == 404


def test_the_protocol_fragment_query_count_is_pinned(client, viewer, protocol, django_assert_max_num_queries):
    client.force_login(viewer.user)
    client.get(f"{PROTOCOLS}/{protocol.pk}/live/")
    with django_assert_max_num_queries(10):
        assert client.get(f"{PROTOCOLS}/{protocol.pk}/live/").status_code == 200


def test_the_keys_card_has_a_sparkline_of_keys_in_flight_and_failed(client, viewer, org, keys):
    from fleetops.observability.history import history_sample

    Key.objects.filter(pk__in=[k.pk for k in keys[:2]]).update(migration_status="failed")
    history_sample()
    client.force_login(viewer.user)
    body = client.get("/admin/live/card/keys/").content.decode()
    spark = re.search(r'data-trend="keys-by-status">(<svg.*?</svg>)', body, re.S)
    assert spark and spark.group(1).count("<polyline") == 2
