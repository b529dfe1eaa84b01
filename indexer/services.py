"""Operator writes on the indexer: pause, resume, retry the poison height, request a rollback,
re-queue enrichment, and tune a chain's and its sources' settings live.

Every function is keyword-only and derives the actor's role in the chain's organization itself
(`fleetops.access.roles.require_role`, before any transaction, so a refusal writes its
`access.denied` row), so no path (API, admin, shell) can tunnel past the gate. Mode and enrichment
status changes go through the transition kernel (`fleetops.lib.transition`), whose allowed
from-states and edge roles come from `indexer.models`; the other columns (the paused flag, poison
counters, the rollback request) move by compare-and-set. One audit row per call, inside the
transaction of the change. Reasons are cleaned by `fleetops.lib.reason.clean_reason`.

A rollback is only *requested* here: the writer carries it out under its lease on its next step
(`blocks_rollback` is fenced by the lease token like every other write of the indexed tables).
The writer's own mode steps are in `indexer.modes`.

Settings (`chain_update_settings`, `source_update_settings`: limits, batch sizes, decode concurrency,
priority, enabled) are plain columns, not a state machine: one locked read, one UPDATE and one audit
row with before/after. A running `indexer_run` reads them on every step, so the change takes effect
within one step, without a restart (seed 004, phase 5: "reduce concurrency limits immediately").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.db import transaction

from fleetops.access.models import Role
from fleetops.access.roles import require_role
from fleetops.audit.actors import Actor
from fleetops.audit.services import record
from fleetops.lib import clock
from fleetops.lib.cas import cas_update
from fleetops.lib.errors import Conflict, NotFound, ValidationFailed
from fleetops.lib.machine import Machine
from fleetops.lib.reason import clean_reason
from fleetops.lib.transition import transition, transition_rows
from indexer.metrics import MODE_CHANGES
from indexer.models import (
    ENRICHMENT_MACHINE,
    ENRICHMENT_REQUEUEABLE,
    MODE_MACHINE,
    Chain,
    Enrichment,
    EnrichmentStatus,
    IndexerState,
    Mode,
    SyncSource,
)

REQUEUE_IDS_CAP = 10_000

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


SETTINGS_ROLE = "changing indexer settings needs the operator role in the chain's organization"
NOTHING_TO_CHANGE = "name at least one setting to change"
# Chain settings an operator tunes live, with their bounds.
CHAIN_SETTING_BOUNDS: dict[str, tuple[int, int]] = {
    "max_in_flight": (1, 256),
    "catchup_batch_size": (1, 5000),
    "decode_concurrency": (1, 64),
    "enrichment_batch_size": (1, 10_000),
}
SOURCE_PRIORITY_BOUNDS = (0, 1_000_000)


class IndexerAction:
    """Audit action names of the indexer's operator services."""

    PAUSED = "indexer.paused"
    RESUMED = "indexer.resumed"
    POISON_RETRIED = "indexer.poison_retried"
    ROLLBACK_REQUESTED = "indexer.rollback_requested"
    ENRICHMENT_REQUEUED = "indexer.enrichment_requeued"
    SETTINGS_CHANGED = "indexer.settings_changed"
    SOURCE_SETTINGS_CHANGED = "indexer.source.settings_changed"


# --- gates ------------------------------------------------------------------------------------------


def edge_role(machine: Machine, sources: Iterable[str], to: str) -> Role:
    """The role a person needs for every edge sources -> to of `machine` (the highest of them)."""
    roles = []
    for source in sources:
        edge = machine.edge(source, to)
        if edge is None or edge.role is None:
            raise ValueError(f"{machine.name}: {source} -> {to} is not an operator edge")
        roles.append(Role(edge.role))
    return max(roles, key=Role.rank)


# Resume and Retry poison height are the operator's ways out of `halted` and `degraded`: their role
# is that of the machine's edges (pause and the rollback request are admin actions of their own).
RESUME_ROLE = edge_role(MODE_MACHINE, (Mode.HALTED,), Mode.CATCHING_UP)
RETRY_POISON_ROLE = edge_role(MODE_MACHINE, (Mode.DEGRADED,), Mode.CATCHING_UP)


def _require(
    *, actor: Actor, chain: Chain, needs: Role, message: str, what: str, asked: dict[str, Any]
) -> None:
    # Before any transaction: the access.denied row commits although the change does not.
    require_role(
        actor=actor,
        org=chain.org,
        role=needs,
        what=f"{what} on {chain.slug}",
        message=message,
        target=chain,
        asked=asked,
    )


