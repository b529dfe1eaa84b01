"""The transition kernel and the machine declarations, on a real table (notification deliveries)
with test machines that are not registered, so the generated docs never see them."""

from __future__ import annotations

import json
import threading

import pytest
from django.db import connection
from django.db.models import F
from hypothesis import given
from hypothesis import strategies as st

from fleetops.access.models import Role
from fleetops.access.roles import effective_role
from fleetops.audit.actors import Actor
from fleetops.audit.models import ActorType, AuditEvent
from fleetops.lib import clock
from fleetops.lib.errors import Forbidden, RaceLost, ValidationFailed
from fleetops.lib.machine import Machine, engine_too
from fleetops.lib.reason import REASON_MAX_LENGTH, clean_reason
from fleetops.lib.transition import BulkAudit, transition, transition_rows
from fleetops.notifications.models import (
    DELIVERY_MACHINE,
    ChannelKind,
    DeliveryStatus,
    NotificationChannel,
    NotificationDelivery,
)
from fleetops.observability.metrics import RACE_LOST
from tests.transitions import assert_refused_without_write, assert_trail_replays, pair_params, set_state

S = DeliveryStatus
# A machine over the same column with one edge per kind of gate: operator, admin, engine.
GATED = Machine.declare(
    "test.gated",
    S,
    field="status",
    initial=S.PENDING,
    edges={S.PENDING: {S.SENT: Role.OPERATOR, S.ERROR: None}, S.ERROR: {S.PENDING: Role.ADMIN}},
    register=False,
)


@pytest.fixture
def delivery(org):
    channel = NotificationChannel.objects.create(org=org, name="c", kind=ChannelKind.EMAIL, target="a@b.c")
    now = clock.now()
    return NotificationDelivery.objects.create(
        org=org, channel=channel, event_type="t", subject="s", created_at=now, next_attempt_at=now
    )


def _race_count(operation: str) -> float:
    return RACE_LOST.labels(operation=operation)._value.get()


def test_a_declaration_that_names_an_unknown_state_or_a_wrong_final_state_is_refused():
    with pytest.raises(ValueError, match="unknown states"):
        Machine.declare(
            "t.bad", S, field="status", initial=S.PENDING, edges={S.PENDING: {"nope": None}}, register=False
        )
    with pytest.raises(ValueError, match="terminal states"):
        Machine.declare(
            "t.bad2",
            S,
            field="status",
            initial=S.PENDING,
            edges={S.PENDING: {S.SENT: None}},
            terminal=[S.SENT],
            register=False,
        )


def test_the_machine_derives_from_states_and_final_states_from_its_edges():
    assert GATED.allowed_from(S.PENDING) == (S.ERROR,)
    assert GATED.allowed_from(S.SENT) == (S.PENDING,)
    assert GATED.terminal == frozenset({S.SENT})
    assert DELIVERY_MACHINE.terminal == frozenset({S.SENT, S.ERROR})
    assert GATED.replay([(S.PENDING, S.ERROR), (S.ERROR, S.PENDING)]) == S.PENDING
    with pytest.raises(ValueError, match="not an edge"):
        GATED.replay([(S.PENDING, S.PENDING)])


def test_a_legal_move_changes_the_row_and_writes_its_audit_row_in_the_same_transaction(delivery, operator):
    moved = transition(
        delivery,
        machine=GATED,
        to=S.SENT,
        actor=Actor.for_user(operator.user),
        org=operator.org,
        action="test.sent",
        reason="done",
        updates={"attempts": F("attempts") + 1, "error": ""},
        audit_fields=["attempts"],
    )
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == (S.SENT, 1)
    assert moved.before == S.PENDING and moved.changes == {"attempts": [0, 1], "status": ["pending", "sent"]}
    row = AuditEvent.objects.get(action="test.sent")
    assert row.target_id == str(delivery.pk) and row.reason == "done" and row.changes == moved.changes
    assert_trail_replays(delivery, GATED)


def test_an_audit_failure_rolls_the_state_change_back(delivery, operator, monkeypatch):
    import fleetops.lib.transition as kernel

    def boom(**kwargs):
        raise RuntimeError("audit insert failed")

    monkeypatch.setattr(kernel, "record", boom)
    with pytest.raises(RuntimeError):
        transition(
            delivery,
            machine=GATED,
            to=S.SENT,
            actor=Actor.for_user(operator.user),
            org=operator.org,
            action="x",
        )
    assert NotificationDelivery.objects.get(pk=delivery.pk).status == S.PENDING


@pytest.mark.parametrize(("source", "target"), pair_params(GATED))
def test_every_illegal_pair_is_refused_without_a_write(delivery, operator, source, target):
    set_state(delivery, GATED, source)
    if GATED.can(source, target):
        return
    assert_refused_without_write(
        delivery, machine=GATED, to=target, actor=Actor.system("t"), org=operator.org
    )


