"""The writer's mode steps: every change of `IndexerState.mode` the ingest loop makes.

Each step is one compare-and-set through the transition kernel (`fleetops.lib.transition`), in a
transaction fenced by the writer's lease (a deposed writer's late step fails with `LeaseLost`
instead of writing), with the audit policy of `indexer.models.MODE_MACHINE`:

- `indexer_halt` and `indexer_degrade` enter `halted` / `degraded`: one audit row each;
- `indexer_unhalt` leaves `halted` when the writer carried out an admin's rollback request (the
  request is cleared in the same compare-and-set, see `indexer_rollback_done`), and
  `indexer_mode_follow` leaving `degraded` (a commit passed again): one audit row each;
- `indexer_mode_follow` between the quiet modes (catching_up, normal, idle): no audit row, counted
  in `fleetops_indexer_mode_changes_total` like every other change.

A step whose from-state no longer holds (an operator resumed or retried meanwhile) raises `RaceLost`;
the runner re-reads the state on its next step. The operator's own ways out of `halted` and
`degraded` (Resume, Retry poison height) are services in `indexer.services`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db import transaction

from fleetops.audit.actors import Actor
from fleetops.lib.reason import REASON_MAX_LENGTH
from fleetops.lib.transition import IllegalTransition, Moved, authorize, transition
from fleetops.observability.leases import LeaseGrant, lease_assert_held
from indexer.metrics import MODE_CHANGES
from indexer.models import MODE_MACHINE, Chain, IndexerState, Mode, beside_state, mode_edge_audited

ERROR_LIMIT = 2000
NOT_HALTED = "only a halted indexer is taken out of halted by a rollback request"
HALTED_STAYS = "a halted indexer is left by an admin's resume or rollback request, not by a passing step"
# What carrying out a rollback request leaves of it: nothing.
REQUEST_CLEARED: Mapping[str, Any] = {
    "rollback_requested_to": None,
    "rollback_requested_reason": "",
    "rollback_requested_by": "",
}


class ModeAction:
    """Audit action names of the writer's audited mode steps."""

    HALTED = "indexer.halted"
    DEGRADED = "indexer.degraded"
    RECOVERED = "indexer.recovered"  # left degraded on its own: steps pass again
    UNHALTED = "indexer.unhalted"  # left halted by carrying out an admin's rollback request


