"""Operator writes on the indexer: pause, resume, retry the poison height, request a rollback,
re-queue enrichment.

Every function is keyword-only, runs in one transaction, moves the row by compare-and-set, writes
one audit row inside that transaction, and re-checks the actor's role in the chain's organization
itself, so no path (API, admin, shell) can tunnel past the gate the edges apply.

A rollback is only *requested* here: the writer carries it out under its lease on its next step
(`blocks_rollback` is fenced by the lease token like every other write of the indexed tables).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db import transaction
from django.db.models import Count

from fleetops.access.models import ApiToken, Membership, Role
from fleetops.audit.actors import Actor
from fleetops.audit.models import ActorType
from fleetops.audit.services import record
from fleetops.lib import clock
from fleetops.lib.cas import cas_update
from fleetops.lib.errors import Conflict, Forbidden, NotFound, ValidationFailed
from indexer.models import (
    ENRICHMENT_REQUEUEABLE,
    Chain,
    Enrichment,
    EnrichmentStatus,
    IndexerState,
    Mode,
)

TEXT_CAP = 256
REQUEUE_IDS_CAP = 10_000

REASON_REQUIRED = "reason is required (1-256 characters, not blank)"
ADMIN_REQUIRED = "this indexer action needs the admin role in the chain's organization"
OPERATOR_REQUIRED = "re-queueing enrichment needs the operator role in the chain's organization"
STATE_MISSING = "chain {chain} has no indexer state yet; start indexer_run once"
NO_POISON_HEIGHT = "chain {chain} has no poison height to retry"
NOTHING_INDEXED = "nothing is indexed on chain {chain} yet, so there is nothing to roll back"
ROLLBACK_HEIGHT_TYPE = "to_height must be an integer"
ROLLBACK_RANGE = (
    "to_height must be between {low} (oldest indexed height - 1) and {high} (last indexed height - 1)"
)
ROLLBACK_PENDING = (
    "a rollback of chain {chain} to height {height} is already requested; the writer carries it out "
    "on its next step"
)
REQUEUE_IDS_INVALID = f"ids must be a list of 1-{REQUEUE_IDS_CAP} enrichment ids, or omitted for all"


class IndexerAction:
    """Audit action names of the indexer's operator services."""

    PAUSED = "indexer.paused"
    RESUMED = "indexer.resumed"
    POISON_RETRIED = "indexer.poison_retried"
    ROLLBACK_REQUESTED = "indexer.rollback_requested"
    ENRICHMENT_REQUEUED = "indexer.enrichment_requeued"


# --- gates ------------------------------------------------------------------------------------------


def actor_role(*, actor: Actor, org_id: int) -> Role | None:
    """The actor's role in one organization, as the edges compute it.

    A token acts with the lower of its own role and its user's current membership (demoting a user
    demotes their tokens at once). System and scheduler actors are the portal's own processes and
    shell commands, trusted like the operator who runs them.
    """
    if actor.type in (ActorType.SYSTEM, ActorType.SCHEDULER):
        return Role.ADMIN
    if actor.user_id is None:
        return None
    if actor.is_superuser:
        return Role.ADMIN
    member = Membership.objects.filter(user_id=actor.user_id, org_id=org_id).values_list("role", flat=True)
    role = member.first()
    if role is None:
        return None
    if actor.type == ActorType.API_TOKEN:
        token = ApiToken.objects.filter(pk=actor.id, org_id=org_id, revoked_at__isnull=True).first()
        if token is None or not token.is_active(at=clock.now()):
            return None
        return Role.lowest(token.role, role)
    return Role(role)


def _require(*, actor: Actor, chain: Chain, role: Role, message: str) -> None:
    if not Role.at_least(actor_role(actor=actor, org_id=chain.org_id), role):
        raise Forbidden(message)


def _validate_reason(reason: str) -> str:
    if not isinstance(reason, str) or not reason.strip() or len(reason) > TEXT_CAP:
        raise ValidationFailed(REASON_REQUIRED, fields={"reason": [REASON_REQUIRED]})
    return reason


def _state(chain: Chain) -> IndexerState:
    state = IndexerState.objects.filter(chain=chain).first()
    if state is None:
        raise NotFound(STATE_MISSING.format(chain=chain.slug), code="indexer_state_missing")
    return state


