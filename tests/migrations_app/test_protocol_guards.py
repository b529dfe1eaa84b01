"""Guards of the protocols app: the classification compare-and-set refuses a second run, the
current-state request is validated before anything is audited or queued, every status
compare-and-set is checked, the contract cache follows the commit, the admin's protocol filter and
"Classify again" (queued on a worker), and the chain-changed message names no other tenant's chain."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.lib.errors import Conflict, RaceLost, ValidationFailed
from fleetops.observability.metrics import RACE_LOST
from fleetops.outbox.models import OutboxStatus
from migrations_app.models import CLASSIFICATION_MACHINE, Cursor, MigrationStatus, Protocol, ProtocolContract
from migrations_app.protocols import current_state, history, registry, services, status, store, tasks
from migrations_app.protocols.history import HISTORY, MigrationRun, Tracker
from migrations_app.protocols.store import Row
from tests.factories import make_indexed_chain
from tests.migrations_app.protocol_fixtures import assert_queued_with_its_request

pytestmark = pytest.mark.django_db
ADMIN = "/admin/migrations_app"


def race_lost(operation: str) -> float:
    return RACE_LOST.labels(operation=operation)._value.get()


# The kernel counts a lost compare-and-set under "<machine>><target state>".
CLASSIFICATION_START = f"{CLASSIFICATION_MACHINE.name}>{MigrationStatus.IN_PROGRESS.value}"
HISTORY_COMPLETE = f"{HISTORY.kind.machine.name}>{MigrationStatus.SUCCESS.value}"


@pytest.fixture
def chain(org):
    return make_indexed_chain(org, blocks=40)


@pytest.fixture
def protocol(chain) -> Protocol:
    return Protocol.objects.create(
        protocol_id="SEP41", chain=chain, name="SEP-41", classification_status=MigrationStatus.SUCCESS
    )


@pytest.fixture
def foreign(other_org) -> Protocol:
    chain = make_indexed_chain(other_org, slug="globex-chain", blocks=2)
    return Protocol.objects.create(protocol_id="SEP50", chain=chain, name="SEP-50")


@pytest.fixture
def actor(admin_member) -> Actor:
    return Actor.for_user(admin_member.user)


@pytest.fixture(autouse=True)
def _fresh_contract_cache() -> Any:
    store.forget_known_contracts()
    yield
    store.forget_known_contracts()


# 1. classification --------------------------------------------------------------------------------------


def test_a_second_classification_while_one_runs_is_a_conflict(protocol, actor):
    Protocol.objects.filter(pk=protocol.pk).update(
        classification_status=MigrationStatus.IN_PROGRESS, updated_at=clock.now()
    )
    protocol.refresh_from_db()
    before = race_lost(CLASSIFICATION_START)
    with pytest.raises(Conflict, match="is being classified by another process"):
        services.protocol_classify(protocol=protocol, actor=actor)
    assert race_lost(CLASSIFICATION_START) == before + 1
    assert Protocol.objects.get(pk=protocol.pk).classification_status == MigrationStatus.IN_PROGRESS
    assert not AuditEvent.objects.filter(action="protocol.classified").exists()


def test_a_classification_stuck_in_progress_past_the_stale_threshold_is_taken_over(protocol, actor):
    old = clock.now() - status.CLASSIFICATION_STALE_AFTER - timedelta(seconds=1)
    Protocol.objects.filter(pk=protocol.pk).update(
        classification_status=MigrationStatus.IN_PROGRESS, updated_at=old
    )
    protocol.refresh_from_db()
    result = services.protocol_classify(protocol=protocol, actor=actor)
    assert result.status == MigrationStatus.SUCCESS
    assert Protocol.objects.get(pk=protocol.pk).classification_status == MigrationStatus.SUCCESS


# 2. current-state request validated at request time --------------------------------------------------------


@pytest.fixture
def queued_current_state(sent_tasks) -> Any:
    return sent_tasks


def test_a_current_state_request_outside_the_indexed_range_is_refused_and_changes_nothing(
    protocol, actor, queued_current_state, django_capture_on_commit_callbacks
):
    refused = pytest.raises(ValidationFailed, match="start height must be between")
    with django_capture_on_commit_callbacks(execute=True), refused as error:
        services.protocol_current_state_request(protocol=protocol, actor=actor, reason="go", start_height=999)
    assert error.value.fields == {"start_height": [999]}
    assert queued_current_state == [] and queued_current_state.messages() == []
    assert not AuditEvent.objects.filter(action="protocol.current_state_requested").exists()
    with django_capture_on_commit_callbacks(execute=True):
        assert services.protocol_current_state_request(
            protocol=protocol, actor=actor, reason="go", start_height=5
        )
    assert [c["start_height"] for c in queued_current_state.of(services.CURRENT_STATE_TASK)] == [5]
    assert [m.kwargs["start_height"] for m in queued_current_state.messages(services.CURRENT_STATE_TASK)] == [
        5
    ]


def test_the_admin_shows_the_current_state_refusal_on_the_form(
    client, protocol, admin_member, queued_current_state
):
    client.force_login(admin_member.user)
    url = f"{ADMIN}/protocol/{protocol.pk}/action/start_current_state/"
    response = client.post(url, {"reason": "go", "window_size": 100, "start_height": 999})
    assert response.status_code == 200 and "start height must be between" in response.content.decode()
    assert queued_current_state == [] and queued_current_state.messages() == []


# 3. every status compare-and-set is checked ----------------------------------------------------------------


def test_a_lost_completion_cas_is_counted_and_not_reported_as_done(protocol, actor):
    Cursor.objects.create(name=protocol.history_cursor_name, height=40, updated_at=clock.now())
    Protocol.objects.filter(pk=protocol.pk).update(history_migration_status=MigrationStatus.FAILED)
    spec = registry.get("SEP41")
    assert spec is not None
    t = Tracker(protocol=protocol, spec=spec, cursor=30, start_cursor=0, handed_off=True, last_attempted=35)
    run = MigrationRun(strategy=HISTORY, chain=protocol.chain, trackers=[t], window_size=10, actor=actor)
    before = race_lost(HISTORY_COMPLETE)
    run._complete(t)
    assert not t.done and t.lost
    assert race_lost(HISTORY_COMPLETE) == before + 1
    assert not AuditEvent.objects.filter(action="protocol.history_completed").exists()
    result = history.RunResult(migration="history")
    history._summarize(result, [t])
    assert result.failed == ["SEP41"] and result.handed_off == []
    run.run()  # nothing left to do for a lost tracker: returns instead of retrying forever


def test_a_lost_start_cas_raises_and_rolls_the_cursor_back(protocol, actor):
    Protocol.objects.filter(pk=protocol.pk).update(history_migration_status=MigrationStatus.SUCCESS)
    with pytest.raises(RaceLost):
        history._start(chain=protocol.chain, protocols=[protocol], actor=actor)
    assert not Cursor.objects.filter(name=protocol.history_cursor_name).exists()


def test_a_lost_current_state_start_raises_and_rolls_the_cursor_back(protocol, actor, monkeypatch):
    real = current_state.current_state_validate

    def validated_then_completed_elsewhere(**kwargs: Any) -> Any:
        validated = real(**kwargs)
        # Another process completes the migration between the validation and the start.
        Protocol.objects.filter(pk=protocol.pk).update(current_state_migration_status=MigrationStatus.SUCCESS)
        return validated

    monkeypatch.setattr(current_state, "current_state_validate", validated_then_completed_elsewhere)
    with pytest.raises(RaceLost):
        current_state.current_state_migrate(protocol_id="SEP41", start_height=5, actor=actor)
    assert not Cursor.objects.filter(name=protocol.current_state_cursor_name).exists()


# 4. the contract cache follows the commit ------------------------------------------------------------------


def test_a_rolled_back_transaction_leaves_the_contract_unknown(protocol, django_capture_on_commit_callbacks):
    rows = [Row(3, "tx", 0, 0, "mint", "alice", "", "tok9", 5, "")]
    with pytest.raises(RuntimeError), transaction.atomic():
        store.note_contracts(protocol_pk=protocol.pk, rows=rows)
        raise RuntimeError("rolled back")
    assert (protocol.pk, "tok9") not in store._known_contracts
    with django_capture_on_commit_callbacks(execute=True):
        store.note_contracts(protocol_pk=protocol.pk, rows=rows)
    assert (protocol.pk, "tok9") in store._known_contracts
    assert ProtocolContract.objects.filter(protocol=protocol, contract="tok9").exists()


# 5. admin ---------------------------------------------------------------------------------------------------


def test_the_protocol_filter_offers_only_the_users_protocols(client, protocol, foreign, admin_member):
    client.force_login(admin_member.user)
    for page in ("protocolstatechange", "protocolbalance", "protocolnftowner"):
        response = client.get(f"{ADMIN}/{page}/")
        assert response.status_code == 200
        body = response.content.decode()
        assert f"protocol__id__exact={protocol.pk}" in body
        assert f"protocol__id__exact={foreign.pk}" not in body


def test_classify_again_is_queued_on_a_worker(
    client, protocol, admin_member, monkeypatch, sent_tasks, django_capture_on_commit_callbacks
):
    ran: list[Any] = []
    monkeypatch.setattr(services, "protocol_classify", lambda **kwargs: ran.append(kwargs))
    client.force_login(admin_member.user)
    url = f"{ADMIN}/protocol/{protocol.pk}/action/classify/"
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(url, {"reason": "new contracts"}, follow=True)
    assert "Classification queued" in response.content.decode()
    assert ran == []  # not in the web request
    calls = sent_tasks.of(services.CLASSIFY_TASK)
    assert [c["protocol_id"] for c in calls] == ["SEP41"]
    assert AuditEvent.objects.get(action="protocol.classification_requested").reason == "new contracts"
    # Queued as an outbox message by the request itself, and sent once it committed.
    [message] = sent_tasks.messages(services.CLASSIFY_TASK)
    assert_queued_with_its_request(message, "protocol.classification_requested")
    assert message.status == OutboxStatus.SENT and message.kwargs == calls[0]
    monkeypatch.undo()
    tasks.classify(**calls[0])  # the worker's side
    assert Protocol.objects.get(protocol_id="SEP41").classification_status == MigrationStatus.SUCCESS
    assert (
        AuditEvent.objects.filter(action="protocol.classified", target_label__startswith="SEP41 on ").count()
        == 1
    )


def test_classify_again_while_one_runs_is_refused_on_the_form(client, protocol, admin_member, sent_tasks):
    Protocol.objects.filter(pk=protocol.pk).update(
        classification_status=MigrationStatus.IN_PROGRESS, updated_at=clock.now()
    )
    client.force_login(admin_member.user)
    response = client.post(f"{ADMIN}/protocol/{protocol.pk}/action/classify/", {"reason": "again"})
    assert response.status_code == 200 and "is being classified" in response.content.decode()
    assert sent_tasks == [] and sent_tasks.messages() == []


# 6. one protocol per chain: another tenant's protocol of the same id is a separate row ---------------------


def test_registering_a_protocol_held_on_another_chain_registers_it_on_this_chain_too(chain, foreign, actor):
    mine = services.protocol_register(protocol_id="SEP50", chain=chain, actor=actor)
    assert mine.pk != foreign.pk and mine.chain_id == chain.pk
    assert Protocol.objects.filter(protocol_id="SEP50").count() == 2
    assert services.protocol_register(protocol_id="SEP50", chain=chain, actor=actor).pk == mine.pk
    registered = AuditEvent.objects.get(action="protocol.registered")
    assert registered.target_id == str(mine.pk) and "globex" not in str(registered.metadata)
