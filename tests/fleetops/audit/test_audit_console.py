"""The audit log in the console: full-text search over action, reason, actor and target (through
its GIN index), the actor and time-range filters, times to the second, and the link from every
object page to its trail."""

from __future__ import annotations

import importlib
import re
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from curtailment.planning import StartRequest
from curtailment.services import curtailment_start
from fleetops.access.services import api_token_create
from fleetops.audit.actors import Actor
from fleetops.audit.admin import AT_FORMAT, SEARCH_HELP
from fleetops.audit.models import ActorType, AuditEvent
from fleetops.audit.selectors import SEARCH_INDEX, audit_search, search_document_sql
from fleetops.lib import clock
from indexer.models import SyncSource
from migrations_app.models.protocols import Protocol
from tests.curtailment.conftest import make_fleet
from tests.factories import make_indexed_chain, record
from tests.migrations_app.keys_fixtures import make_group, make_keys

pytestmark = pytest.mark.django_db
AUDIT = "/admin/audit/auditevent/"


def _ids(page: str) -> set[int]:
    return {int(pk) for pk in re.findall(r"/admin/audit/auditevent/(\d+)/change/", page)}


def _get(client, **params) -> str:
    response = client.get(AUDIT, params)
    assert response.status_code == 200, response.content[:300]
    return response.content.decode()


@pytest.fixture
def trail(org, operator):
    actor = Actor.for_user(operator.user)
    reorg = record(
        action="indexer.rolled_back",
        actor=Actor.scheduler("indexer.writer"),
        org=org,
        reason="reorg at 120: rolled back to the fork point 118",
    )
    asked = record(
        action="indexer.rollback_requested", actor=actor, org=org, reason="bad block from the archive"
    )
    started = record(action="curtailment.started", actor=actor, org=org, reason="peak price")
    return {"reorg": reorg, "asked": asked, "started": started}


def test_search_finds_actions_and_reasons_and_says_what_it_searches(client, viewer, trail):
    client.force_login(viewer.user)
    page = _get(client)
    assert SEARCH_HELP.split(".")[0] in page  # the hint under the search box says what is searched
    assert _ids(_get(client, q="rollback")) == {trail["asked"].pk}
    assert _ids(_get(client, q="reorg")) == {trail["reorg"].pk}
    # Each word is a prefix: "roll" reaches both "rollback" and "rolled back".
    assert _ids(_get(client, q="roll")) == {trail["reorg"].pk, trail["asked"].pk}
    # Actor and target words; every word must match.
    assert _ids(_get(client, q="otto")) == {trail["asked"].pk, trail["started"].pk}
    assert _ids(_get(client, q="otto peak")) == {trail["started"].pk}
    assert _ids(_get(client, q="indexer.writer")) == {trail["reorg"].pk}
    assert _ids(_get(client, q="no-such-word")) == set()


