"""The moves into `scheduled`: migrate to a group, manual retry (one key or many), cool-down reset.

Each is one transaction through the transition kernel (`fleetops.lib.transition`): the keys are
locked in id order (like every other writer of keys, so no deadlock cycles), then moved by one
set-based `UPDATE … FROM (VALUES …)` per 1,000 rows that admits only the machine's edges into
`scheduled` from the state each key was read in, with the round counter incremented in the same
statement, and one audit row per moved key written with one INSERT (`BulkAudit`). The role is
derived from the actor (operator; the cool-down's scheduler acts as one) and checked before the
transaction opens, so a refusal's `access.denied` row commits. The early kick of the re-stake
schedule is an outbox message written in the same transaction (`kick_schedule`).

A key whose previous attempt is still pending is scheduled with `migration_next_attempt_at` NULL:
that attempt's verdict (recorded as superseded) releases it (see `migrations_app.models.keys`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F

from fleetops.access.models import Organization
from fleetops.access.roles import require_engine
from fleetops.audit.actors import Actor
from fleetops.audit.services import record
from fleetops.lib import clock
from fleetops.lib.errors import Conflict, NotFound, ValidationFailed
from fleetops.lib.reason import clean_reason
from fleetops.lib.transition import BulkAudit, transition, transition_rows
from migrations_app.keys.common import (
    KEYS_NOT_FOUND,
    MAX_KEY_IDS,
    TOO_MANY_IDS,
    KeyAction,
    MigrateResult,
    RetryResult,
    kick_schedule,
    max_attempts_for,
    require,
    role_to_enter,
)
from migrations_app.keys.metrics import OPERATIONS
from migrations_app.keys.selectors import KEY_NOT_FOUND, KeyFilter, group_get, keys_matching
from migrations_app.models.keys import (
    KEY_MIGRATION_GIVEN_UP,
    KEY_MIGRATION_MACHINE,
    KEY_MIGRATION_RETRYABLE,
    STAKE_TX_PENDING,
    Key,
    KeyMigrationStatus,
    KeyState,
    RemediationEntry,
    RemediationOutcome,
    StakeTransaction,
)

MIGRATE_CHUNK = 500
NOTHING_SELECTED = "give key_ids or at least one filter (address_group, states, owner_address)"
SAME_GROUP = "the target group is the source group of the filter"
NOT_RETRYABLE = 'key {address} is "{status}"; only failed or retrying keys can be retried'
RETIRED = "retired"
SCHEDULED = KeyMigrationStatus.SCHEDULED
# Key states an operator's migration clears: the key is staked again under its new group.
ATTENTION_STATES = (KeyState.ATTENTION_NEEDED, KeyState.REMEDIATION_FAILED)
# What a key is read as before it moves (locked, in id order).
LOCKED_FIELDS = ("pk", "org_id", "address", "migration_status", "migration_round", "retired_at", "state")


def _chunks(ids: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def _lock(keys: Any) -> list[dict[str, Any]]:
    return list(keys.select_for_update().order_by("pk").values(*LOCKED_FIELDS))


def _waiting(key_ids: Iterable[int]) -> set[int]:
    """Keys with an attempt still pending: their new round waits for its verdict."""
    return set(
        StakeTransaction.objects.filter(key_id__in=list(key_ids), status=STAKE_TX_PENDING).values_list(
            "key_id", flat=True
        )
    )


def _history(
    locked: Sequence[Mapping[str, Any]], moved: Iterable[int], *, outcome: str, message: str, actor: Actor
) -> None:
    """One history entry per moved key, in the new round (the round was locked, then incremented)."""
    now = clock.now()
    rounds = {row["pk"]: row["migration_round"] + 1 for row in locked}
    RemediationEntry.objects.bulk_create(
        [
            RemediationEntry(
                key_id=pk,
                round=rounds[pk],
                outcome=outcome,
                message=message[:300],
                actor_label=actor.label[:200],
                created_at=now,
            )
            for pk in moved
        ]
    )


# --- migrate ----------------------------------------------------------------------------------------


def _selected_ids(*, org: Organization, flt: KeyFilter, target_id: int) -> tuple[list[int], int]:
    if flt.key_ids is not None:
        if len(flt.key_ids) > MAX_KEY_IDS:
            raise ValidationFailed(TOO_MANY_IDS, fields={"key_ids": [TOO_MANY_IDS]})
        wanted = set(flt.key_ids)
        found = set(Key.objects.filter(org=org, pk__in=wanted).values_list("pk", flat=True))
        if missing := sorted(wanted - found):
            raise NotFound(KEYS_NOT_FOUND.format(ids=missing[:20]), fields={"key_ids": missing[:100]})
    elif flt.address_group_id is None and not flt.states and not flt.owner_address:
        raise ValidationFailed(NOTHING_SELECTED)
    if flt.address_group_id is not None and flt.address_group_id == target_id:
        raise ValidationFailed(SAME_GROUP, fields={"target_group": [SAME_GROUP]})
    if flt.states and (bad := sorted(set(flt.states) - set(KeyState.values))):
        raise ValidationFailed(f"unknown states {bad}", fields={"states": bad})
    ids = sorted(keys_matching(org=org, flt=flt).values_list("pk", flat=True))
    excluded = len(set(flt.key_ids)) - len(ids) if flt.key_ids is not None else 0
    return ids, excluded


def key_migrate_to_group(
    *,
    org: Organization,
    actor: Actor,
    target_group_id: int,
    flt: KeyFilter,
    dry_run: bool = False,
    reason: str = "",
) -> MigrateResult:
    """Move the selected keys to `target_group` and schedule their re-stake (operator).

    The dry run returns the exact id set and writes nothing; a caller that wants "exactly what I
    saw" passes those ids back (`KeyFilter(key_ids=...)`), so keys that match the filter later are
    not swept in. Retired keys are never moved. Per chunk of 500 keys:

    1. Lock the chunk in id order and read each key's status, round and state.
    2. One kernel UPDATE: every edge into `scheduled` from the status read, the group, a new round
       (`migration_round + 1` in the statement), attempts reset, operator-attention states back to
       `staked`; one audit row per key (`keys.migration_scheduled`), one INSERT.
    3. One history entry per key. Then one `keys.migrated` row on the target group for the command.
    """
    require(actor=actor, org=org, role=role_to_enter(KEY_MIGRATION_MACHINE, SCHEDULED), what="keys.migrate")
    reason = clean_reason(reason, required=False)
    target = group_get(org=org, pk=target_group_id)
    ids, excluded = _selected_ids(org=org, flt=flt, target_id=target.pk)
    if dry_run:
        return MigrateResult(dry_run=True, target_group=target, key_ids=ids, excluded_retired=excluded)
    now = clock.now()
    limit = max_attempts_for(org)
    moved: list[int] = []
    with transaction.atomic():
        for chunk in _chunks(ids, MIGRATE_CHUNK):
            locked = _lock(Key.objects.filter(org=org, pk__in=chunk, retired_at__isnull=True))
            waiting = _waiting(row["pk"] for row in locked)
            addresses = {row["pk"]: row["address"] for row in locked}
            before_state = {row["pk"]: row["state"] for row in locked}
            done = transition_rows(
                model=Key,
                machine=KEY_MIGRATION_MACHINE,
                rows=[
                    {
                        "pk": row["pk"],
                        "from": row["migration_status"],
                        "migration_next_attempt_at": None if row["pk"] in waiting else now,
                        "state": KeyState.STAKED if row["state"] in ATTENTION_STATES else row["state"],
                    }
                    for row in locked
                ],
                to=SCHEDULED,
                exact_from=True,
                set_fields=("migration_next_attempt_at", "state"),
                updates={
                    "address_group": target.pk,
                    "migration_attempts": 0,
                    "migration_max_attempts": limit,
                    "migration_last_error": "",
                    "migration_scheduled_at": now,
                    "migration_updated_at": now,
                },
                increments={"migration_round": 1},
                operation="keys_migrate",
                audit=BulkAudit(
                    action=KeyAction.SCHEDULED,
                    actor=actor,
                    org_of=org.pk,
                    reason=reason,
                    metadata={"target_group": target.name, "target_group_id": target.pk},
                    label_of=lambda row, addresses=addresses: addresses[row["pk"]],
                    # A key that needed attention is staked again: its supplier state changes too.
                    changes_of=lambda row, before=before_state: (
                        {"state": [before[row["pk"]], row["state"]]}
                        if before[row["pk"]] != row["state"]
                        else {}
                    ),
                ),
            )
            _history(
                locked,
                sorted(done),
                outcome=RemediationOutcome.MIGRATED,
                message=f"Key migrated to address group {target.name}",
                actor=actor,
            )
            moved.extend(sorted(done))
        record(
            action=KeyAction.MIGRATED,
            actor=actor,
            org=org,
            target=target,
            reason=reason,
            metadata={
                "count": len(moved),
                "target_group": target.name,
                "filter": flt.describe(),
                "key_ids": moved[:1000],
                "key_ids_truncated": len(moved) > 1000,
                "excluded_retired": excluded,
                "max_attempts": limit,
            },
        )
        kick_schedule()
    OPERATIONS.labels(operation="migrate", outcome="ok").inc()
    return MigrateResult(dry_run=False, target_group=target, key_ids=moved, excluded_retired=excluded)


# --- retry and cool-down reset ------------------------------------------------------------------


def _requeue(
    locked: Sequence[Mapping[str, Any]],
    *,
    actor: Actor,
    reason: str,
    outcome: str,
    action: str,
    manual: bool,
    operation: str,
) -> list[int]:
    """Back to `scheduled` with a fresh round, attempts reset and the org's attempt limit (inside
    the caller's transaction, rows locked). Returns the ids moved, in id order."""
    if not locked:
        return []
    now = clock.now()
    limits = {org_id: max_attempts_for(org_id) for org_id in {row["org_id"] for row in locked}}
    waiting = _waiting(row["pk"] for row in locked)
    by_pk = {row["pk"]: row for row in locked}
    moved = transition_rows(
        model=Key,
        machine=KEY_MIGRATION_MACHINE,
        rows=[
            {
                "pk": row["pk"],
                "from": row["migration_status"],
                "migration_max_attempts": limits[row["org_id"]],
                "migration_next_attempt_at": None if row["pk"] in waiting else now,
            }
            for row in locked
        ],
        to=SCHEDULED,
        exact_from=True,
        set_fields=("migration_max_attempts", "migration_next_attempt_at"),
        updates={"migration_attempts": 0, "migration_scheduled_at": now, "migration_updated_at": now},
        increments={"migration_round": 1, **({"migration_manual_retries": 1} if manual else {})},
        operation=operation,
        audit=BulkAudit(
            action=action,
            actor=actor,
            org_of=lambda row: by_pk[row["pk"]]["org_id"],
            reason=reason,
            metadata={"manual": manual},
            label_of=lambda row: by_pk[row["pk"]]["address"],
        ),
    )
    moved = sorted(moved)
    _history(locked, moved, outcome=outcome, message=reason, actor=actor)
    return moved


