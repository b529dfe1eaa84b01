"""Operator services: role gates re-checked inside, compare-and-set, one audit row each."""

from __future__ import annotations

import re
from typing import Any

import pytest

from fleetops.access.models import Role
from fleetops.access.services import api_token_create
from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib.errors import Conflict, Forbidden, RaceLost, ValidationFailed
from fleetops.lib.reason import REASON_MAX_LENGTH, REASON_REQUIRED, REASON_TOO_LONG
from indexer import services
from indexer.models import Enrichment, EnrichmentStatus, IndexerState, Mode, SyncSource
from tests.factories import make_indexed_chain

pytestmark = pytest.mark.django_db


@pytest.fixture
def chain(org):
    return make_indexed_chain(org, blocks=20)


def _actor(member):
    return Actor.for_user(member.user)


def _state(chain):
    return IndexerState.objects.get(chain=chain)


def _enrichments(chain, statuses):
    return Enrichment.objects.bulk_create(
        [
            Enrichment(
                chain=chain,
                height=1 + i,
                phase="tx",
                tx_index=0,
                event_index=0,
                payload="AAAA",
                status=status,
                attempts=5,
                last_error="decoder said no",
            )
            for i, status in enumerate(statuses)
        ]
    )


def test_pause_then_resume_flip_the_flag_and_audit_each_change(chain, admin_member):
    assert services.indexer_pause(chain=chain, actor=_actor(admin_member), reason="upgrade node") is True
    assert _state(chain).paused is True
    assert services.indexer_pause(chain=chain, actor=_actor(admin_member), reason="again") is False
    assert services.indexer_resume(chain=chain, actor=_actor(admin_member), reason="node back") is True
    assert _state(chain).paused is False
    audit = list(AuditEvent.objects.filter(action__startswith="indexer.").order_by("id"))
    assert [(a.action, a.reason, a.changes) for a in audit] == [
        ("indexer.paused", "upgrade node", {"paused": [False, True]}),
        ("indexer.resumed", "node back", {"paused": [True, False]}),
    ]
    assert audit[0].org_id == chain.org_id
    assert audit[0].target_id == str(chain.pk)
    assert audit[0].actor_id == str(admin_member.user.pk)


def test_resume_takes_a_halted_chain_back_to_catching_up_and_audits_it(chain, admin_member):
    IndexerState.objects.filter(chain=chain).update(mode=Mode.HALTED, last_error="reorg deeper than finality")
    assert (
        services.indexer_resume(chain=chain, actor=_actor(admin_member), reason="rolled back by hand") is True
    )
    assert (_state(chain).mode, _state(chain).last_error) == (Mode.CATCHING_UP, "")
    audit = AuditEvent.objects.get(action="indexer.resumed")
    assert audit.changes == {"mode": [Mode.HALTED, Mode.CATCHING_UP]}
    assert services.indexer_resume(chain=chain, actor=_actor(admin_member), reason="again") is False


@pytest.mark.parametrize(
    "call",
    [
        lambda c, a: services.indexer_pause(chain=c, actor=a, reason="r"),
        lambda c, a: services.indexer_resume(chain=c, actor=a, reason="r"),
        lambda c, a: services.indexer_retry_poison(chain=c, actor=a, reason="r"),
        lambda c, a: services.indexer_request_rollback(chain=c, to_height=10, actor=a, reason="r"),
    ],
    ids=["pause", "resume", "retry_poison", "rollback"],
)
def test_admin_actions_refuse_operators_and_outsiders_inside_the_service(
    call, chain, operator, outsider, viewer
):
    IndexerState.objects.filter(chain=chain).update(paused=True, poison_height=21, poison_attempts=3)
    for member in (viewer, operator, outsider):
        with pytest.raises(Forbidden, match=services.ADMIN_REQUIRED):
            call(chain, _actor(member))
    state = _state(chain)
    assert (state.paused, state.poison_attempts, state.rollback_requested_to) == (True, 3, None)
    assert not AuditEvent.objects.filter(action__startswith="indexer.").exists()
    # Each refusal inside the service wrote its access.denied row (the same row the API writes).
    denied = list(AuditEvent.objects.filter(action="access.denied").order_by("id"))
    assert [d.actor_id for d in denied] == [str(m.user.pk) for m in (viewer, operator, outsider)]
    assert {(d.org_id, d.metadata["surface"], d.metadata["required_role"]) for d in denied} == {
        (chain.org_id, "service", "admin")
    }
    assert len({d.metadata["what"] for d in denied}) == 1 and denied[0].metadata["what"].endswith("on sim")


