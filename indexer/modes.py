"""The writer's mode steps: every change of `IndexerState.mode` the ingest loop makes.

Each step is one compare-and-set through the transition kernel (`fleetops.lib.transition`), in a
transaction fenced by the writer's lease (a deposed writer's late step fails with `LeaseLost`
instead of writing), with the audit policy of `indexer.models.MODE_MACHINE`:

- `indexer_halt` and `indexer_degrade` enter `halted` / `degraded`: one audit row each;
- `indexer_unhalt` leaves `halted` when the writer carried out an admin's rollback request, and
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

from fleetops.access.roles import require_engine
from fleetops.audit.actors import Actor
from fleetops.lib.transition import IllegalTransition, Moved, authorize, transition
from fleetops.observability.leases import LeaseGrant, lease_assert_held
from indexer.metrics import MODE_CHANGES
from indexer.models import (
    MODE_MACHINE,
    MODE_WRITER_TAKES,
    Chain,
    IndexerState,
    Mode,
    mode_edge_audited,
)

ERROR_LIMIT = 2000
NOT_HALTED = "only a halted indexer is taken out of halted by a rollback request"
HALTED_STAYS = "a halted indexer is left by an admin's resume or rollback request, not by a passing step"


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
    metadata: Mapping[str, Any] | None = None,
) -> Moved:
    """Move `state` from the mode it was read in to `to` (see the module docstring). `action` names
    the audit row, written only when the edge is audited (`mode_edge_audited`)."""
    source = state.mode
    org = chain.org
    if (source, str(to)) in MODE_WRITER_TAKES:
        # An admin edge the writer also takes on its own (see MODE_MACHINE): only as an engine.
        require_engine(actor=actor, org=org, what=f"{MODE_MACHINE.name}: {source} -> {to}", target=state)
    else:
        # Before the transaction opens, so a refusal's access.denied row commits.
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
            audit_fields=tuple(fields),
            metadata={"chain": chain.slug, **dict(metadata or {})},
            check_role=False,
        )
    MODE_CHANGES.labels(chain=chain.slug, from_mode=source, to_mode=str(to)).inc()
    return moved


def _note(*, chain: Chain, state: IndexerState, lease: LeaseGrant, fields: Mapping[str, Any]) -> None:
    """Columns beside the mode (last_error, poison counters), while the mode stays what was read."""
    with transaction.atomic():
        lease_assert_held(name=lease.name, token=lease.token)
        IndexerState.objects.filter(chain=chain, mode=state.mode).update(**fields)
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
        reason=error[:500],
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
        reason=error[:500],
        updates={"last_error": error[:ERROR_LIMIT]},
    )


def indexer_unhalt(
    *, chain: Chain, state: IndexerState, lease: LeaseGrant, actor: Actor, requested_by: str, to_height: int
) -> None:
    """The writer carried out an admin's rollback request on a halted chain: ingest resumes from
    the chosen height (the identity is checked again first). Audited."""
    if state.mode != Mode.HALTED:
        raise IllegalTransition(NOT_HALTED)
    mode_move(
        chain=chain,
        state=state,
        to=Mode.CATCHING_UP,
        actor=actor,
        lease=lease,
        action=ModeAction.UNHALTED,
        reason=f"rolled back to {to_height} as requested by {requested_by}",
        updates={"last_error": ""},
        metadata={"rollback_to": to_height, "requested_by": requested_by},
    )