def _state(chain: Chain, *, lock: bool = False) -> IndexerState:
    rows = IndexerState.objects.select_for_update() if lock else IndexerState.objects
    state = rows.filter(chain=chain).first()
    if state is None:
        raise NotFound(STATE_MISSING.format(chain=chain.slug), code="indexer_state_missing")
    return state


def _audit(
    *,
    action: str,
    chain: Chain,
    state: IndexerState,
    actor: Actor,
    reason: str,
    changes: dict[str, list[Any]],
    **metadata: Any,
) -> None:
    record(
        action=action,
        actor=actor,
        org=chain.org,
        target=state,
        reason=reason,
        changes=changes,
        metadata={"chain": chain.slug, **metadata},
    )


def _mode_changed(chain: Chain, source: str, to: str) -> None:
    MODE_CHANGES.labels(chain=chain.slug, from_mode=source, to_mode=to).inc()


# --- pause / resume ---------------------------------------------------------------------------------


def indexer_pause(*, chain: Chain, actor: Actor, reason: str) -> bool:
    """Stop ingest at the next step: the writer gives its lease up (so `indexer_reindex` and
    `indexer_rollback` can take it) and waits. Admin role. Returns False when already paused.

    `paused` is a flag beside the mode (a paused chain keeps its mode, halted included): only this
    service and `indexer_resume` write it, each with one audit row."""
    reason = clean_reason(reason)
    _require(
        actor=actor,
        chain=chain,
        needs=Role.ADMIN,
        message=ADMIN_REQUIRED,
        what="pause",
        asked={"paused": True},
    )
    with transaction.atomic():
        state = _state(chain, lock=True)
        if state.paused:
            # Pausing a paused indexer is a no-op, not an error: a retried request must not fail.
            return False
        cas_update(
            IndexerState.objects.filter(chain=chain, paused=False), operation="indexer_pause", paused=True
        )
        _audit(
            action=IndexerAction.PAUSED,
            chain=chain,
            state=state,
            actor=actor,
            reason=reason,
            changes={"paused": [False, True]},
            mode=state.mode,
            last_indexed_height=state.last_indexed_height,
            last_error=state.last_error[:500],
        )
    return True


def indexer_resume(*, chain: Chain, actor: Actor, reason: str) -> bool:
    """Let the writer ingest again; a halted chain goes back to catching up (after the operator
    fixed the cause), through the kernel: `halted -> catching_up` is an admin edge of
    `MODE_MACHINE`. Admin role. One audit row with every change. Returns False when it was neither
    paused nor halted."""
    reason = clean_reason(reason)
    _require(
        actor=actor,
        chain=chain,
        needs=RESUME_ROLE,
        message=ADMIN_REQUIRED,
        what="resume",
        asked={"paused": False},
    )
    state = _state(chain)
    metadata = {
        "chain": chain.slug,
        "last_indexed_height": state.last_indexed_height,
        "last_error": state.last_error[:500],
    }
    # Resuming is also the way out of `halted` once the operator fixed the cause: the writer
    # checks the identity and the linkage again and halts again if the cause is still there.
    if state.mode == Mode.HALTED:
        # The paused flag is part of the compare-and-set: a pause meanwhile makes this a RaceLost.
        transition(
            state,
            machine=MODE_MACHINE,
            to=Mode.CATCHING_UP,
            actor=actor,
            org=chain.org,
            action=IndexerAction.RESUMED,
            reason=reason,
            where={"paused": state.paused},
            updates={"paused": False, "last_error": ""},
            audit_fields=("paused",),
            metadata=metadata,
            check_role=False,
        )
        _mode_changed(chain, Mode.HALTED, Mode.CATCHING_UP)
        return True
    with transaction.atomic():
        state = _state(chain, lock=True)
        if not state.paused:
            return False
        # Not halted when we looked: if the writer halted meanwhile, this is a RaceLost (ask again).
        cas_update(
            IndexerState.objects.filter(chain=chain, paused=True, mode=state.mode),
            operation="indexer_resume",
            paused=False,
        )
        _audit(
            action=IndexerAction.RESUMED,
            chain=chain,
            state=state,
            actor=actor,
            reason=reason,
            changes={"paused": [True, False]},
            mode=state.mode,
            last_indexed_height=state.last_indexed_height,
            last_error=state.last_error[:500],
        )
    return True


# --- poison height ----------------------------------------------------------------------------------