def keys_migration_retry(
    *, org: Organization, actor: Actor, key_ids: Sequence[int], reason: str
) -> RetryResult:
    """Re-queue failed or retrying keys (operator): attempts reset, `migration_manual_retries + 1`,
    history kept; one audit row per key with one INSERT per batch. Keys in another state are
    skipped (and said why); unknown ids are a 404."""
    require(
        actor=actor,
        org=org,
        role=role_to_enter(KEY_MIGRATION_MACHINE, SCHEDULED, KEY_MIGRATION_RETRYABLE),
        what="keys.migration_retry",
    )
    reason = clean_reason(reason)
    if len(key_ids) > MAX_KEY_IDS:
        raise ValidationFailed(TOO_MANY_IDS, fields={"key_ids": [TOO_MANY_IDS]})
    wanted = sorted(set(key_ids))
    result = RetryResult()
    with transaction.atomic():
        locked = _lock(Key.objects.filter(org=org, pk__in=wanted))
        if missing := sorted(set(wanted) - {row["pk"] for row in locked}):
            raise NotFound(KEYS_NOT_FOUND.format(ids=missing[:20]), fields={"key_ids": missing[:100]})
        retryable = []
        for row in locked:
            if why := _not_retryable(row):
                result.skipped[row["pk"]] = why
            else:
                retryable.append(row)
        result.retried = _requeue(
            retryable,
            actor=actor,
            reason=reason,
            outcome=RemediationOutcome.MANUAL_RETRY,
            action=KeyAction.RETRIED,
            manual=True,
            operation="keys_migration_retry",
        )
        if result.retried:
            kick_schedule()
    OPERATIONS.labels(operation="retry", outcome="ok").inc()
    return result


