"""Console reads over tables that grow without bound stay bounded: the keys card counts each status
with a LIMITed subquery (no GROUP BY over every key), the outbox changelist never runs an exact
COUNT(*) nor a DISTINCT over the whole table. `bench/b5_console.py` measures the same pages at 1M rows.
"""

from __future__ import annotations

import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from fleetops.lib import clock
from fleetops.outbox.models import OutboxMessage, OutboxStatus
from migrations_app.keys import dashboard as keys_dashboard
from migrations_app.keys import selectors as keys_selectors
from migrations_app.models.keys import Key, KeyMigrationStatus
from tests.migrations_app.keys_fixtures import make_keys

pytestmark = pytest.mark.django_db


def _on(table: str, captured: list[dict[str, str]]) -> list[str]:
    return [q["sql"] for q in captured if f'"{table}"' in q["sql"]]


def test_the_keys_card_counts_each_status_in_one_bounded_query(client, operator, monkeypatch):
    make_keys(operator.org, 5, migration_status=KeyMigrationStatus.FAILED, migration_max_attempts=5)
    make_keys(operator.org, 2, start=10, migration_status=KeyMigrationStatus.SCHEDULED)
    monkeypatch.setattr(keys_selectors, "SUMMARY_COUNT_CAP", 3)
    monkeypatch.setattr(keys_dashboard, "SUMMARY_COUNT_CAP", 3)
    client.force_login(operator.user)
    client.get("/admin/live/card/keys/")  # warm the session
    with CaptureQueriesContext(connection) as queries:
        response = client.get("/admin/live/card/keys/")
    assert response.status_code == 200
    on_keys = _on(Key._meta.db_table, queries.captured_queries)
    assert not [sql for sql in on_keys if "GROUP BY" in sql]
    counts = [sql for sql in on_keys if "COUNT(*)" in sql]
    assert len(counts) == 1  # every status in one statement
    # One LIMITed subquery per status, the cap + 1 rows at most.
    assert counts[0].count("LIMIT 4") == len(KeyMigrationStatus.values)
    body = response.content.decode()
    assert re.search(r"<td>failed</td><td>3\+</td>", body)  # 5 failed keys, shown past the cap
    assert re.search(r"<td>scheduled</td><td>2</td>", body)  # under the cap: exact


def test_bounded_counts_are_exact_under_the_cap_and_scoped(operator, other_org):
    make_keys(operator.org, 3, migration_status=KeyMigrationStatus.RETRYING)
    make_keys(other_org, 4, migration_status=KeyMigrationStatus.RETRYING)
    counts = keys_selectors.bounded_counts_by_status(Key.objects.filter(org=operator.org), cap=10)
    assert counts[KeyMigrationStatus.RETRYING] == 3
    assert counts[KeyMigrationStatus.FAILED] == 0
    assert set(counts) == set(KeyMigrationStatus.values)


def _messages(n: int, task: str, status: str = OutboxStatus.SENT) -> None:
    now = clock.now()
    OutboxMessage.objects.bulk_create(
        [
            OutboxMessage(
                task=task,
                status=status,
                created_at=now,
                available_at=now,
                sent_at=now if status == OutboxStatus.SENT else None,
            )
            for _ in range(n)
        ]
    )


def test_the_outbox_changelist_never_counts_or_distincts_the_whole_table(
    client, superuser, django_assert_max_num_queries
):
    _messages(3, "fleetops.tests.one")
    _messages(2, "fleetops.tests.two", OutboxStatus.PENDING)
    client.force_login(superuser)
    url = "/admin/outbox/outboxmessage/"
    client.get(url)
    for query in ("", "?task__exact=fleetops.tests.two", "?status__exact=pending"):
        with CaptureQueriesContext(connection) as queries, django_assert_max_num_queries(8):
            response = client.get(url + query)
        assert response.status_code == 200
        on_outbox = _on(OutboxMessage._meta.db_table, queries.captured_queries)
        assert on_outbox
        for sql in on_outbox:
            assert "DISTINCT" not in sql.upper()
            if "COUNT(" in sql.upper():
                assert "LIMIT" in sql.upper(), sql  # the paginator's capped count, never exact
    body = response.content.decode()
    assert "fleetops.tests.two" in body
    # The task filter offers the names seen among the newest messages, from a LIMITed read.
    with CaptureQueriesContext(connection) as queries:
        body = client.get(url).content.decode()
    assert "?task__exact=fleetops.tests.one" in body and "?task__exact=fleetops.tests.two" in body
    choices = [sql for sql in _on(OutboxMessage._meta.db_table, queries.captured_queries) if '"task"' in sql]
    assert any("LIMIT 2000" in sql for sql in choices)
    listed = client.get(url + "?task__exact=fleetops.tests.two").context["cl"].result_list
    assert {m.task for m in listed} == {"fleetops.tests.two"} and len(listed) == 2