def test_the_search_document_is_the_indexed_expression_and_a_search_uses_its_index(org):
    migration = importlib.import_module("fleetops.audit.migrations.0003_audit_search_indexes")
    assert search_document_sql() == migration.SEARCH_DOCUMENT
    actor = Actor.system("bench")
    AuditEvent.objects.bulk_create(
        AuditEvent(
            at=clock.now(),
            org=org,
            actor_type=actor.type,
            actor_id=actor.id,
            actor_label=actor.label,
            action="curtailment.updated" if i % 500 else "indexer.rolled_back",
            reason=f"routine change {i}" if i % 500 else f"reorg at {i}",
        )
        for i in range(4000)
    )
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {AuditEvent._meta.db_table}")
    qs = audit_search(AuditEvent.objects.order_by(), text="reorg")
    assert qs.count() == 8
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        sql, params = qs.query.sql_with_params()
        cursor.execute(f"EXPLAIN {sql}", params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert SEARCH_INDEX in plan, plan
    assert "Seq Scan" not in plan


def test_the_actor_filter_shows_one_members_rows_including_their_tokens(client, viewer, operator, trail):
    # Another member's token: not the operator's.
    issued_by_token = record(
        action="curtailment.stopped",
        actor=Actor(type=ActorType.API_TOKEN, id="999", label="vera via token ci"),
        org=operator.org,
    )
    token = api_token_create(
        user=operator.user,
        org=operator.org,
        token_role="operator",
        name="ci",
        actor=Actor.for_user(operator.user),
    )
    via_token = record(
        action="curtailment.stopped",
        actor=Actor(type=ActorType.API_TOKEN, id=str(token.token.pk), label="otto via token ci"),
        org=operator.org,
    )
    client.force_login(viewer.user)
    page = _get(client)
    assert f"?actor=user%3A{operator.user.pk}" in page  # offered as a choice
    mine = _ids(_get(client, actor=f"user:{operator.user.pk}"))
    assert {trail["asked"].pk, trail["started"].pk, via_token.pk} <= mine
    assert trail["reorg"].pk not in mine and issued_by_token.pk not in mine
    assert _ids(_get(client, actor="process:indexer.writer")) == {trail["reorg"].pk}


def test_the_time_range_filter_takes_presets_and_timestamps(client, viewer, org):
    two_hours_ago = clock.now() - timedelta(hours=2)
    with clock.frozen(two_hours_ago):
        old = record(action="curtailment.started", actor=Actor.system("t"), org=org, reason="old")
    new = record(action="curtailment.started", actor=Actor.system("t"), org=org, reason="new")
    client.force_login(viewer.user)
    assert _ids(_get(client, since="1h")) == {new.pk}
    local = timezone.localtime(two_hours_ago)
    assert _ids(_get(client, until=(local + timedelta(minutes=1)).strftime("%Y-%m-%d %H:%M:%S"))) == {old.pk}
    assert _ids(_get(client, since=(local - timedelta(seconds=1)).strftime("%Y-%m-%d %H:%M:%S"))) == {
        old.pk,
        new.pk,
    }
    bad = client.get(AUDIT, {"since": "yesterday-ish"})
    assert bad.status_code == 302 and "e=1" in bad["Location"]


def test_audit_times_are_shown_to_the_second(client, viewer, trail):
    client.force_login(viewer.user)
    at = timezone.localtime(trail["started"].at).strftime(AT_FORMAT)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", at)
    assert at in _get(client)
    detail = client.get(f"{AUDIT}{trail['started'].pk}/change/").content.decode()
    assert at in detail


def test_the_audit_changelist_runs_a_bounded_number_of_queries(
    client, viewer, trail, django_assert_max_num_queries
):
    client.force_login(viewer.user)
    with django_assert_max_num_queries(16):
        _get(client, q="roll", since="24h", actor=f"user:{viewer.user.pk}")


def _event(member):
    make_fleet(member.org, 3)
    return curtailment_start(
        org=member.org, actor=Actor.for_user(member.user), req=StartRequest(target_kw=3.0, reason="peak")
    ).event


@pytest.mark.parametrize("kind", ["event", "key", "group", "chain", "source", "protocol"])
def test_every_object_page_links_to_its_audit_trail(client, viewer, operator, kind):
    org = viewer.org
    if kind == "event":
        obj = _event(operator)
    elif kind == "key":
        obj = make_keys(org, 1)[0]
    elif kind == "group":
        obj = make_group(org)
    else:
        chain = make_indexed_chain(org)
        if kind == "chain":
            obj = chain
        elif kind == "source":
            obj = SyncSource.objects.create(chain=chain, name="archive", rpc_url="http://archive:26657")
        else:
            obj = Protocol.objects.create(protocol_id="SEP50", chain=chain, name="SEP-50")
    mine = record(action="test.touched", actor=Actor.system("t"), org=org, target=obj, reason="this one")
    other = record(action="test.touched", actor=Actor.system("t"), org=org, reason="another object")
    opts = obj._meta
    client.force_login(viewer.user)
    page = client.get(f"/admin/{opts.app_label}/{opts.model_name}/{obj.pk}/change/")
    assert page.status_code == 200
    link = f"{AUDIT}?target_type={opts.app_label}.{opts.model_name}&amp;target_id={obj.pk}"
    assert link in page.content.decode()
    trail = _get(client, target_type=f"{opts.app_label}.{opts.model_name}", target_id=str(obj.pk))
    assert mine.pk in _ids(trail) and other.pk not in _ids(trail)
