"""Transition tests generated from the indexer's three machines (`indexer.models`): every (from, to)
pair of states is either reached through a named service (each edge maps to one below, and the
mapping must name exactly the machine's edges, so a new edge without a service fails here) or refused
by the kernel without a write. Audited edges must leave their audit row; the others none."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.lib.errors import Forbidden
from fleetops.observability.leases import lease_acquire
from indexer import services
from indexer.blocks import WRITER, lease_name
from indexer.enrichment import Verdict, enrichment_claim, enrichment_record
from indexer.models import (
    CONNECTION_MACHINE,
    ENRICHMENT_MACHINE,
    MODE_MACHINE,
    Chain,
    ConnectionStatus,
    DegradedReason,
    Enrichment,
    EnrichmentStatus,
    IndexerState,
    Mode,
    SyncSource,
    mode_edge_audited,
)
from indexer.modes import ModeAction, indexer_degrade, indexer_halt, indexer_mode_follow, mode_move
from indexer.services import IndexerAction
from indexer.source_status import (
    CLEAR_ACTION,
    REENABLE_ACTION,
    source_clear_degraded,
    source_reenable,
    source_transition,
)
from tests.transitions import assert_refused_without_write, edge_keys, pair_params, set_state

pytestmark = pytest.mark.django_db

M, S, E = Mode, ConnectionStatus, EnrichmentStatus


@pytest.fixture
def chain(org) -> Chain:
    chain = Chain.objects.create(org=org, slug="sim", chain_id="sim-1")
    IndexerState.objects.create(chain=chain)
    return chain


def _trail(obj: Any) -> list[AuditEvent]:
    meta = obj._meta
    return list(
        AuditEvent.objects.filter(
            target_type=f"{meta.app_label}.{meta.model_name}", target_id=str(obj.pk)
        ).order_by("id")
    )


# --- IndexerState.mode ------------------------------------------------------------------------------


def _writer_lease(chain: Chain) -> Any:
    grant = lease_acquire(name=lease_name(chain), holder="writer", ttl=timedelta(seconds=60))
    assert grant is not None
    return grant


def _follow(chain: Chain, state: IndexerState, to: str, admin: Actor) -> None:
    indexer_mode_follow(chain=chain, state=state, to=to, lease=_writer_lease(chain), actor=WRITER)


def _degrade(chain: Chain, state: IndexerState, to: str, admin: Actor) -> None:
    indexer_degrade(
        chain=chain, state=state, error="steps keep failing", lease=_writer_lease(chain), actor=WRITER
    )


def _halt(chain: Chain, state: IndexerState, to: str, admin: Actor) -> None:
    indexer_halt(
        chain=chain, state=state, error="identity mismatch", lease=_writer_lease(chain), actor=WRITER
    )


def _retry_poison(chain: Chain, state: IndexerState, to: str, admin: Actor) -> None:
    IndexerState.objects.filter(pk=state.pk).update(poison_height=7, poison_attempts=3)
    assert services.indexer_retry_poison(chain=chain, actor=admin, reason="parser fixed")


def _resume(chain: Chain, state: IndexerState, to: str, admin: Actor) -> None:
    assert services.indexer_resume(chain=chain, actor=admin, reason="cause fixed")


MODE_SERVICES: dict[tuple[str, str], Callable[[Chain, IndexerState, str, Actor], None]] = {
    **{
        (a, b): _follow
        for a in (M.CATCHING_UP, M.NORMAL, M.IDLE)
        for b in (M.CATCHING_UP, M.NORMAL, M.IDLE)
        if a != b
    },
    (M.DEGRADED, M.NORMAL): _follow,
    (M.DEGRADED, M.IDLE): _follow,
    **{(a, M.DEGRADED): _degrade for a in (M.CATCHING_UP, M.NORMAL, M.IDLE)},
    **{(a, M.HALTED): _halt for a in (M.CATCHING_UP, M.NORMAL, M.IDLE, M.DEGRADED)},
    (M.DEGRADED, M.CATCHING_UP): _retry_poison,
    (M.HALTED, M.CATCHING_UP): _resume,
}
MODE_AUDIT_ACTION: dict[Callable[..., None], str] = {
    _follow: ModeAction.RECOVERED,
    _degrade: ModeAction.DEGRADED,
    _halt: ModeAction.HALTED,
    _retry_poison: IndexerAction.POISON_RETRIED,
    _resume: IndexerAction.RESUMED,
}


def test_every_mode_edge_has_a_named_service():
    assert {(str(a), str(b)) for a, b in MODE_SERVICES} == edge_keys(MODE_MACHINE)


@pytest.mark.parametrize(("source", "target"), pair_params(MODE_MACHINE))
def test_mode_pair(chain, admin_member, source, target):
    state = set_state(IndexerState.objects.get(chain=chain), MODE_MACHINE, source)
    assert isinstance(state, IndexerState)
    if not MODE_MACHINE.can(source, target):
        assert_refused_without_write(state, machine=MODE_MACHINE, to=target, actor=WRITER, org=chain.org)
        return
    service = MODE_SERVICES[(source, target)]
    service(chain, state, target, Actor.for_user(admin_member.user))
    assert IndexerState.objects.get(chain=chain).mode == target
    moves = [e for e in _trail(state) if "mode" in e.changes]
    if mode_edge_audited(source, target):
        assert [(e.action, e.changes["mode"]) for e in moves] == [
            (MODE_AUDIT_ACTION[service], [source, target])
        ]
    else:
        assert moves == []  # the quiet modes flap with the chain: never an audit row


def test_a_person_cannot_take_an_engine_mode_edge_and_the_refusal_is_audited(chain, admin_member):
    state = IndexerState.objects.get(chain=chain)
    with pytest.raises(Forbidden):
        mode_move(
            chain=chain,
            state=state,
            to=M.HALTED,
            actor=Actor.for_user(admin_member.user),
            lease=_writer_lease(chain),
            action=ModeAction.HALTED,
        )
    assert IndexerState.objects.get(chain=chain).mode == MODE_MACHINE.initial
    denied = AuditEvent.objects.get(action="access.denied")
    assert denied.metadata["what"] == f"{MODE_MACHINE.name}: {M.CATCHING_UP} -> {M.HALTED}"
    assert denied.actor_id == str(admin_member.user.pk)


@pytest.mark.parametrize("service", [services.indexer_resume, services.indexer_retry_poison])
def test_the_operator_ways_out_need_the_admin_role_and_a_refusal_is_audited(chain, operator, service):
    IndexerState.objects.filter(chain=chain).update(mode=M.HALTED, poison_height=7, poison_attempts=3)
    with pytest.raises(Forbidden, match=services.ADMIN_REQUIRED):
        service(chain=chain, actor=Actor.for_user(operator.user), reason="let me")
    assert IndexerState.objects.get(chain=chain).mode == M.HALTED
    denied = AuditEvent.objects.get(action="access.denied")
    assert denied.metadata["required_role"] == "admin" and denied.metadata["role"] == "operator"
    assert denied.metadata["what"].endswith(f"on {chain.slug}")
    assert not AuditEvent.objects.exclude(action="access.denied").exists()


def test_the_writer_leaves_degraded_on_its_own_when_steps_pass_again_and_says_so(chain):
    state = set_state(IndexerState.objects.get(chain=chain), MODE_MACHINE, M.DEGRADED, last_error="boom")
    assert isinstance(state, IndexerState)
    _follow(chain, state, M.CATCHING_UP, WRITER)
    stored = IndexerState.objects.get(chain=chain)
    assert (stored.mode, stored.last_error) == (M.CATCHING_UP, "")
    recovered = AuditEvent.objects.get(action=ModeAction.RECOVERED)
    assert recovered.changes == {"mode": [M.DEGRADED, M.CATCHING_UP], "last_error": ["boom", ""]}
    assert (recovered.actor_type, recovered.actor_id) == ("scheduler", "indexer_run")


def test_the_writer_notes_columns_beside_the_mode_but_never_the_mode_itself(chain):
    """The writer's plain `.update()` next to the mode (`indexer.modes._note`) refuses the mode
    column: only the kernel moves it. Nothing is written."""
    state = set_state(IndexerState.objects.get(chain=chain), MODE_MACHINE, M.DEGRADED, last_error="boom")
    assert isinstance(state, IndexerState)
    with pytest.raises(ValueError, match="transition kernel"):
        indexer_degrade(
            chain=chain,
            state=state,
            error="still failing",
            lease=_writer_lease(chain),
            actor=WRITER,
            updates={MODE_MACHINE.field: M.NORMAL},
        )
    stored = IndexerState.objects.get(chain=chain)
    assert (stored.mode, stored.last_error) == (M.DEGRADED, "boom")
    assert not AuditEvent.objects.exists()


# --- SyncSource.connection_status -------------------------------------------------------------------


def _source_step(source: SyncSource, to: int, admin: Actor) -> None:
    assert source_transition(source=source, to=to)


def _operator_clear(source: SyncSource, to: int, admin: Actor) -> None:
    SyncSource.objects.filter(pk=source.pk).update(
        degraded_reasons=[DegradedReason.HISTORIC_RANGE_FAILED],
        degraded_detail="blocks 1\u20139 unavailable (x)",
    )
    source.refresh_from_db()
    assert source_clear_degraded(source=source, actor=admin, reason="pruned by design")


def _operator_reenable(source: SyncSource, to: int, admin: Actor) -> None:
    assert source_reenable(source=source, actor=admin, reason="DNS name fixed")


CONNECTION_SERVICES: dict[tuple[int, int], Callable[[SyncSource, int, Actor], None]] = {
    (S.DISCONNECTED, S.CONNECTING): _source_step,
    (S.CONNECTING, S.SYNCING): _source_step,
    (S.CONNECTING, S.CONNECTED): _source_step,
    (S.CONNECTING, S.DISCONNECTED): _source_step,
    (S.CONNECTING, S.DISCONNECTING): _source_step,
    (S.CONNECTING, S.REFUSED): _source_step,
    (S.DISCONNECTED, S.REFUSED): _source_step,
    (S.SYNCING, S.CONNECTED): _source_step,
    (S.SYNCING, S.CONNECTED_DEGRADED): _source_step,
    (S.SYNCING, S.DISCONNECTING): _source_step,
    (S.SYNCING, S.DISCONNECTED): _source_step,
    (S.CONNECTED, S.CONNECTED_DEGRADED): _source_step,
    (S.CONNECTED, S.SYNCING): _source_step,
    (S.CONNECTED, S.DISCONNECTING): _source_step,
    (S.CONNECTED, S.DISCONNECTED): _source_step,
    (S.CONNECTED_DEGRADED, S.CONNECTED): _operator_clear,
    (S.CONNECTED_DEGRADED, S.SYNCING): _source_step,
    (S.CONNECTED_DEGRADED, S.DISCONNECTING): _source_step,
    (S.CONNECTED_DEGRADED, S.DISCONNECTED): _source_step,
    (S.DISCONNECTING, S.DISCONNECTED): _source_step,
    (S.REFUSED, S.DISCONNECTED): _operator_reenable,
}


def test_every_connection_edge_has_a_named_service():
    assert {(int(a), int(b)) for a, b in CONNECTION_SERVICES} == edge_keys(CONNECTION_MACHINE)


@pytest.mark.parametrize(("source", "target"), pair_params(CONNECTION_MACHINE))
def test_connection_pair(chain, admin_member, source, target):
    row = SyncSource.objects.create(chain=chain, name="primary", rpc_url="http://127.0.0.1:1")
    set_state(row, CONNECTION_MACHINE, source)
    if not CONNECTION_MACHINE.can(source, target):
        assert_refused_without_write(row, machine=CONNECTION_MACHINE, to=target, actor=WRITER, org=chain.org)
        return
    service = CONNECTION_SERVICES[(source, target)]
    service(row, target, Actor.for_user(admin_member.user))
    assert SyncSource.objects.get(pk=row.pk).connection_status == target
    trail = _trail(row)
    if service is _operator_clear:
        assert [(e.action, e.changes["connection_status"]) for e in trail] == [
            (CLEAR_ACTION, [source, target])
        ]
    elif service is _operator_reenable:
        assert [(e.action, e.changes["connection_status"]) for e in trail] == [
            (REENABLE_ACTION, [source, target])
        ]
    else:
        assert trail == []  # the writer follows the sources' health after every step: counted, not audited


def test_clearing_a_source_needs_the_operator_role_and_a_refusal_is_audited(chain, viewer):
    row = SyncSource.objects.create(chain=chain, name="primary", rpc_url="http://127.0.0.1:1")
    set_state(
        row, CONNECTION_MACHINE, S.CONNECTED_DEGRADED, degraded_reasons=[DegradedReason.HISTORIC_RANGE_FAILED]
    )
    with pytest.raises(Forbidden):
        source_clear_degraded(source=row, actor=Actor.for_user(viewer.user), reason="looks fine")
    assert SyncSource.objects.get(pk=row.pk).connection_status == S.CONNECTED_DEGRADED
    denied = AuditEvent.objects.get(action="access.denied")
    assert (
        "historic range failure" in denied.metadata["what"] and denied.metadata["required_role"] == "operator"
    )


# --- Enrichment.status ------------------------------------------------------------------------------

VERDICT_OF: dict[str, str] = {
    E.OK: "ok",
    E.RETRYING: "unavailable",
    E.FAILED: "unavailable",
    E.UNDECODABLE: "undecodable",
}


def _verdict(row: Enrichment, to: str, operator: Actor) -> None:
    chain = Chain.objects.get(pk=row.chain_id)
    claim = enrichment_claim(chain=chain)
    assert [r.id for r in claim.rows] == [row.pk]
    outcome = VERDICT_OF[to]
    verdict = Verdict(claim.rows[0], outcome, decoded={"v": 1} if outcome == "ok" else None, error="x")
    # One attempt left when the verdict is `failed`, plenty otherwise.
    max_attempts = row.attempts + 1 if to == E.FAILED else row.attempts + 10
    counts = enrichment_record(chain=chain, claim=claim, verdicts=[verdict], max_attempts=max_attempts)
    assert counts[to] == 1 and counts["race_lost"] == 0


def _requeue(row: Enrichment, to: str, operator: Actor) -> None:
    chain = Chain.objects.get(pk=row.chain_id)
    assert services.enrichment_requeue(chain=chain, ids=[row.pk], actor=operator, reason="decoder fixed") == 1


ENRICHMENT_SERVICES: dict[tuple[str, str], Callable[[Enrichment, str, Actor], None]] = {
    **{(a, b): _verdict for a in (E.PENDING, E.RETRYING) for b in VERDICT_OF},
    (E.FAILED, E.PENDING): _requeue,
    (E.UNDECODABLE, E.PENDING): _requeue,
}


def test_every_enrichment_edge_has_a_named_service():
    assert {(str(a), str(b)) for a, b in ENRICHMENT_SERVICES} == edge_keys(ENRICHMENT_MACHINE)


@pytest.mark.parametrize(("source", "target"), pair_params(ENRICHMENT_MACHINE))
def test_enrichment_pair(chain, operator, source, target):
    row = Enrichment.objects.create(
        chain=chain, height=1, phase="tx", tx_index=0, event_index=0, payload="AA", status=source, attempts=2
    )
    if not ENRICHMENT_MACHINE.can(source, target):
        assert_refused_without_write(row, machine=ENRICHMENT_MACHINE, to=target, actor=WRITER, org=chain.org)
        return
    with clock.frozen(clock.now()):
        service = ENRICHMENT_SERVICES[(source, target)]
        service(row, target, Actor.for_user(operator.user))
    stored = Enrichment.objects.get(pk=row.pk)
    assert stored.status == target
    audit = list(AuditEvent.objects.filter(action=IndexerAction.ENRICHMENT_REQUEUED))
    if service is _requeue:
        # One audit row per call (on the chain), with the counts it moved.
        assert [a.changes for a in audit] == [{"status": [{source: 1}, {target: 1}]}]
        assert (stored.attempts, stored.last_error) == (0, "")
    else:
        assert audit == [] and not AuditEvent.objects.exists()  # verdicts are counted, not audited
        assert stored.attempts == 3  # the attempt moved in the same statement