def test_a_row_moved_by_someone_else_is_a_counted_lost_race_not_success(delivery, operator):
    stale = NotificationDelivery.objects.get(pk=delivery.pk)
    NotificationDelivery.objects.filter(pk=delivery.pk).update(status=S.ERROR)
    before = _race_count("test.gated>sent")
    with pytest.raises(RaceLost):
        transition(
            stale, machine=GATED, to=S.SENT, actor=Actor.for_user(operator.user), org=operator.org, action="x"
        )
    assert _race_count("test.gated>sent") == before + 1
    assert not AuditEvent.objects.filter(action="x").exists()


def test_where_conditions_make_the_update_conditional_too(delivery, operator):
    with pytest.raises(RaceLost):
        transition(
            delivery,
            machine=GATED,
            to=S.SENT,
            actor=Actor.for_user(operator.user),
            org=operator.org,
            action="x",
            where={"attempts": 7},
        )
    assert NotificationDelivery.objects.get(pk=delivery.pk).status == S.PENDING


@pytest.mark.django_db(transaction=True)
def test_a_person_without_the_edge_role_is_refused_and_the_refusal_row_commits(delivery, viewer, operator):
    with pytest.raises(Forbidden):
        transition(
            delivery, machine=GATED, to=S.SENT, actor=Actor.for_user(viewer.user), org=viewer.org, action="x"
        )
    denied = AuditEvent.objects.get(action="access.denied")
    assert denied.metadata["what"] == "test.gated: pending -> sent"
    assert (denied.metadata["required_role"], denied.metadata["role"]) == ("operator", "viewer")
    assert denied.target_id == str(delivery.pk)
    assert NotificationDelivery.objects.get(pk=delivery.pk).status == S.PENDING
    # An engine edge: a person is refused whatever the role; the scheduler may take it.
    with pytest.raises(Forbidden):
        transition(
            delivery,
            machine=GATED,
            to=S.ERROR,
            actor=Actor.for_user(operator.user),
            org=operator.org,
            action="x",
        )
    assert AuditEvent.objects.filter(action="access.denied").count() == 2
    transition(
        delivery, machine=GATED, to=S.ERROR, actor=Actor.scheduler("sweep"), org=operator.org, action="x"
    )
    # Back out of error needs an admin: the operator is refused.
    with pytest.raises(Forbidden):
        transition(
            delivery,
            machine=GATED,
            to=S.PENDING,
            actor=Actor.for_user(operator.user),
            org=operator.org,
            action="x",
        )
    assert NotificationDelivery.objects.get(pk=delivery.pk).status == S.ERROR


@pytest.mark.django_db(transaction=True)
def test_two_connections_racing_the_same_move_exactly_one_wins(delivery, operator):
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def attempt() -> None:
        try:
            stale = NotificationDelivery.objects.get(pk=delivery.pk)
            barrier.wait(timeout=10)
            transition(
                stale,
                machine=GATED,
                to=S.SENT,
                actor=Actor.for_user(operator.user),
                org=operator.org,
                action="race",
            )
            outcomes.append("won")
        except RaceLost:
            outcomes.append("lost")
        finally:
            connection.close()

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(outcomes) == ["lost", "won"]
    assert AuditEvent.objects.filter(action="race").count() == 1


def test_the_set_based_variant_moves_only_legal_rows_still_matching_and_audits_them_in_one_insert(
    delivery, org, django_assert_num_queries
):
    others = [
        NotificationDelivery.objects.create(
            org=org,
            channel=delivery.channel,
            event_type="t",
            subject="s",
            created_at=clock.now(),
            next_attempt_at=clock.now(),
        )
        for _ in range(3)
    ]
    set_state(others[0], DELIVERY_MACHINE, S.SENT)  # terminal: may not move
    NotificationDelivery.objects.filter(pk=others[1].pk).update(attempts=5)  # no longer matches
    rows = [
        {"pk": d.pk, "from": S.PENDING, "to": S.ERROR, "attempts": 0, "error": "gone"}
        for d in [delivery, *others]
    ]
    with django_assert_num_queries(4):  # savepoint, UPDATE, audit INSERT, release
        moved = transition_rows(
            model=NotificationDelivery,
            machine=DELIVERY_MACHINE,
            rows=rows,
            set_fields=("error",),
            match=("attempts",),
            increments={"attempts": 1},
            operation="test_bulk",
            exact_from=True,
            audit=BulkAudit(action="test.bulk", actor=Actor.scheduler("t"), org_of=org),
        )
    assert sorted(moved) == sorted([delivery.pk, others[2].pk])
    states = dict(NotificationDelivery.objects.values_list("pk", "status"))
    assert states[others[0].pk] == S.SENT and states[others[1].pk] == S.PENDING
    assert NotificationDelivery.objects.get(pk=delivery.pk).attempts == 1
    assert sorted(
        AuditEvent.objects.filter(action="test.bulk").values_list("target_id", flat=True)
    ) == sorted([str(delivery.pk), str(others[2].pk)])