def indexer_retry_poison(*, chain: Chain, actor: Actor, reason: str) -> bool:
    """Clear the poison attempts so the writer tries the poison height again (after a fix), and
    take the mode back from degraded (`degraded -> catching_up`, an admin edge of `MODE_MACHINE`;
    catching_up lets the next commit pick the mode). The poison height stays recorded until a
    commit passes it. Admin role; one audit row."""
    reason = clean_reason(reason)
    _require(
        actor=actor,
        chain=chain,
        needs=RETRY_POISON_ROLE,
        message=ADMIN_REQUIRED,
        what="retry poison height",
        asked={"poison_attempts": 0},
    )
    state = _state(chain)
    if state.poison_height is None:
        raise Conflict(NO_POISON_HEIGHT.format(chain=chain.slug), code="no_poison_height")
    metadata = {
        "chain": chain.slug,
        "poison_height": state.poison_height,
        "last_error": state.last_error[:500],
    }
    # The poison counters are part of the compare-and-set: a commit that passed the height (or
    # another retry) meanwhile makes this a RaceLost.
    guard = {"poison_height": state.poison_height, "poison_attempts": state.poison_attempts}
    if state.mode == Mode.DEGRADED:
        transition(
            state,
            machine=MODE_MACHINE,
            to=Mode.CATCHING_UP,
            actor=actor,
            org=chain.org,
            action=IndexerAction.POISON_RETRIED,
            reason=reason,
            where=guard,
            updates={"poison_attempts": 0},
            audit_fields=("poison_attempts",),
            metadata=metadata,
            check_role=False,
        )
        _mode_changed(chain, Mode.DEGRADED, Mode.CATCHING_UP)
        return True
    with transaction.atomic():
        cas_update(
            IndexerState.objects.filter(chain=chain, mode=state.mode, **guard),
            operation="indexer_retry_poison",
            poison_attempts=0,
        )
        _audit(
            action=IndexerAction.POISON_RETRIED,
            chain=chain,
            state=state,
            actor=actor,
            reason=reason,
            changes={"poison_attempts": [state.poison_attempts, 0]},
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
    reason = clean_reason(reason)
    _require(
        actor=actor,
        chain=chain,
        needs=Role.ADMIN,
        message=ADMIN_REQUIRED,
        what="request rollback",
        asked={"to_height": to_height},
    )
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
            state=state,
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
    """failed / undecodable -> pending with fresh attempts (operator edges of `ENRICHMENT_MACHINE`),
    for the given ids of this chain or (ids None) every such row of the chain. Operator role. One
    set-based move through the kernel and one audit row (counts by status) per call. Returns how
    many rows were re-queued; rows of other chains and rows in other states are left alone."""
    reason = clean_reason(reason)
    wanted = _validate_ids(ids)
    _require(
        actor=actor,
        chain=chain,
        needs=edge_role(ENRICHMENT_MACHINE, ENRICHMENT_REQUEUEABLE, EnrichmentStatus.PENDING),
        message=OPERATOR_REQUIRED,
        what="requeue enrichment",
        asked={"ids": wanted[:100] if wanted is not None else "all"},
    )
    rows = Enrichment.objects.filter(chain=chain, status__in=ENRICHMENT_REQUEUEABLE)
    if wanted is not None:
        rows = rows.filter(id__in=wanted)
    now = clock.now()
    # No savepoint inside a caller's transaction (the idempotent API write): a failure here leaves
    # the service and that whole transaction rolls back; no caller catches it and goes on.
    with transaction.atomic(savepoint=False):
        found = list(rows.values_list("id", "status").order_by("id"))
        if not found:
            return 0
        # `exact_from`: a row a worker claimed or another operator re-queued meanwhile keeps its
        # state, and the counts below are those of the rows this call moved.
        moved = set(
            transition_rows(
                model=Enrichment,
                machine=ENRICHMENT_MACHINE,
                rows=[{"pk": pk, "from": status} for pk, status in found],
                to=EnrichmentStatus.PENDING,
                exact_from=True,
                # Due at once: workers claim rows whose next attempt is not in the future.
                updates={"attempts": 0, "next_attempt_at": now, "last_error": "", "updated_at": now},
                operation="enrichment_requeue",
            )
        )
        if not moved:
            return 0
        before: dict[str, int] = {}
        for pk, status in found:
            if pk in moved:
                before[status] = before.get(status, 0) + 1
        record(
            action=IndexerAction.ENRICHMENT_REQUEUED,
            actor=actor,
            org=chain.org,
            target=chain,
            reason=reason,
            changes={"status": [before, {EnrichmentStatus.PENDING.value: len(moved)}]},
            metadata={
                "chain": chain.slug,
                "requeued": len(moved),
                "scope": "all" if wanted is None else "ids",
                "ids": wanted[:100] if wanted is not None else [],
            },
        )
    return len(moved)


# --- live settings ----------------------------------------------------------------------------------


def _bounded(name: str, value: Any, low: int, high: int) -> int:
    message = f"{name} must be an integer between {low} and {high}"
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationFailed(message, fields={name: [message]})
    return value


def chain_update_settings(
    *,
    chain: Chain,
    actor: Actor,
    reason: str,
    max_in_flight: int | None = None,
    catchup_batch_size: int | None = None,
    decode_concurrency: int | None = None,
    enrichment_batch_size: int | None = None,
) -> dict[str, list[int]]:
    """Change the chain's ingest and enrichment limits (None: leave as is). Operator role. One
    transaction, one audit row with before/after of what changed. Returns the changes (empty when
    every value was already so: no audit row then). The running writer applies them on its next
    step; the enrichment loop on its next round."""
    reason = clean_reason(reason)
    asked = {
        "max_in_flight": max_in_flight,
        "catchup_batch_size": catchup_batch_size,
        "decode_concurrency": decode_concurrency,
        "enrichment_batch_size": enrichment_batch_size,
    }
    wanted = {
        name: _bounded(name, value, *CHAIN_SETTING_BOUNDS[name])
        for name, value in asked.items()
        if value is not None
    }
    if not wanted:
        raise ValidationFailed(NOTHING_TO_CHANGE)
    _require(
        actor=actor, chain=chain, needs=Role.OPERATOR, message=SETTINGS_ROLE, what="change settings",
        asked=dict(wanted),
    )  # fmt: skip
    with transaction.atomic():
        row = Chain.objects.select_for_update().get(pk=chain.pk)
        changes = {
            name: [getattr(row, name), value] for name, value in wanted.items() if getattr(row, name) != value
        }
        if not changes:
            return {}
        Chain.objects.filter(pk=row.pk).update(**{name: new for name, (_, new) in changes.items()})
        record(
            action=IndexerAction.SETTINGS_CHANGED,
            actor=actor,
            org=chain.org,
            target=row,
            reason=reason,
            changes=changes,
            metadata={"chain": chain.slug},
        )
    for name, (_, new) in changes.items():
        setattr(chain, name, new)
    return changes


def source_update_settings(
    *,
    source: SyncSource,
    actor: Actor,
    reason: str,
    priority: int | None = None,
    enabled: bool | None = None,
) -> dict[str, list[Any]]:
    """Re-prioritize, disable or enable a sync source (None: leave as is). Operator role. One
    transaction, one audit row. The running writer follows after its next step: a disabled source
    is no longer asked and goes disconnecting -> disconnected (an intentional disconnect); an enabled
    one is taken in. A refused source stays refused until `source_reenable`."""
    reason = clean_reason(reason)
    wanted: dict[str, Any] = {}
    if priority is not None:
        wanted["priority"] = _bounded("priority", priority, *SOURCE_PRIORITY_BOUNDS)
    if enabled is not None:
        if not isinstance(enabled, bool):
            raise ValidationFailed("enabled must be true or false", fields={"enabled": ["must be a boolean"]})
        wanted["enabled"] = enabled
    if not wanted:
        raise ValidationFailed(NOTHING_TO_CHANGE)
    chain = Chain.objects.select_related("org").get(pk=source.chain_id)
    _require(
        actor=actor, chain=chain, needs=Role.OPERATOR, message=SETTINGS_ROLE,
        what=f"change source {source.name}", asked=dict(wanted),
    )  # fmt: skip
    with transaction.atomic():
        row = SyncSource.objects.select_for_update().get(pk=source.pk)
        changes = {
            name: [getattr(row, name), value] for name, value in wanted.items() if getattr(row, name) != value
        }
        if not changes:
            return {}
        SyncSource.objects.filter(pk=row.pk).update(**{name: new for name, (_, new) in changes.items()})
        record(
            action=IndexerAction.SOURCE_SETTINGS_CHANGED,
            actor=actor,
            org=chain.org,
            target=row,
            reason=reason,
            changes=changes,
            metadata={"chain": chain.slug, "source": row.name},
        )
    for name, (_, new) in changes.items():
        setattr(source, name, new)
    return changes