def _not_retryable(row: Mapping[str, Any]) -> str:
    if row["retired_at"] is not None:
        return RETIRED
    if row["migration_status"] not in KEY_MIGRATION_RETRYABLE:
        return NOT_RETRYABLE.format(address=row["address"], status=row["migration_status"])
    return ""


def key_migration_retry(*, key: Key, actor: Actor, reason: str) -> Key:
    """One key's manual retry (operator), a single-row kernel transition; a key that is neither
    failed nor retrying (or is retired) is a 409 and nothing is written."""
    org = key.org
    require(
        actor=actor,
        org=org,
        role=role_to_enter(KEY_MIGRATION_MACHINE, SCHEDULED, KEY_MIGRATION_RETRYABLE),
        what="keys.migration_retry",
        target=key,
    )
    reason = clean_reason(reason)
    with transaction.atomic():
        locked = _lock(Key.objects.filter(pk=key.pk))
        if not locked:
            raise NotFound(KEY_NOT_FOUND)
        row = locked[0]
        if why := _not_retryable(row):
            OPERATIONS.labels(operation="retry", outcome="state_conflict").inc()
            raise Conflict(why, code="state_conflict")
        now = clock.now()
        transition(
            key,
            machine=KEY_MIGRATION_MACHINE,
            to=SCHEDULED,
            actor=actor,
            org=org,
            action=KeyAction.RETRIED,
            reason=reason,
            expect=KEY_MIGRATION_RETRYABLE,
            where={"retired_at__isnull": True},
            updates={
                "migration_attempts": 0,
                "migration_max_attempts": max_attempts_for(org),
                "migration_next_attempt_at": None if _waiting([key.pk]) else now,
                "migration_round": F("migration_round") + 1,
                "migration_manual_retries": F("migration_manual_retries") + 1,
                "migration_scheduled_at": now,
                "migration_updated_at": now,
            },
            audit_fields=("migration_attempts", "migration_manual_retries", "migration_round"),
            metadata={"manual": True},
            check_role=False,  # `require` above, before the transaction (its refusal row commits)
        )
        _history([row], [key.pk], outcome=RemediationOutcome.MANUAL_RETRY, message=reason, actor=actor)
        kick_schedule()
    OPERATIONS.labels(operation="retry", outcome="ok").inc()
    key.refresh_from_db()
    return key