def test_a_token_acts_with_the_lower_of_its_role_and_the_membership(chain, admin_member):
    issued = api_token_create(
        user=admin_member.user,
        org=admin_member.org,
        token_role=Role.OPERATOR,
        name="ci",
        actor=_actor(admin_member),
    )
    token_actor = Actor.for_token(issued.token)
    with pytest.raises(Forbidden):
        services.indexer_pause(chain=chain, actor=token_actor, reason="scripted")
    assert services.enrichment_requeue(chain=chain, ids=None, actor=token_actor, reason="scripted") == 0


def test_system_actors_are_trusted_and_anonymous_ones_are_not(chain):
    assert services.indexer_pause(chain=chain, actor=Actor.system("cli"), reason="maintenance")
    with pytest.raises(Forbidden):
        services.indexer_resume(chain=chain, actor=Actor.anonymous(), reason="sneaky")


@pytest.mark.parametrize(
    ("reason", "message"),
    [("", REASON_REQUIRED), ("   ", REASON_REQUIRED), ("x" * (REASON_MAX_LENGTH + 1), REASON_TOO_LONG)],
    ids=["empty", "blank", "too-long"],
)
def test_every_service_needs_a_reason(chain, admin_member, reason, message):
    for call in (
        lambda: services.indexer_pause(chain=chain, actor=_actor(admin_member), reason=reason),
        lambda: services.indexer_resume(chain=chain, actor=_actor(admin_member), reason=reason),
        lambda: services.indexer_retry_poison(chain=chain, actor=_actor(admin_member), reason=reason),
        lambda: services.indexer_request_rollback(
            chain=chain, to_height=5, actor=_actor(admin_member), reason=reason
        ),
        lambda: services.enrichment_requeue(chain=chain, ids=None, actor=_actor(admin_member), reason=reason),
    ):
        with pytest.raises(ValidationFailed, match=re.escape(message)) as error:
            call()
        assert error.value.fields == {"reason": [message]}
    assert _state(chain).paused is False
    assert not AuditEvent.objects.exists()


def test_retry_poison_clears_the_attempts_and_leaves_degraded(chain, admin_member):
    IndexerState.objects.filter(chain=chain).update(
        poison_height=21, poison_attempts=3, mode=Mode.DEGRADED, last_error="height 21: boom"
    )
    assert services.indexer_retry_poison(chain=chain, actor=_actor(admin_member), reason="fixed parser")
    state = _state(chain)
    assert (state.poison_height, state.poison_attempts, state.mode) == (21, 0, Mode.CATCHING_UP)
    audit = AuditEvent.objects.get(action="indexer.poison_retried")
    assert audit.changes == {"poison_attempts": [3, 0], "mode": ["degraded", "catching_up"]}
    assert audit.metadata["poison_height"] == 21


def test_retry_poison_without_a_poison_height_is_a_conflict(chain, admin_member):
    with pytest.raises(Conflict, match="no poison height"):
        services.indexer_retry_poison(chain=chain, actor=_actor(admin_member), reason="just in case")


def test_a_rollback_request_is_recorded_for_the_writer_and_audited(chain, admin_member):
    assert services.indexer_request_rollback(
        chain=chain, to_height=15, actor=_actor(admin_member), reason="bad blocks from node b"
    )
    state = _state(chain)
    assert state.rollback_requested_to == 15
    assert state.rollback_requested_reason == "bad blocks from node b"
    assert state.rollback_requested_by == admin_member.user.username
    assert state.last_indexed_height == 20  # nothing deleted here: the writer does it under its lease
    audit = AuditEvent.objects.get(action="indexer.rollback_requested")
    assert audit.changes == {"rollback_requested_to": [None, 15]}
    assert audit.metadata["depth"] == 5
    # The same request again changes nothing; a different one while pending is refused.
    assert not services.indexer_request_rollback(
        chain=chain, to_height=15, actor=_actor(admin_member), reason="retry"
    )
    with pytest.raises(Conflict, match="already requested"):
        services.indexer_request_rollback(chain=chain, to_height=3, actor=_actor(admin_member), reason="x")
    assert AuditEvent.objects.filter(action="indexer.rollback_requested").count() == 1