def _audit(
    *,
    action: str,
    chain: Chain,
    actor: Actor,
    reason: str,
    changes: dict[str, list[Any]],
    **metadata: Any,
) -> None:
    record(
        action=action,
        actor=actor,
        org=chain.org,
        target=chain,
        reason=reason,
        changes=changes,
        metadata={"chain": chain.slug, **metadata},
    )


# --- pause / resume ---------------------------------------------------------------------------------


def _set_paused(*, chain: Chain, actor: Actor, reason: str, paused: bool) -> bool:
    _validate_reason(reason)
    _require(actor=actor, chain=chain, role=Role.ADMIN, message=ADMIN_REQUIRED)
    with transaction.atomic():
        state = _state(chain)
        # Resuming is also the way out of `halted` once the operator fixed the cause: the writer
        # checks the identity and the linkage again and halts again if the cause is still there.
        unhalt = not paused and state.mode == Mode.HALTED
        if state.paused == paused and not unhalt:
            # Pausing a paused indexer is a no-op, not an error: a retried request must not fail.
            return False
        updates: dict[str, Any] = {"paused": paused}
        changes: dict[str, list[object]] = (
            {"paused": [state.paused, paused]} if state.paused != paused else {}
        )
        if unhalt:
            updates.update(mode=Mode.CATCHING_UP, last_error="")
            changes["mode"] = [state.mode, Mode.CATCHING_UP]
        cas_update(
            IndexerState.objects.filter(chain=chain, paused=state.paused, mode=state.mode),
            operation="indexer_resume" if not paused else "indexer_pause",
            **updates,
        )
        _audit(
            action=IndexerAction.PAUSED if paused else IndexerAction.RESUMED,
            chain=chain,
            actor=actor,
            reason=reason,
            changes=changes,
            mode=state.mode,
            last_indexed_height=state.last_indexed_height,
            last_error=state.last_error[:500],
        )
    return True


def indexer_pause(*, chain: Chain, actor: Actor, reason: str) -> bool:
    """Stop ingest at the next step: the writer gives its lease up (so `indexer_reindex` and
    `indexer_rollback` can take it) and waits. Admin role. Returns False when already paused."""
    return _set_paused(chain=chain, actor=actor, reason=reason, paused=True)


def indexer_resume(*, chain: Chain, actor: Actor, reason: str) -> bool:
    """Let the writer ingest again; a halted chain goes back to catching up (after the operator
    fixed the cause). Admin role. Returns False when it was neither paused nor halted."""
    return _set_paused(chain=chain, actor=actor, reason=reason, paused=False)


# --- poison height ----------------------------------------------------------------------------------


def indexer_retry_poison(*, chain: Chain, actor: Actor, reason: str) -> bool:
    """Clear the poison attempts so the writer tries the poison height again (after a fix), and
    take the mode back from degraded. The poison height stays recorded until a commit passes it."""
    _validate_reason(reason)
    _require(actor=actor, chain=chain, role=Role.ADMIN, message=ADMIN_REQUIRED)
    with transaction.atomic():
        state = _state(chain)
        if state.poison_height is None:
            raise Conflict(NO_POISON_HEIGHT.format(chain=chain.slug), code="no_poison_height")
        # Degraded because of the poison height; catching_up lets the next commit pick the mode.
        mode = Mode.CATCHING_UP if state.mode == Mode.DEGRADED else state.mode
        cas_update(
            IndexerState.objects.filter(
                chain=chain,
                poison_height=state.poison_height,
                poison_attempts=state.poison_attempts,
                mode=state.mode,
            ),
            operation="indexer_retry_poison",
            poison_attempts=0,
            mode=mode,
        )
        _audit(
            action=IndexerAction.POISON_RETRIED,
            chain=chain,
            actor=actor,
            reason=reason,
            changes={
                "poison_attempts": [state.poison_attempts, 0],
                **({"mode": [state.mode, mode]} if mode != state.mode else {}),
            },
            poison_height=state.poison_height,
            last_error=state.last_error[:500],
        )
    return True


# --- rollback ---------------------------------------------------------------------------------------


def rollback_bounds(state: IndexerState) -> tuple[int, int] | None:
    """(lowest, highest) heights a rollback may go to, or None when nothing is indexed."""
    if state.last_indexed_height is None:
        return None
    oldest = state.oldest_indexed_height if state.oldest_indexed_height is not None else 1
    return oldest - 1, state.last_indexed_height - 1