def keys_cooldown_reset(
    *, actor: Actor | None = None, cooldown_seconds: int | None = None, limit: int = 500
) -> int:
    """Failed keys whose round failed longer ago than the cool-down go back to `scheduled`: an
    engine step of the scheduler (it takes the operator edge failed -> scheduled). Off unless
    KEYS_COOLDOWN_RESET_SECONDS (or `cooldown_seconds`) is set. Keys locked by someone else are
    skipped until the next pass."""
    seconds = settings.FLEETOPS_KEYS_COOLDOWN_RESET_SECONDS if cooldown_seconds is None else cooldown_seconds
    if not seconds:
        return 0
    actor = actor or Actor.scheduler("keys.cooldown_reset")
    require_engine(actor=actor, org=None, what="keys.cooldown_reset")
    cutoff: datetime = clock.now() - timedelta(seconds=seconds)
    with transaction.atomic():
        locked = list(
            Key.objects.select_for_update(skip_locked=True)
            .filter(
                migration_status__in=KEY_MIGRATION_GIVEN_UP,
                migration_updated_at__lt=cutoff,
                retired_at__isnull=True,
            )
            .order_by("pk")
            .values(*LOCKED_FIELDS)[:limit]
        )
        moved = _requeue(
            locked,
            actor=actor,
            reason=f"cool-down of {seconds} s elapsed",
            outcome=RemediationOutcome.AUTO_RESET,
            action=KeyAction.AUTO_RESET,
            manual=False,
            operation="keys_cooldown_reset",
        )
    if moved:
        OPERATIONS.labels(operation="auto_reset", outcome="ok").inc(len(moved))
    return len(moved)