@pytest.mark.parametrize("to_height", [20, 21, -1, 10**12])
def test_a_rollback_height_outside_the_indexed_range_is_refused(chain, admin_member, to_height):
    with pytest.raises(ValidationFailed) as error:
        services.indexer_request_rollback(
            chain=chain, to_height=to_height, actor=_actor(admin_member), reason="r"
        )
    assert error.value.message == services.ROLLBACK_RANGE.format(low=0, high=19)
    assert _state(chain).rollback_requested_to is None


def test_a_rollback_may_go_down_to_just_below_the_oldest_indexed_height(org, admin_member):
    chain = make_indexed_chain(org, slug="late", blocks=10)
    IndexerState.objects.filter(chain=chain).update(oldest_indexed_height=5)
    with pytest.raises(ValidationFailed):
        services.indexer_request_rollback(chain=chain, to_height=3, actor=_actor(admin_member), reason="r")
    assert services.indexer_request_rollback(chain=chain, to_height=4, actor=_actor(admin_member), reason="r")


def test_a_rollback_of_an_empty_chain_and_a_non_integer_height_are_refused(org, admin_member):
    empty = make_indexed_chain(org, slug="empty")
    with pytest.raises(Conflict, match="nothing is indexed"):
        services.indexer_request_rollback(chain=empty, to_height=0, actor=_actor(admin_member), reason="r")
    with pytest.raises(ValidationFailed, match=services.ROLLBACK_HEIGHT_TYPE):
        services.indexer_request_rollback(chain=empty, to_height=True, actor=_actor(admin_member), reason="r")


def test_a_rollback_request_loses_the_race_when_the_writer_moved_the_height(chain, admin_member, monkeypatch):
    real = services.rollback_validate

    def validate_then_writer_commits(**kwargs):
        height = real(**kwargs)
        IndexerState.objects.filter(chain=chain).update(last_indexed_height=21)
        return height

    monkeypatch.setattr(services, "rollback_validate", validate_then_writer_commits)
    with pytest.raises(RaceLost):
        services.indexer_request_rollback(chain=chain, to_height=10, actor=_actor(admin_member), reason="r")
    assert not AuditEvent.objects.filter(action="indexer.rollback_requested").exists()


def test_requeue_moves_only_failed_and_undecodable_rows_of_that_chain(chain, org, operator):
    other = make_indexed_chain(org, slug="other")
    rows = _enrichments(chain, ["failed", "undecodable", "ok", "pending", "retrying", "failed"])
    foreign = _enrichments(other, ["failed"])
    assert (
        services.enrichment_requeue(
            chain=chain, ids=[rows[0].pk, rows[2].pk, foreign[0].pk], actor=_actor(operator), reason="fixed"
        )
        == 1
    )
    assert Enrichment.objects.get(pk=rows[0].pk).status == EnrichmentStatus.PENDING
    assert Enrichment.objects.get(pk=rows[2].pk).status == EnrichmentStatus.OK
    assert Enrichment.objects.get(pk=foreign[0].pk).status == EnrichmentStatus.FAILED

    assert services.enrichment_requeue(chain=chain, ids=None, actor=_actor(operator), reason="all") == 2
    requeued = Enrichment.objects.get(pk=rows[1].pk)
    assert (requeued.status, requeued.attempts, requeued.last_error) == ("pending", 0, "")
    assert requeued.next_attempt_at is not None
    audits = list(AuditEvent.objects.filter(action="indexer.enrichment_requeued").order_by("id"))
    assert [a.metadata["requeued"] for a in audits] == [1, 2]
    assert audits[1].changes == {"status": [{"failed": 1, "undecodable": 1}, {"pending": 2}]}
    # Nothing left to re-queue: no change, no audit row.
    assert services.enrichment_requeue(chain=chain, ids=None, actor=_actor(operator), reason="all") == 0
    assert AuditEvent.objects.filter(action="indexer.enrichment_requeued").count() == 2