def test_key_search_matches_exactly_on_indexed_columns(client, operator):
    keys = make_keys(operator.org, 4)
    client.force_login(operator.user)
    url = "/admin/migrations_app/key/"
    for term, expected in (
        (keys[0].address.upper(), {keys[0].pk}),  # bech32 typed upper-case
        (keys[1].public_key, {keys[1].pk}),
        ("pokt1owner1", {keys[1].pk}),  # make_keys: owner i % 3
        (keys[2].address[:-2], set()),  # exact, not a substring
    ):
        listed = client.get(url, {"q": term}).context["cl"].result_list
        assert {k.pk for k in listed} == expected, term
    # Every branch of the search has an index: with sequential scans priced out, none is left.
    from django.contrib import admin
    from django.test import RequestFactory

    request = RequestFactory().get(url)
    request.user = operator.user
    searched, _ = admin.site._registry[Key].get_search_results(request, Key.objects.all(), "pokt1owner1")
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
    plan = searched.explain()
    assert "Seq Scan" not in plan and "key_owner_address" in plan, plan


def _plan(queryset, *, bitmap_only: bool = False) -> str:
    """The plan with sequential scans priced out: what remains shows which index answers.
    `bitmap_only` also prices out plain index scans, so a full walk of the primary key cannot stand
    in for the filter's own indexes on a table of a few rows."""
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        if bitmap_only:
            cursor.execute("SET LOCAL enable_indexscan = off")
    return str(queryset.explain())


def _events(member, *reasons: str, **fields):
    from curtailment.models import CurtailmentEvent

    now = clock.now()
    return [
        CurtailmentEvent.objects.create(
            org=member.org,
            created_by=member.user,
            reason=reason,
            target_kw=5.0,
            max_duration_seconds=600,
            restore_batch_size=10,
            effective_batch_size=10,
            created_at=now,
            updated_at=now,
            **fields,
        )
        for reason in reasons
    ]


def test_event_search_reads_indexes_only(client, operator):
    from curtailment.models import CurtailmentEvent

    grid, heat, _ = _events(operator, "Grid operator request", "Heat wave peak", "Maintenance window")
    (external,) = _events(operator, "Imported", external_source="ercot", external_reference="ERCOT-771")
    client.force_login(operator.user)
    url = "/admin/curtailment/curtailmentevent/"
    for term, expected in (
        ("grid", {grid.pk}),  # a substring of the reason, any case
        ("wave PEAK", {heat.pk}),  # every word must match
        (str(heat.uuid), {heat.pk}),
        ("ERCOT-771", {external.pk}),
        ("nothing-like-it", set()),
    ):
        listed = client.get(url, {"q": term}).context["cl"].result_list
        assert {e.pk for e in listed} == expected, term

    from django.contrib import admin
    from django.test import RequestFactory

    request = RequestFactory().get(url)
    request.user = operator.user
    model_admin = admin.site._registry[CurtailmentEvent]
    words, _ = model_admin.get_search_results(request, CurtailmentEvent.objects.all(), "heat wave")
    # Unordered: which index answers the filter (on a handful of rows the planner may otherwise walk
    # the primary key backwards for the list's ORDER BY and filter as it goes).
    plan = _plan(words.order_by(), bitmap_only=True)
    assert "Seq Scan" not in plan and "curtailevent_reason_trgm" in plan, plan
    assert "curtailevent_external_ref" in plan, plan
    by_uuid, _ = model_admin.get_search_results(request, CurtailmentEvent.objects.all(), str(grid.uuid))
    assert "Seq Scan" not in _plan(by_uuid.order_by())


