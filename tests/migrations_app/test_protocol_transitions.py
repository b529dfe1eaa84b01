"""Transition tests generated from the protocol machines, the roles on their edges, and the denial
rows a refusal writes.

For every machine (classification, history migration, current-state migration) and every (from, to)
pair of its states: a legal pair is taken through the named step in `migrations_app.protocols.status`
(or the run's start, which creates the cursor in the same transaction) and audited; an illegal one is
refused by the kernel without a write. A mapping (from, to) -> step per machine must cover exactly
the machine's edges, so a new edge without a service fails here.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from fleetops.access.models import Role
from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.lib.errors import Forbidden, RaceLost
from fleetops.lib.machine import Machine, machines
from fleetops.lib.transition import authorize
from fleetops.outbox.models import OutboxStatus
from migrations_app.models import (
    CLASSIFICATION_MACHINE,
    CURRENT_STATE_MACHINE,
    HISTORY_MACHINE,
    Cursor,
    MigrationStatus,
    Protocol,
)
from migrations_app.protocols import history, services, status, tasks
from migrations_app.protocols.current_state import CURRENT_STATE, current_state_migrate
from migrations_app.protocols.history import HISTORY, Strategy
from tests.factories import make_indexed_chain
from tests.transitions import assert_refused_without_write, edge_keys, pair_params, set_state

pytestmark = pytest.mark.django_db
S = MigrationStatus
SYSTEM = Actor.system("test:protocol_transitions")
ADMIN = "/admin/migrations_app"

Step = Callable[[Protocol], Any]


@pytest.fixture
def chain(org):
    return make_indexed_chain(org, blocks=6)


@pytest.fixture
def protocol(chain) -> Protocol:
    return Protocol.objects.select_related("chain__org").get(
        pk=Protocol.objects.create(protocol_id="SEP41", chain=chain, name="SEP-41").pk
    )


def _start(strategy: Strategy) -> Step:
    def step(p: Protocol) -> Any:
        return history.start_trackers(
            strategy=strategy, protocols=[p], cursor_at=0, actor=SYSTEM, updates={}, metadata={}
        )

    return step


def _migration_steps(strategy: Strategy) -> dict[tuple[str, str], Step]:
    kind = strategy.kind
    start = _start(strategy)
    return {
        (S.NOT_STARTED, S.IN_PROGRESS): start,
        (S.FAILED, S.IN_PROGRESS): start,
        (S.IN_PROGRESS, S.IN_PROGRESS): start,  # a run killed mid-way, resumed
        (S.IN_PROGRESS, S.SUCCESS): lambda p: status.migration_complete(protocol=p, kind=kind, actor=SYSTEM),
        (S.IN_PROGRESS, S.FAILED): lambda p: status.migration_fail(
            protocol=p, kind=kind, actor=SYSTEM, error="boom"
        ),
    }


def _classify_start(p: Protocol) -> Any:
    return status.classification_start(protocol=p, actor=SYSTEM)


STEPS: dict[str, dict[tuple[str, str], Step]] = {
    CLASSIFICATION_MACHINE.name: {
        (S.NOT_STARTED, S.IN_PROGRESS): _classify_start,
        (S.SUCCESS, S.IN_PROGRESS): _classify_start,
        (S.FAILED, S.IN_PROGRESS): _classify_start,
        (S.IN_PROGRESS, S.IN_PROGRESS): _classify_start,  # taken over once stale
        (S.IN_PROGRESS, S.SUCCESS): lambda p: status.classification_succeed(
            protocol=p, actor=SYSTEM, accepted=0, rejected=[]
        ),
        (S.IN_PROGRESS, S.FAILED): lambda p: status.classification_fail(
            protocol=p, actor=SYSTEM, error="boom"
        ),
    },
    HISTORY_MACHINE.name: _migration_steps(HISTORY),
    CURRENT_STATE_MACHINE.name: _migration_steps(CURRENT_STATE),
}
ACTIONS: dict[str, dict[str, str]] = {
    CLASSIFICATION_MACHINE.name: {
        S.IN_PROGRESS: "protocol.classification_started",
        S.SUCCESS: "protocol.classified",
        S.FAILED: "protocol.classification_failed",
    },
    **{
        strategy.kind.machine.name: {
            S.IN_PROGRESS: f"protocol.{strategy.migration}_started",
            S.SUCCESS: f"protocol.{strategy.migration}_completed",
            S.FAILED: f"protocol.{strategy.migration}_failed",
        }
        for strategy in (HISTORY, CURRENT_STATE)
    },
}
MACHINES = [CLASSIFICATION_MACHINE, HISTORY_MACHINE, CURRENT_STATE_MACHINE]
PAIRS = [pytest.param(m, *p.values, id=f"{m.name}:{p.id}") for m in MACHINES for p in pair_params(m)]


def test_the_machines_are_declared_once_and_registered():
    names = {m.name for m in machines()}
    assert {m.name for m in MACHINES} <= names


@pytest.mark.parametrize("machine", MACHINES, ids=lambda m: m.name)
def test_every_edge_has_a_named_step(machine: Machine):
    assert set(STEPS[machine.name]) == edge_keys(machine)


@pytest.mark.parametrize("machine", MACHINES, ids=lambda m: m.name)
def test_starting_is_an_admins_edge_and_every_outcome_an_engine_edge(machine: Machine):
    for edge in machine.edges:
        expected = Role.ADMIN if edge.target == S.IN_PROGRESS else None
        assert edge.role == expected, edge
    assert machine.terminal == (frozenset() if machine is CLASSIFICATION_MACHINE else {S.SUCCESS})


@pytest.mark.parametrize(("machine", "source", "target"), PAIRS)
def test_each_pair_is_taken_by_its_step_or_refused_without_a_write(
    machine: Machine, source: str, target: str, protocol: Protocol
):
    # Untouched for longer than the stale threshold, so a classification in_progress may be taken over.
    stale = clock.now() - status.CLASSIFICATION_STALE_AFTER - timedelta(minutes=1)
    set_state(protocol, machine, source, updated_at=stale)
    if not machine.can(source, target):
        assert_refused_without_write(
            protocol, machine=machine, to=target, actor=SYSTEM, org=protocol.chain.org
        )
        return
    before = AuditEvent.objects.count()
    STEPS[machine.name][(source, target)](protocol)
    assert Protocol.objects.values_list(machine.field, flat=True).get(pk=protocol.pk) == target
    row = AuditEvent.objects.filter(target_id=protocol.pk).latest("id")
    assert AuditEvent.objects.count() == before + 1
    assert row.action == ACTIONS[machine.name][target]
    assert row.actor_label == SYSTEM.label and row.org_id == protocol.chain.org_id
    if source != target:
        assert row.changes[machine.field] == [source, target]
    assert Protocol.objects.get(pk=protocol.pk).updated_at > stale


def test_a_fresh_in_progress_classification_is_not_taken_over(protocol):
    set_state(protocol, CLASSIFICATION_MACHINE, S.IN_PROGRESS, updated_at=clock.now())
    with pytest.raises(RaceLost):
        status.classification_start(protocol=protocol, actor=SYSTEM)
    assert Protocol.objects.get(pk=protocol.pk).classification_status == S.IN_PROGRESS
    assert not AuditEvent.objects.filter(target_id=protocol.pk).exists()


def test_a_start_lost_after_the_cursor_was_created_rolls_the_cursor_back(protocol):
    # Read as failed; completed by another process before our start: nothing of ours stays.
    set_state(protocol, HISTORY_MACHINE, S.FAILED)
    Protocol.objects.filter(pk=protocol.pk).update(history_migration_status=S.SUCCESS)
    with pytest.raises(RaceLost):
        _start(HISTORY)(protocol)
    assert not Cursor.objects.filter(name=protocol.history_cursor_name).exists()
    assert not AuditEvent.objects.filter(target_id=protocol.pk).exists()


# --- refusals write one access.denied row ---------------------------------------------------------------


def denials(what: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action="access.denied", metadata__what=what))


@pytest.fixture
def classified(protocol) -> Protocol:
    set_state(protocol, CLASSIFICATION_MACHINE, S.SUCCESS)
    return protocol


@pytest.mark.parametrize(
    ("request_service", "machine", "kwargs"),
    [
        (services.protocol_classify_request, CLASSIFICATION_MACHINE, {}),
        (services.protocol_history_request, HISTORY_MACHINE, {"window_size": 10}),
        (services.protocol_current_state_request, CURRENT_STATE_MACHINE, {"start_height": 1}),
    ],
    ids=["classify", "history", "current_state"],
)
def test_an_operators_request_is_refused_with_a_denial_row_and_nothing_queued(
    classified, operator, sent_tasks, django_capture_on_commit_callbacks, request_service, machine, kwargs
):
    actor = Actor.for_user(operator.user)
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(Forbidden, match="admin role"):
        request_service(protocol=classified, actor=actor, reason="please", **kwargs)
    [denied] = denials(f"{machine.name}: start")
    assert denied.actor_label == operator.user.username and denied.target_id == str(classified.pk)
    assert denied.metadata["required_role"] == Role.ADMIN and denied.metadata["role"] == Role.OPERATOR
    assert denied.metadata["asked"]["reason"] == "please"
    assert sent_tasks == [] and sent_tasks.messages() == []
    assert not AuditEvent.objects.filter(action__endswith="_requested").exists()


def test_a_viewers_classification_is_refused_by_the_kernel_with_a_denial_row(classified, viewer):
    with pytest.raises(Forbidden):
        services.protocol_classify(protocol=classified, actor=Actor.for_user(viewer.user))
    [denied] = denials(f"{CLASSIFICATION_MACHINE.name}: {S.SUCCESS} -> {S.IN_PROGRESS}")
    assert denied.target_id == str(classified.pk) and denied.metadata["required_role"] == Role.ADMIN
    assert Protocol.objects.get(pk=classified.pk).classification_status == S.SUCCESS


@pytest.mark.parametrize("strategy", [HISTORY, CURRENT_STATE], ids=lambda s: s.migration)
def test_a_run_by_someone_no_longer_admin_is_refused_before_anything_is_written(
    classified, operator, strategy
):
    # E.g. a task queued by an admin who has been demoted since: the run checks its start edge again.
    actor = Actor.for_user(operator.user)
    with pytest.raises(Forbidden):
        if strategy is HISTORY:
            history.history_migrate(protocol_ids=[classified.protocol_id], actor=actor)
        else:
            current_state_migrate(protocol_id=classified.protocol_id, start_height=1, actor=actor)
    assert len(denials(f"{strategy.kind.machine.name}: {S.NOT_STARTED} -> {S.IN_PROGRESS}")) == 1
    assert (
        Protocol.objects.values_list(strategy.status_field, flat=True).get(pk=classified.pk) == S.NOT_STARTED
    )
    assert not Cursor.objects.exists()


def test_registering_a_protocol_needs_the_admin_role_and_a_refusal_is_audited(chain, operator):
    with pytest.raises(Forbidden):
        services.protocol_register(protocol_id="SEP41", chain=chain, actor=Actor.for_user(operator.user))
    [denied] = denials("protocols.register")
    assert denied.metadata["asked"] == {"protocol_id": "SEP41", "chain": chain.slug}
    assert not Protocol.objects.exists()


def test_an_admin_cannot_take_an_engine_edge_by_hand(classified, admin_member):
    # in_progress -> success is the run's step: a person asking for it directly is refused (audited).
    set_state(classified, HISTORY_MACHINE, S.IN_PROGRESS)
    with pytest.raises(Forbidden):
        authorize(
            machine=HISTORY_MACHINE,
            source=S.IN_PROGRESS,
            to=S.SUCCESS,
            actor=Actor.for_user(admin_member.user),
            org=classified.chain.org,
            target=classified,
        )
    assert len(denials(f"{HISTORY_MACHINE.name}: {S.IN_PROGRESS} -> {S.SUCCESS}")) == 1


# --- the actor survives the trip to the worker ----------------------------------------------------------


def test_a_superusers_classify_again_from_the_admin_runs_on_the_worker(
    client, classified, superuser, sent_tasks, django_capture_on_commit_callbacks
):
    # A superuser has no membership: only `is_superuser` makes them an admin of the organization.
    client.force_login(superuser)
    url = f"{ADMIN}/protocol/{classified.pk}/action/classify/"
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(url, {"reason": "new contracts"}, follow=True)
    assert "Classification queued" in response.content.decode()
    [kwargs] = sent_tasks.of(services.CLASSIFY_TASK)
    [message] = sent_tasks.messages(services.CLASSIFY_TASK)
    assert message.kwargs == kwargs and message.status == OutboxStatus.SENT
    assert kwargs["actor"]["is_superuser"] is True and kwargs["actor"]["interactive"] is True
    tasks.classify(**kwargs)  # the worker's side
    assert Protocol.objects.get(pk=classified.pk).classification_status == S.SUCCESS
    done = AuditEvent.objects.get(action="protocol.classified", target_id=classified.pk)
    assert done.actor_label == superuser.username
    assert not AuditEvent.objects.filter(action="access.denied").exists()
    assert Actor.from_payload(kwargs["actor"]) == Actor.for_user(superuser)


def test_the_protocol_page_draws_the_three_machines_from_their_declarations(client, classified, admin_member):
    client.force_login(admin_member.user)
    page = client.get(f"{ADMIN}/protocol/{classified.pk}/change/").content.decode()
    for machine in MACHINES:
        assert f"<figcaption>{machine.name}</figcaption>" in page