def test_the_set_based_variant_with_per_row_targets_admits_only_the_machines_edges(delivery):
    set_state(delivery, DELIVERY_MACHINE, S.SENT)
    assert (
        transition_rows(
            model=NotificationDelivery,
            machine=DELIVERY_MACHINE,
            rows=[{"pk": delivery.pk, "to": S.PENDING}],
            operation="test_illegal",
        )
        == []
    )
    assert NotificationDelivery.objects.get(pk=delivery.pk).status == S.SENT


def test_effective_role_comes_from_the_actor(operator, admin_member, outsider, superuser):
    assert effective_role(actor=Actor.for_user(operator.user), org_id=operator.org.pk) == Role.OPERATOR
    assert effective_role(actor=Actor.for_user(outsider.user), org_id=operator.org.pk) is None
    assert effective_role(actor=Actor.for_user(superuser), org_id=operator.org.pk) == Role.ADMIN
    assert effective_role(actor=Actor.scheduler("beat"), org_id=operator.org.pk) == Role.OPERATOR
    assert effective_role(actor=Actor.system("shell"), org_id=operator.org.pk) == Role.ADMIN
    assert effective_role(actor=Actor.anonymous(), org_id=operator.org.pk) is None


actors = st.builds(
    Actor,
    type=st.sampled_from(list(ActorType)),
    id=st.text(max_size=20),
    label=st.text(max_size=40),
    user_id=st.none() | st.integers(min_value=1, max_value=2**31),
    is_superuser=st.booleans(),
    interactive=st.booleans(),
)


@given(actors)
def test_an_actor_survives_the_trip_through_a_celery_payload(actor):
    assert Actor.from_payload(json.loads(json.dumps(actor.to_payload()))) == actor


@given(st.text(max_size=REASON_MAX_LENGTH + 50))
def test_the_one_reason_validator_accepts_exactly_stripped_non_blank_text_within_the_cap(text):
    stripped = text.strip()
    if stripped and len(stripped) <= REASON_MAX_LENGTH:
        assert clean_reason(text) == stripped
    else:
        with pytest.raises(ValidationFailed) as error:
            clean_reason(text)
        assert list(error.value.fields) == ["reason"]
    assert clean_reason(" ", required=False) == ""


def test_an_audited_set_based_move_must_name_each_rows_from_state(delivery, org):
    with pytest.raises(ValueError, match="exact_from"):
        transition_rows(
            model=NotificationDelivery,
            machine=DELIVERY_MACHINE,
            rows=[{"pk": delivery.pk}],
            to=S.SENT,
            operation="test_unaudited_from",
            audit=BulkAudit(action="test.bulk", actor=Actor.scheduler("t"), org_of=org),
        )
    assert NotificationDelivery.objects.get(pk=delivery.pk).status == S.PENDING


ENGINE_TOO = Machine.declare(
    "test.engine_too",
    S,
    field="status",
    initial=S.PENDING,
    edges={S.PENDING: {S.SENT: engine_too(Role.ADMIN)}},
    register=False,
)


@pytest.mark.django_db(transaction=True)
def test_an_edge_a_person_needs_a_role_for_may_also_be_the_engines(delivery, operator, admin_member):
    with pytest.raises(Forbidden):
        transition(
            delivery,
            machine=ENGINE_TOO,
            to=S.SENT,
            actor=Actor.for_user(operator.user),
            org=operator.org,
            action="x",
        )
    assert AuditEvent.objects.filter(action="access.denied").count() == 1
    transition(
        delivery, machine=ENGINE_TOO, to=S.SENT, actor=Actor.scheduler("writer"), org=operator.org, action="x"
    )
    assert ENGINE_TOO.edge(S.PENDING, S.SENT).engine_may
    assert not GATED.edge(S.PENDING, S.SENT).engine_may


def test_a_superuser_demoted_after_queueing_a_task_acts_with_the_role_they_have_now(superuser, org):
    queued = Actor.from_payload(Actor.for_user(superuser).to_payload())
    assert effective_role(actor=queued, org_id=org.pk) == Role.ADMIN
    type(superuser).objects.filter(pk=superuser.pk).update(is_superuser=False)
    assert effective_role(actor=queued, org_id=org.pk) is None
    type(superuser).objects.filter(pk=superuser.pk).update(is_superuser=True, is_active=False)
    assert effective_role(actor=queued, org_id=org.pk) is None