def test_requeue_needs_an_operator_and_valid_ids(chain, viewer, operator):
    _enrichments(chain, ["failed"])
    with pytest.raises(Forbidden, match=services.OPERATOR_REQUIRED):
        services.enrichment_requeue(chain=chain, ids=None, actor=_actor(viewer), reason="r")
    denied = AuditEvent.objects.get(action="access.denied")
    assert denied.metadata["what"] == "requeue enrichment on sim"
    assert (denied.metadata["required_role"], denied.metadata["role"]) == ("operator", "viewer")
    bad: list[Any] = [[], [0], ["1"], [True], list(range(1, services.REQUEUE_IDS_CAP + 2))]
    for ids in bad:
        with pytest.raises(ValidationFailed, match="ids must be"):
            services.enrichment_requeue(chain=chain, ids=ids, actor=_actor(operator), reason="r")
    assert Enrichment.objects.get().status == "failed"


# --- live settings ----------------------------------------------------------------------------------


def test_an_operator_tunes_the_chains_limits_with_one_audit_row(chain, operator):
    changes = services.chain_update_settings(
        chain=chain, actor=_actor(operator), reason="rpc latency spike", max_in_flight=2, decode_concurrency=1
    )
    assert changes == {"max_in_flight": [8, 2], "decode_concurrency": [4, 1]}
    chain.refresh_from_db()
    assert (chain.max_in_flight, chain.decode_concurrency, chain.catchup_batch_size) == (2, 1, 50)
    audit = AuditEvent.objects.get(action="indexer.settings_changed")
    assert audit.reason == "rpc latency spike" and audit.changes == changes
    # The same values again: nothing to write, no second audit row.
    assert (
        services.chain_update_settings(chain=chain, actor=_actor(operator), reason="again", max_in_flight=2)
        == {}
    )
    assert AuditEvent.objects.filter(action="indexer.settings_changed").count() == 1


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"max_in_flight": 0},
        {"catchup_batch_size": 5001},
        {"decode_concurrency": True},
        {"max_in_flight": "4"},
    ],
)
def test_limits_out_of_bounds_are_refused_and_change_nothing(chain, operator, fields):
    with pytest.raises(ValidationFailed):
        services.chain_update_settings(chain=chain, actor=_actor(operator), reason="tune", **fields)
    chain.refresh_from_db()
    assert (chain.max_in_flight, chain.catchup_batch_size, chain.decode_concurrency) == (8, 50, 4)
    assert not AuditEvent.objects.filter(action="indexer.settings_changed").exists()


def _source(chain):
    return SyncSource.objects.create(chain=chain, name="primary", rpc_url="http://127.0.0.1:1", priority=3)


def test_a_viewer_may_not_tune_limits_nor_sources_and_the_refusal_is_audited(chain, viewer):
    source = _source(chain)
    with pytest.raises(Forbidden):
        services.chain_update_settings(chain=chain, actor=_actor(viewer), reason="tune", max_in_flight=1)
    with pytest.raises(Forbidden):
        services.source_update_settings(source=source, actor=_actor(viewer), reason="off", enabled=False)
    assert AuditEvent.objects.filter(action="access.denied").count() == 2
    chain.refresh_from_db()
    source.refresh_from_db()
    assert chain.max_in_flight == 8 and source.enabled is True


def test_an_operator_reprioritizes_and_disables_a_source_with_one_audit_row(chain, operator):
    source = _source(chain)
    changes = services.source_update_settings(
        source=source, actor=_actor(operator), reason="node maintenance", priority=7, enabled=False
    )
    assert changes == {"priority": [3, 7], "enabled": [True, False]}
    source.refresh_from_db()
    assert (source.priority, source.enabled) == (7, False)
    audit = AuditEvent.objects.get(action="indexer.source.settings_changed")
    assert audit.reason == "node maintenance" and audit.metadata["source"] == source.name
    with pytest.raises(ValidationFailed):
        services.source_update_settings(source=source, actor=_actor(operator), reason="x", priority=-1)