def mode_move(
    *,
    chain: Chain,
    state: IndexerState,
    to: str,
    actor: Actor,
    lease: LeaseGrant,
    action: str,
    reason: str = "",
    updates: Mapping[str, Any] | None = None,
    where: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Moved:
    """Move `state` from the mode it was read in to `to` (see the module docstring). `action` names
    the audit row, written only when the edge is audited (`mode_edge_audited`). `where`: columns the
    row must still hold, checked in the same compare-and-set."""
    source = state.mode
    org = chain.org
    # Before the transaction opens, so a refusal's access.denied row commits. The two admin edges
    # the writer takes too are declared `engine_too` in MODE_MACHINE, so the writer passes here.
    authorize(machine=MODE_MACHINE, source=source, to=to, actor=actor, org=org, target=state)
    fields = dict(updates or {})
    with transaction.atomic():
        lease_assert_held(name=lease.name, token=lease.token)
        moved = transition(
            state,
            machine=MODE_MACHINE,
            to=to,
            actor=actor,
            org=org,
            action=action if mode_edge_audited(source, to) else None,
            reason=reason,
            updates=fields,
            where=where,
            audit_fields=tuple(fields),
            metadata={"chain": chain.slug, **dict(metadata or {})},
            check_role=False,
        )
    MODE_CHANGES.labels(chain=chain.slug, from_mode=source, to_mode=str(to)).inc()
    return moved


def _note(*, chain: Chain, state: IndexerState, lease: LeaseGrant, fields: Mapping[str, Any]) -> None:
    """Columns beside the mode (last_error, poison counters), while the mode stays what was read.
    Never the mode itself: `beside_state` refuses it (only `mode_move` moves it, through the kernel)."""
    with transaction.atomic():
        lease_assert_held(name=lease.name, token=lease.token)
        IndexerState.objects.filter(chain=chain, mode=state.mode).update(**beside_state(MODE_MACHINE, fields))
    for key, value in fields.items():
        setattr(state, key, value)


def indexer_mode_follow(
    *, chain: Chain, state: IndexerState, to: str, lease: LeaseGrant, actor: Actor
) -> bool:
    """The mode a passing step observed (catching_up, normal or idle); clears `last_error`. Returns
    whether the mode changed. Leaving `degraded` this way is audited (`indexer.recovered`); a
    halted chain is left only by an admin (`indexer_resume`) or a rollback request (`indexer_unhalt`)."""
    if state.mode == Mode.HALTED:
        raise IllegalTransition(HALTED_STAYS)
    if state.mode == to:
        if state.last_error:
            _note(chain=chain, state=state, lease=lease, fields={"last_error": ""})
        return False
    mode_move(
        chain=chain,
        state=state,
        to=to,
        actor=actor,
        lease=lease,
        action=ModeAction.RECOVERED,
        reason="steps pass again",
        updates={"last_error": ""},
    )
    return True


def indexer_degrade(
    *,
    chain: Chain,
    state: IndexerState,
    error: str,
    lease: LeaseGrant,
    actor: Actor,
    updates: Mapping[str, Any] | None = None,
) -> bool:
    """The indexer is stalled (steps keep failing, a poison height, a range no source serves):
    `degraded`, audited, with the reason in `last_error`. Already degraded: only `last_error` (and
    `updates`) change. Returns whether the mode changed."""
    fields = {"last_error": error[:ERROR_LIMIT], **dict(updates or {})}
    if state.mode == Mode.DEGRADED:
        _note(chain=chain, state=state, lease=lease, fields=fields)
        return False
    mode_move(
        chain=chain,
        state=state,
        to=Mode.DEGRADED,
        actor=actor,
        lease=lease,
        action=ModeAction.DEGRADED,
        reason=error[:REASON_MAX_LENGTH],
        updates=fields,
    )
    return True


def indexer_halt(*, chain: Chain, state: IndexerState, error: str, lease: LeaseGrant, actor: Actor) -> None:
    """Stop writing: a chain identity mismatch or a reorg the writer may not roll back. Audited;
    only an admin gets the chain out (Resume, or a rollback request)."""
    mode_move(
        chain=chain,
        state=state,
        to=Mode.HALTED,
        actor=actor,
        lease=lease,
        action=ModeAction.HALTED,
        reason=error[:REASON_MAX_LENGTH],
        updates={"last_error": error[:ERROR_LIMIT]},
    )


def indexer_unhalt(
    *, chain: Chain, state: IndexerState, lease: LeaseGrant, actor: Actor, requested_by: str, to_height: int
) -> None:
    """The writer carried out an admin's rollback request to `to_height` on a halted chain: ingest
    resumes from there (the identity is checked again first). Audited. The request is cleared in the
    same compare-and-set, which also requires it to still be the one carried out: the chain never
    leaves `halted` without its request being done, nor stays `halted` with its request gone. A
    request that changed meanwhile is a `RaceLost` (nothing written; the next step carries it out)."""
    if state.mode != Mode.HALTED:
        raise IllegalTransition(NOT_HALTED)
    mode_move(
        chain=chain,
        state=state,
        to=Mode.CATCHING_UP,
        actor=actor,
        lease=lease,
        action=ModeAction.UNHALTED,
        reason=f"rolled back to {to_height} as requested by {requested_by}"[:REASON_MAX_LENGTH],
        updates={"last_error": "", **REQUEST_CLEARED},
        where={"rollback_requested_to": to_height},
        metadata={"rollback_to": to_height, "requested_by": requested_by},
    )


def indexer_rollback_done(
    *, chain: Chain, state: IndexerState, lease: LeaseGrant, actor: Actor, to_height: int
) -> bool:
    """The writer carried out the rollback request to `to_height` (`blocks_rollback` committed):
    clear that request, fenced by the lease; a newer request stays for the next step. On a halted
    chain the request is the way out of `halted`, and `indexer_unhalt` clears it in the same
    compare-and-set as the mode change. Until this commits the request stays pending, and the next
    step carries it out again (the rollback itself is then a no-op). Returns whether the mode changed."""
    if state.mode == Mode.HALTED:
        indexer_unhalt(
            chain=chain,
            state=state,
            lease=lease,
            actor=actor,
            requested_by=state.rollback_requested_by,
            to_height=to_height,
        )
        return True
    with transaction.atomic():
        lease_assert_held(name=lease.name, token=lease.token)
        cleared = IndexerState.objects.filter(chain=chain, rollback_requested_to=to_height).update(
            **beside_state(MODE_MACHINE, REQUEST_CLEARED)
        )
    if cleared:
        for key, value in REQUEST_CLEARED.items():
            setattr(state, key, value)
    return False