def rollback_validate(*, chain: Chain, state: IndexerState, to_height: Any) -> int:
    """The checks `indexer_request_rollback` makes, for the admin's confirmation page too."""
    if isinstance(to_height, bool) or not isinstance(to_height, int):
        raise ValidationFailed(ROLLBACK_HEIGHT_TYPE, fields={"to_height": [ROLLBACK_HEIGHT_TYPE]})
    bounds = rollback_bounds(state)
    if bounds is None:
        raise Conflict(NOTHING_INDEXED.format(chain=chain.slug), code="nothing_indexed")
    low, high = bounds
    if not low <= to_height <= high:
        message = ROLLBACK_RANGE.format(low=low, high=high)
        raise ValidationFailed(message, fields={"to_height": [message]})
    return to_height


def indexer_request_rollback(*, chain: Chain, to_height: int, actor: Actor, reason: str) -> bool:
    """Ask the writer to delete every derived row above `to_height` and re-ingest from there.
    Admin role. Returns False when the same rollback is already requested."""
    _validate_reason(reason)
    _require(actor=actor, chain=chain, role=Role.ADMIN, message=ADMIN_REQUIRED)
    with transaction.atomic():
        state = _state(chain)
        to_height = rollback_validate(chain=chain, state=state, to_height=to_height)
        if state.rollback_requested_to is not None:
            if state.rollback_requested_to == to_height:
                return False
            raise Conflict(
                ROLLBACK_PENDING.format(chain=chain.slug, height=state.rollback_requested_to),
                code="rollback_pending",
            )
        # The indexed height is part of the condition: a commit that moved it since we validated
        # makes this a RaceLost instead of a request against heights we never checked.
        cas_update(
            IndexerState.objects.filter(
                chain=chain,
                rollback_requested_to__isnull=True,
                last_indexed_height=state.last_indexed_height,
            ),
            operation="indexer_request_rollback",
            rollback_requested_to=to_height,
            rollback_requested_reason=reason,
            rollback_requested_by=actor.label[:200],
        )
        _audit(
            action=IndexerAction.ROLLBACK_REQUESTED,
            chain=chain,
            actor=actor,
            reason=reason,
            changes={"rollback_requested_to": [None, to_height]},
            last_indexed_height=state.last_indexed_height,
            depth=(state.last_indexed_height or 0) - to_height,
        )
    return True


# --- enrichment -------------------------------------------------------------------------------------


def _validate_ids(ids: Sequence[int] | None) -> list[int] | None:
    if ids is None:
        return None
    if isinstance(ids, str | bytes) or not 1 <= len(ids) <= REQUEUE_IDS_CAP:
        raise ValidationFailed(REQUEUE_IDS_INVALID, fields={"ids": [REQUEUE_IDS_INVALID]})
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in ids):
        raise ValidationFailed(REQUEUE_IDS_INVALID, fields={"ids": [REQUEUE_IDS_INVALID]})
    return sorted(set(ids))


def enrichment_requeue(*, chain: Chain, ids: Sequence[int] | None, actor: Actor, reason: str) -> int:
    """failed / undecodable -> pending with fresh attempts, for the given ids of this chain or (ids
    None) every such row of the chain. Operator role. Returns how many rows were re-queued; rows of
    other chains and rows in other states are left alone."""
    _validate_reason(reason)
    wanted = _validate_ids(ids)
    _require(actor=actor, chain=chain, role=Role.OPERATOR, message=OPERATOR_REQUIRED)
    rows = Enrichment.objects.filter(chain=chain, status__in=ENRICHMENT_REQUEUEABLE)
    if wanted is not None:
        rows = rows.filter(id__in=wanted)
    with transaction.atomic():
        before = dict(
            rows.values_list("status").annotate(n=Count("id")).values_list("status", "n").order_by()
        )
        if not before:
            return 0
        # The status condition is the compare-and-set: a worker that claimed a row meanwhile (or
        # another operator who re-queued it) keeps it, and the count says how many we moved.
        now = clock.now()
        # Due at once: workers claim rows whose next attempt is not in the future.
        requeued = rows.update(
            status=EnrichmentStatus.PENDING, attempts=0, next_attempt_at=now, last_error="", updated_at=now
        )
        _audit(
            action=IndexerAction.ENRICHMENT_REQUEUED,
            chain=chain,
            actor=actor,
            reason=reason,
            changes={"status": [before, {EnrichmentStatus.PENDING.value: requeued}]},
            requeued=requeued,
            scope="all" if wanted is None else "ids",
            ids=wanted[:100] if wanted is not None else [],
        )
    return requeued