def test_stuck_and_overdue_key_filters_and_a_keys_transactions_read_their_indexes(operator):
    from datetime import timedelta

    from migrations_app.keys.selectors import overdue_keys, stuck_keys
    from migrations_app.models.keys import StakeTransaction

    due = make_keys(
        operator.org,
        3,
        migration_status=KeyMigrationStatus.SCHEDULED,
        migration_scheduled_at=clock.now() - timedelta(hours=2),
        migration_next_attempt_at=clock.now() - timedelta(hours=1),
    )
    in_flight = make_keys(
        operator.org,
        2,
        start=10,
        migration_status=KeyMigrationStatus.RETRYING,
        migration_updated_at=clock.now() - timedelta(hours=1),
    )
    # Many due keys on time (as at scale): reading the whole due set is what the indexes avoid.
    make_keys(
        operator.org,
        500,
        start=1000,
        migration_status=KeyMigrationStatus.SCHEDULED,
        migration_scheduled_at=clock.now(),
        migration_next_attempt_at=clock.now() + timedelta(minutes=5),
    )
    idle = make_keys(operator.org, 100, start=20)
    assert {k.pk for k in overdue_keys(Key.objects.all())} == {k.pk for k in due + in_flight}
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {Key._meta.db_table}")  # planner statistics for this fleet
    plan = _plan(overdue_keys(Key.objects.all()))
    assert "key_migration_due" in plan and "key_in_flight" in plan and "Seq Scan" not in plan, plan
    assert "key_due_scheduled" in _plan(stuck_keys(Key.objects.all()))

    now = clock.now()
    StakeTransaction.objects.bulk_create(
        StakeTransaction(
            key=key,
            reason="1006",
            round=r,
            attempt=0,
            status="success",
            claimed_at=now,
            created_at=now,
            resolved_at=now,
        )
        for key in idle[:20]
        for r in range(20)
    )
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_sort = off")
    plan = _plan(StakeTransaction.objects.filter(key=idle[0]).order_by("-id")[:20])
    assert "staketx_key_id" in plan, plan  # not the primary key walked backwards past other keys
    make_keys(
        operator.org, 5, start=5000, migration_status=KeyMigrationStatus.FAILED, migration_updated_at=now
    )
    newest_failed = Key.objects.filter(migration_status=KeyMigrationStatus.FAILED).order_by(
        "-migration_updated_at"
    )
    assert "key_failed_recent" in _plan(newest_failed[:10])  # the dashboard's list, not a sort of all


def test_the_platform_card_counts_a_day_of_audit_rows_up_to_a_cap(client, operator, monkeypatch):
    from fleetops.audit.actors import Actor
    from fleetops.audit.models import AuditEvent
    from fleetops.observability import platform_checks
    from tests.factories import record

    for i in range(3):
        record(
            action="tests.console.bounded",
            actor=Actor.for_user(operator.user),
            org=operator.org,
            reason=f"r{i}",
        )
    monkeypatch.setattr(platform_checks, "CARD_COUNT_CAP", 2)
    client.force_login(operator.user)
    client.get("/admin/live/card/platform/")
    with CaptureQueriesContext(connection) as queries:
        body = client.get("/admin/live/card/platform/").content.decode()
    assert re.search(r"Audit events \(24 h\)</th><td>2\+</td>", body)
    counts = [sql for sql in _on(AuditEvent._meta.db_table, queries.captured_queries) if "COUNT(*)" in sql]
    assert len(counts) == 2 and all("LIMIT 3" in sql for sql in counts), counts


def test_a_filtered_changelist_counts_without_the_lists_ordering(operator):
    from fleetops.admin_site import FILTERED_COUNT_CAP, EstimatedCountPaginator

    make_keys(operator.org, 3, migration_status=KeyMigrationStatus.RETRYING)
    listed = Key.objects.filter(migration_status=KeyMigrationStatus.RETRYING).order_by("-id")
    with CaptureQueriesContext(connection) as queries:
        assert EstimatedCountPaginator(listed, 50).count == 3
    (sql,) = [q["sql"] for q in queries.captured_queries]
    # The capped count: no ORDER BY inside it, so the status index answers instead of a backward
    # walk of the primary key through every key that does not match.
    assert f"LIMIT {FILTERED_COUNT_CAP + 1}" in sql and "ORDER BY" not in sql, sql


def test_outbox_search_is_the_exact_request_id_on_its_index(client, superuser):
    _messages(3, "fleetops.tests.one")
    target = OutboxMessage.objects.order_by("id").first()
    assert target is not None
    OutboxMessage.objects.filter(pk=target.pk).update(request_id="req-4f2a")
    client.force_login(superuser)
    url = "/admin/outbox/outboxmessage/"
    assert [m.pk for m in client.get(url, {"q": "req-4f2a"}).context["cl"].result_list] == [target.pk]
    assert list(client.get(url, {"q": "req-4f"}).context["cl"].result_list) == []  # exact only
    from django.contrib import admin
    from django.test import RequestFactory

    request = RequestFactory().get(url)
    request.user = superuser
    searched, _ = admin.site._registry[OutboxMessage].get_search_results(
        request, OutboxMessage.objects.all(), "req-4f2a"
    )
    plan = _plan(searched)
    assert "outbox_request_id" in plan and "Seq Scan" not in plan, plan
