"""Key re-stake writes: migrate to a group, manual retry, cool-down auto-reset, verdicts, config.

Every function is keyword-only, runs in one transaction, re-checks the role gate the API and admin
apply, and writes its audit row inside that transaction. Side effects (the early kick of the
re-stake schedule, notification sends) are queued with `transaction.on_commit`.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Case, Exists, F, Field, Model, OuterRef, Value, When

from fleetops.access.models import Organization, Role
from fleetops.audit.actors import Actor
from fleetops.audit.services import record
from fleetops.lib import clock
from fleetops.lib.backoff import backoff_delay
from fleetops.lib.cas import note_race_lost
from fleetops.lib.errors import Conflict, DomainError, Forbidden, ValidationFailed
from fleetops.notifications.services import notification_publish
from migrations_app.keys.metrics import ATTEMPTS, OPERATIONS, TRIGGER_FAILURES
from migrations_app.keys.selectors import KeyFilter, group_get, keys_matching
from migrations_app.models.keys import (
    KEY_MIGRATION_DUE,
    KEY_MIGRATION_RETRYABLE,
    AddressGroup,
    Key,
    KeyMigrationStatus,
    KeyState,
    OrgKeyConfig,
    RemediationEntry,
    RemediationOutcome,
    StakeTransaction,
    StakeTxStatus,
)

log = logging.getLogger(__name__)

MIGRATE_CHUNK = 500
MAX_KEY_IDS = 10_000
REASON_CAP = 500
FAILED_EVENT = "keys.migration_failed"

OPERATOR_REQUIRED = "This needs the operator role in the organization."
ADMIN_REQUIRED = "This needs the admin role in the organization."
NOT_A_MEMBER = "You are not a member of this organization (no role there)."
REASON_REQUIRED = f"reason is required (1-{REASON_CAP} characters, not blank)"
KEYS_NOT_FOUND = "key ids not found in this organization: {ids}"
NOTHING_SELECTED = "give key_ids or at least one filter (address_group, states, owner_address)"
SAME_GROUP = "the target group is the source group of the filter"
TOO_MANY_IDS = f"at most {MAX_KEY_IDS} key ids per call"
NOT_RETRYABLE = 'key {address} is "{status}"; only failed or retrying keys can be retried'
GROUP_HAS_KEYS = "address group {name} still has {n} key(s); migrate them first"


class KeyAction:
    """Audit actions of the key lifecycle."""

    MIGRATED = "keys.migrated"
    RETRIED = "keys.migration_retried"
    AUTO_RESET = "keys.migration_auto_reset"
    SUCCEEDED = "keys.migration_succeeded"
    ATTEMPT_FAILED = "keys.migration_attempt_failed"
    FAILED = "keys.migration_failed"
    CONFIG_UPDATED = "keys.config_updated"
    GROUP_SAVED = "keys.address_group_saved"
    GROUP_DELETED = "keys.address_group_deleted"


def _require(role: str | None, needed: Role) -> None:
    """Forbidden unless `role` is a known role at least `needed`. A non-member (None or "") or an
    unknown role string is Forbidden too, never a ValueError from the role ranking."""
    if role not in Role.values:
        raise Forbidden(NOT_A_MEMBER)
    if not Role.at_least(role, needed):
        raise Forbidden(OPERATOR_REQUIRED if needed == Role.OPERATOR else ADMIN_REQUIRED)


def _validate_reason(reason: str, *, required: bool = True) -> str:
    if (required and (not reason or not reason.strip())) or len(reason) > REASON_CAP:
        raise ValidationFailed(REASON_REQUIRED, fields={"reason": [REASON_REQUIRED]})
    return reason


def max_attempts_for(org: Organization | int) -> int:
    org_id = org if isinstance(org, int) else org.pk
    configured = OrgKeyConfig.objects.filter(org_id=org_id).values_list("max_attempts", flat=True).first()
    return int(configured or settings.FLEETOPS_KEYS_MAX_ATTEMPTS)


def rows_update(
    model: type[Model], objs: Sequence[Model], fields: Sequence[str], *, chunk: int = 1000
) -> None:
    """Write `fields` of `objs` back with `UPDATE ... FROM (VALUES ...)`, one statement per chunk.

    Django's bulk_update builds one CASE WHEN per field with a branch per row, which PostgreSQL
    evaluates per row: quadratic, minutes for a verdict batch of a few thousand rows.
    """
    if not objs:
        return
    meta = model._meta
    columns: list[Field[Any, Any]] = []
    for name in fields:
        field = meta.get_field(name)
        assert isinstance(field, Field)
        columns.append(field)
    casts = [c.db_type(connection) or "text" for c in columns]
    names = [str(c.column) for c in columns]
    placeholder = "(%s::bigint, " + ", ".join(f"%s::{cast}" for cast in casts) + ")"
    sets = ", ".join(f"{name} = v.{name}" for name in names)
    with connection.cursor() as cursor:
        for start in range(0, len(objs), chunk):
            part = objs[start : start + chunk]
            params: list[Any] = []
            for obj in part:
                params.append(obj.pk)
                params += [c.get_db_prep_save(getattr(obj, c.attname), connection) for c in columns]
            cursor.execute(
                f"UPDATE {meta.db_table} AS t SET {sets} "  # noqa: S608 - names from the model
                f"FROM (VALUES {', '.join([placeholder] * len(part))}) AS v(id, {', '.join(names)}) "
                "WHERE t.id = v.id",
                params,
            )


def _pending_of(key: Any) -> Any:
    return StakeTransaction.objects.filter(key=key, status=StakeTxStatus.PENDING)


def _chunks(ids: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def _kick_schedule() -> None:
    """The early kick after a migration: an optimization only. The beat claims the keys within
    30 s anyway, so a broker outage is logged and counted, never reported as a failed migration."""
    try:
        from migrations_app.keys.tasks import restake

        restake.apply_async(expires=25)
    except Exception:
        TRIGGER_FAILURES.inc()
        log.warning("re-stake schedule kick failed; the next beat picks the keys up", exc_info=True)


@dataclass(frozen=True)
class MigrateResult:
    dry_run: bool
    target_group: AddressGroup
    key_ids: list[int]
    excluded_retired: int = 0

    @property
    def count(self) -> int:
        return len(self.key_ids)


def _selected_ids(*, org: Organization, flt: KeyFilter, target: AddressGroup) -> tuple[list[int], int]:
    if flt.key_ids is not None:
        if len(flt.key_ids) > MAX_KEY_IDS:
            raise ValidationFailed(TOO_MANY_IDS, fields={"key_ids": [TOO_MANY_IDS]})
        wanted = set(flt.key_ids)
        found = dict(Key.objects.filter(org=org, pk__in=wanted).values_list("pk", "retired_at"))
        if missing := sorted(wanted - set(found)):
            from fleetops.lib.errors import NotFound

            raise NotFound(KEYS_NOT_FOUND.format(ids=missing[:20]), fields={"key_ids": missing[:100]})
    elif flt.address_group_id is None and not flt.states and not flt.owner_address:
        raise ValidationFailed(NOTHING_SELECTED)
    if flt.address_group_id is not None and flt.address_group_id == target.pk:
        raise ValidationFailed(SAME_GROUP, fields={"target_group": [SAME_GROUP]})
    if flt.states and (bad := sorted(set(flt.states) - set(KeyState.values))):
        raise ValidationFailed(f"unknown states {bad}", fields={"states": bad})
    ids = sorted(keys_matching(org=org, flt=flt).values_list("pk", flat=True))
    excluded = 0
    if flt.key_ids is not None:
        excluded = len(set(flt.key_ids)) - len(ids)
    return ids, excluded


def key_migrate_to_group(
    *,
    org: Organization,
    actor: Actor,
    role: str | None,
    target_group_id: int,
    flt: KeyFilter,
    dry_run: bool = False,
    reason: str = "",
) -> MigrateResult:
    """Move the selected keys to `target_group` and schedule their re-stake.

    The dry run returns the exact id set and writes nothing; a caller that wants "exactly what I
    saw" passes those ids back (`KeyFilter(key_ids=...)`), so keys that match the filter later are
    not swept in. Retired keys are never moved.
    """
    _require(role, Role.OPERATOR)
    _validate_reason(reason, required=False)
    target = group_get(org=org, pk=target_group_id)
    ids, excluded = _selected_ids(org=org, flt=flt, target=target)
    if dry_run:
        return MigrateResult(dry_run=True, target_group=target, key_ids=ids, excluded_retired=excluded)
    now = clock.now()
    limit = max_attempts_for(org)
    moved: list[int] = []
    with transaction.atomic():
        for chunk in _chunks(ids, MIGRATE_CHUNK):
            # 1. Lock the chunk (id order, like every other writer of keys: no deadlock cycles).
            locked = list(
                Key.objects.select_for_update()
                .filter(org=org, pk__in=chunk, retired_at__isnull=True)
                .order_by("pk")
                .values_list("pk", flat=True)
            )
            # 2. One UPDATE: group, a new round, scheduled now; operator-attention states reset.
            Key.objects.filter(pk__in=locked).update(
                address_group=target,
                migration_status=KeyMigrationStatus.SCHEDULED,
                migration_attempts=0,
                migration_max_attempts=limit,
                # A key whose previous attempt is still pending waits for that verdict to release it.
                migration_next_attempt_at=Case(
                    When(Exists(_pending_of(OuterRef("pk"))), then=Value(None)),
                    default=Value(now),
                ),
                migration_last_error="",
                migration_round=F("migration_round") + 1,
                migration_scheduled_at=now,
                migration_updated_at=now,
                state=Case(
                    When(
                        state__in=(KeyState.ATTENTION_NEEDED, KeyState.REMEDIATION_FAILED),
                        then=Value(KeyState.STAKED),
                    ),
                    default=F("state"),
                ),
            )
            rounds = Key.objects.filter(pk__in=locked).values_list("pk", "migration_round")
            RemediationEntry.objects.bulk_create(
                [
                    RemediationEntry(
                        key_id=pk,
                        round=round_,
                        outcome=RemediationOutcome.MIGRATED,
                        message=f"Key migrated to address group {target.name}",
                        actor_label=actor.label[:200],
                        created_at=now,
                    )
                    for pk, round_ in rounds
                ]
            )
            moved.extend(locked)
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
        transaction.on_commit(_kick_schedule)
    OPERATIONS.labels(operation="migrate", outcome="ok").inc()
    return MigrateResult(dry_run=False, target_group=target, key_ids=moved, excluded_retired=excluded)


@dataclass
class RetryResult:
    retried: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)


def _requeue(
    *,
    keys: Sequence[Key],
    actor: Actor,
    reason: str,
    outcome: str,
    action: str,
    manual: bool,
) -> None:
    """Back to `scheduled` with a fresh round (inside the caller's transaction, rows locked)."""
    now = clock.now()
    limits: dict[int, int] = {}
    for key in keys:
        if key.org_id not in limits:
            limits[key.org_id] = max_attempts_for(key.org_id)
    waiting = set(
        StakeTransaction.objects.filter(
            key_id__in=[k.pk for k in keys], status=StakeTxStatus.PENDING
        ).values_list("key_id", flat=True)
    )
    for key in keys:
        before = {
            "migration_status": key.migration_status,
            "migration_attempts": key.migration_attempts,
            "migration_manual_retries": key.migration_manual_retries,
        }
        key.migration_status = KeyMigrationStatus.SCHEDULED
        key.migration_attempts = 0
        key.migration_max_attempts = limits[key.org_id]
        key.migration_next_attempt_at = None if key.pk in waiting else now
        key.migration_round += 1
        key.migration_scheduled_at = now
        key.migration_updated_at = now
        if manual:
            key.migration_manual_retries += 1
        after = {
            "migration_status": key.migration_status,
            "migration_attempts": 0,
            "migration_manual_retries": key.migration_manual_retries,
        }
        record(
            action=action,
            actor=actor,
            org=key.org,
            target=key,
            reason=reason,
            changes={k: [before[k], after[k]] for k in before if before[k] != after[k]},
            metadata={"round": key.migration_round, "last_error": key.migration_last_error[:500]},
        )
    rows_update(
        Key,
        keys,
        [
            "migration_status",
            "migration_attempts",
            "migration_max_attempts",
            "migration_next_attempt_at",
            "migration_round",
            "migration_scheduled_at",
            "migration_updated_at",
            "migration_manual_retries",
        ],
    )
    RemediationEntry.objects.bulk_create(
        [
            RemediationEntry(
                key=key,
                round=key.migration_round,
                outcome=outcome,
                message=reason[:300],
                actor_label=actor.label[:200],
                created_at=now,
            )
            for key in keys
        ]
    )


def keys_migration_retry(
    *, org: Organization, actor: Actor, role: str | None, key_ids: Sequence[int], reason: str
) -> RetryResult:
    """Re-queue failed or retrying keys: attempts reset, `migration_manual_retries + 1`, history
    kept. Keys in another state are skipped (and said why); unknown ids are a 404."""
    _require(role, Role.OPERATOR)
    _validate_reason(reason)
    if len(key_ids) > MAX_KEY_IDS:
        raise ValidationFailed(TOO_MANY_IDS, fields={"key_ids": [TOO_MANY_IDS]})
    wanted = sorted(set(key_ids))
    result = RetryResult()
    with transaction.atomic():
        keys = list(Key.objects.select_for_update().filter(org=org, pk__in=wanted).order_by("pk"))
        if missing := sorted(set(wanted) - {k.pk for k in keys}):
            from fleetops.lib.errors import NotFound

            raise NotFound(KEYS_NOT_FOUND.format(ids=missing[:20]), fields={"key_ids": missing[:100]})
        retryable = []
        for key in keys:
            if key.retired_at is not None:
                result.skipped[key.pk] = "retired"
            elif key.migration_status not in KEY_MIGRATION_RETRYABLE:
                result.skipped[key.pk] = NOT_RETRYABLE.format(
                    address=key.address, status=key.migration_status
                )
            else:
                retryable.append(key)
        for key in retryable:
            key.org = org
        _requeue(
            keys=retryable,
            actor=actor,
            reason=reason,
            outcome=RemediationOutcome.MANUAL_RETRY,
            action=KeyAction.RETRIED,
            manual=True,
        )
        result.retried = [k.pk for k in retryable]
        if retryable:
            transaction.on_commit(_kick_schedule)
    OPERATIONS.labels(operation="retry", outcome="ok").inc()
    return result


def key_migration_retry(*, key: Key, actor: Actor, role: str | None, reason: str) -> Key:
    """One key's manual retry; a key that is neither failed nor retrying is a 409."""
    result = keys_migration_retry(org=key.org, actor=actor, role=role, key_ids=[key.pk], reason=reason)
    if key.pk in result.skipped:
        OPERATIONS.labels(operation="retry", outcome="state_conflict").inc()
        raise Conflict(result.skipped[key.pk], code="state_conflict")
    key.refresh_from_db()
    return key


def keys_cooldown_reset(*, cooldown_seconds: int | None = None, limit: int = 500) -> int:
    """Failed keys whose round failed longer ago than the cool-down go back to `scheduled` (actor
    `scheduler`). Off unless KEYS_COOLDOWN_RESET_SECONDS (or `cooldown_seconds`) is set."""
    seconds = settings.FLEETOPS_KEYS_COOLDOWN_RESET_SECONDS if cooldown_seconds is None else cooldown_seconds
    if not seconds:
        return 0
    cutoff = clock.now() - timedelta(seconds=seconds)
    actor = Actor.scheduler("keys.cooldown_reset")
    with transaction.atomic():
        keys = list(
            Key.objects.select_for_update(skip_locked=True)
            .select_related("org")
            .filter(
                migration_status=KeyMigrationStatus.FAILED,
                migration_updated_at__lt=cutoff,
                retired_at__isnull=True,
            )
            .order_by("pk")[:limit]
        )
        _requeue(
            keys=keys,
            actor=actor,
            reason=f"cool-down of {seconds} s elapsed",
            outcome=RemediationOutcome.AUTO_RESET,
            action=KeyAction.AUTO_RESET,
            manual=False,
        )
    if keys:
        OPERATIONS.labels(operation="auto_reset", outcome="ok").inc(len(keys))
    return len(keys)


# --- verdicts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The terminal outcome of one stake transaction, as verification or the broadcast saw it."""

    tx_id: int
    success: bool
    code: int | None = None
    message: str = ""
    landed_height: int | None = None
    kind: str = "confirmed"  # confirmed | rejected | expired


@dataclass
class ResolveStats:
    succeeded: list[int] = field(default_factory=list)
    retrying: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    superseded: list[int] = field(default_factory=list)
    races_lost: int = 0


_rng = random.Random()  # noqa: S311 - retry jitter, not cryptography


def _retry_delay(attempt: int) -> float:
    return backoff_delay(
        attempt,
        base=float(settings.FLEETOPS_KEYS_BACKOFF_BASE_SECONDS),
        cap=float(settings.FLEETOPS_KEYS_BACKOFF_CAP_SECONDS),
        rng=_rng,
    )


def stake_txs_resolve(*, verdicts: Sequence[Verdict], actor: Actor) -> ResolveStats:
    """Apply terminal verdicts in one transaction.

    1. Compare-and-set on the transactions: only rows still `pending` move (locked in id order); a
       verdict for a row somebody else resolved is a lost race, counted, never applied twice.
    2. The keys of the winners, locked: a key still on the attempt the transaction belongs to
       (same round, same attempt number, in flight) takes the verdict — success → `succeeded`;
       failure → `retrying` after backoff with jitter, or `failed` at the attempt limit. No height
       or "last updated" guard: a transaction that landed late must still flip its key. A key the
       operator has moved on (migrated again, retried) only gets a `superseded` history entry.
    3. History entries, audit rows and the failure notification, in the same transaction.
    """
    stats = ResolveStats()
    if not verdicts:
        return stats
    by_id = {v.tx_id: v for v in verdicts}
    now = clock.now()
    with transaction.atomic():
        txs = list(
            StakeTransaction.objects.select_for_update()
            .filter(pk__in=by_id, status=StakeTxStatus.PENDING)
            .order_by("pk")
        )
        stats.races_lost = len(by_id) - len(txs)
        for _ in range(stats.races_lost):
            note_race_lost("keys_stake_tx_resolve")
        if not txs:
            return stats
        for tx in txs:
            verdict = by_id[tx.pk]
            tx.status = StakeTxStatus.SUCCESS if verdict.success else StakeTxStatus.FAILURE
            tx.code = verdict.code
            tx.message = verdict.message[:2000]
            tx.landed_height = verdict.landed_height
            tx.resolved_at = now
        rows_update(StakeTransaction, txs, ["status", "code", "message", "landed_height", "resolved_at"])

        keys = {
            k.pk: k
            for k in Key.objects.select_for_update()
            .select_related("org")
            .filter(pk__in={tx.key_id for tx in txs})
            .order_by("pk")
        }
        changed: list[Key] = []
        entries: list[RemediationEntry] = []
        succeeded_by_org: dict[int, list[Key]] = defaultdict(list)
        failed_by_org: dict[int, list[Key]] = defaultdict(list)
        for tx in txs:
            verdict = by_id[tx.pk]
            key = keys[tx.key_id]
            current = (
                key.migration_round == tx.round
                and key.migration_attempts == tx.attempt
                and key.migration_status in KEY_MIGRATION_DUE
                and key.migration_next_attempt_at is None
            )
            entry = RemediationEntry(
                key=key,
                round=tx.round,
                attempt=tx.attempt,
                tx_hash=tx.hash,
                result_code=verdict.code,
                error="" if verdict.success else verdict.message[:2000],
                actor_label=actor.label[:200],
                created_at=now,
            )
            entries.append(entry)
            if not current:
                entry.outcome = RemediationOutcome.SUPERSEDED
                entry.message = f"{'success' if verdict.success else 'failure'} of a superseded attempt"
                stats.superseded.append(key.pk)
                if key.migration_status in KEY_MIGRATION_DUE and key.migration_next_attempt_at is None:
                    # The key's new round was waiting for this (its only) pending attempt: release it.
                    key.migration_next_attempt_at = now
                    key.migration_updated_at = now
                    changed.append(key)
                continue
            status_before = key.migration_status
            key.migration_updated_at = now
            changed.append(key)
            if verdict.success:
                key.migration_status = KeyMigrationStatus.SUCCEEDED
                key.migration_last_error = ""
                if key.state in (KeyState.REMEDIATION_FAILED, KeyState.STAKING):
                    key.state = KeyState.STAKED
                entry.outcome = RemediationOutcome.SUCCEEDED
                entry.message = f"Re-staked at height {verdict.landed_height}"
                stats.succeeded.append(key.pk)
                succeeded_by_org[key.org_id].append(key)
                continue
            key.migration_last_error = verdict.message[:2000]
            if key.migration_attempts < key.migration_max_attempts:
                delay = _retry_delay(key.migration_attempts)
                key.migration_status = KeyMigrationStatus.RETRYING
                key.migration_next_attempt_at = now + timedelta(seconds=delay)
                entry.outcome = RemediationOutcome.ATTEMPT_FAILED
                entry.message = (
                    f"Attempt {tx.attempt} of {key.migration_max_attempts} failed; next in {delay:.0f} s"
                )
                stats.retrying.append(key.pk)
                action = KeyAction.ATTEMPT_FAILED
                status_after = KeyMigrationStatus.RETRYING
            else:
                key.migration_status = KeyMigrationStatus.FAILED
                entry.outcome = RemediationOutcome.FAILED
                entry.message = f"Failed after {tx.attempt} attempt(s)"
                stats.failed.append(key.pk)
                failed_by_org[key.org_id].append(key)
                action = KeyAction.FAILED
                status_after = KeyMigrationStatus.FAILED
            record(
                action=action,
                actor=actor,
                org=key.org,
                target=key,
                reason=verdict.message[:500],
                changes={"migration_status": [status_before, status_after]},
                metadata={
                    "attempt": tx.attempt,
                    "max_attempts": key.migration_max_attempts,
                    "round": tx.round,
                    "tx_hash": tx.hash,
                    "code": verdict.code,
                    "kind": verdict.kind,
                    "next_attempt_at": key.migration_next_attempt_at,
                },
            )
        rows_update(
            Key,
            changed,
            [
                "migration_status",
                "migration_next_attempt_at",
                "migration_last_error",
                "migration_updated_at",
                "state",
            ],
        )
        RemediationEntry.objects.bulk_create(entries)
        for group in succeeded_by_org.values():
            org = group[0].org
            record(
                action=KeyAction.SUCCEEDED,
                actor=actor,
                org=org,
                target_type="migrations_app.key",
                target_id=str(group[0].pk) if len(group) == 1 else "",
                target_label=group[0].address if len(group) == 1 else f"{len(group)} keys",
                metadata={"count": len(group), "key_ids": [k.pk for k in group]},
            )
        for group in failed_by_org.values():
            _notify_failed(group)
    for result, ids in (
        ("succeeded", stats.succeeded),
        ("retrying", stats.retrying),
        ("failed", stats.failed),
        ("superseded", stats.superseded),
    ):
        if ids:
            ATTEMPTS.labels(result=result).inc(len(ids))
    return stats


def _notify_failed(keys: Sequence[Key]) -> None:
    org = keys[0].org
    addresses = [k.address for k in keys]
    subject = (
        f"Key re-stake failed: {addresses[0]}"
        if len(keys) == 1
        else f"Key re-stake failed for {len(keys)} keys"
    )
    body = "\n".join(
        f"{k.address}: failed after {k.migration_attempts} attempt(s): {k.migration_last_error[:200]}"
        for k in keys
    )
    notification_publish(
        org=org,
        event_type=FAILED_EVENT,
        subject=subject,
        body=body + "\n\nRetry them from the Keys page once the cause is fixed.",
        payload={
            "keys": [
                {
                    "id": k.pk,
                    "address": k.address,
                    "attempts": k.migration_attempts,
                    "error": k.migration_last_error[:500],
                }
                for k in keys
            ]
        },
    )


# --- configuration --------------------------------------------------------------------------------

CONFIG_FIELDS = ("rpc_url", "max_attempts")


def key_config_update(
    *, org: Organization, actor: Actor, role: str | None, values: dict[str, Any]
) -> OrgKeyConfig:
    """Admins point the organization's re-stakes at a chain and set its attempt limit."""
    _require(role, Role.ADMIN)
    if unknown := set(values) - set(CONFIG_FIELDS):
        raise ValidationFailed(f"unknown fields {sorted(unknown)}")
    with transaction.atomic():
        config, _ = OrgKeyConfig.objects.select_for_update().get_or_create(org=org)
        changes = {k: [getattr(config, k), v] for k, v in values.items() if getattr(config, k) != v}
        if not changes:
            return config
        for key, value in values.items():
            setattr(config, key, value)
        try:
            config.full_clean()
        except Exception as exc:
            raise ValidationFailed(str(exc)) from exc
        config.save()
        record(action=KeyAction.CONFIG_UPDATED, actor=actor, org=org, target=config, changes=changes)
    return config


GROUP_FIELDS = (
    "name",
    "services",
    "relay_miner",
    "region",
    "operator_shares",
    "supplier_share_percentage",
    "private",
)


def address_group_save(
    *, org: Organization, actor: Actor, role: str | None, group: AddressGroup | None, values: dict[str, Any]
) -> AddressGroup:
    """Create or change an address group (admin). Existing keys are not re-staked by this; migrate
    them to re-stake."""
    _require(role, Role.ADMIN)
    if unknown := set(values) - set(GROUP_FIELDS):
        raise ValidationFailed(f"unknown fields {sorted(unknown)}")
    services = values.get("services")
    if services is not None and (
        not isinstance(services, list) or not all(isinstance(s, str) and s for s in services)
    ):
        raise ValidationFailed("services must be a list of service ids", fields={"services": ["invalid"]})
    with transaction.atomic():
        if group is None:
            group, before = AddressGroup(org=org), {}
        else:
            group = AddressGroup.objects.select_for_update().get(pk=group.pk, org=org)
            before = {k: getattr(group, k) for k in GROUP_FIELDS}
        for key, value in values.items():
            setattr(group, key, value)
        try:
            group.full_clean()
        except Exception as exc:
            raise ValidationFailed(str(exc)) from exc
        group.save()
        after = {k: getattr(group, k) for k in GROUP_FIELDS}
        record(
            action=KeyAction.GROUP_SAVED,
            actor=actor,
            org=org,
            target=group,
            changes={k: [before.get(k), after[k]] for k in GROUP_FIELDS if before.get(k) != after[k]},
        )
    return group


def address_group_delete(*, group: AddressGroup, actor: Actor, role: str | None) -> None:
    _require(role, Role.ADMIN)
    with transaction.atomic():
        locked = AddressGroup.objects.select_for_update().get(pk=group.pk)
        if n := Key.objects.filter(address_group=locked).count():
            raise Conflict(GROUP_HAS_KEYS.format(name=locked.name, n=n), code="group_has_keys")
        record(action=KeyAction.GROUP_DELETED, actor=actor, org=locked.org, target=locked)
        locked.delete()


__all__ = [
    "DomainError",
    "KeyAction",
    "KeyFilter",
    "MigrateResult",
    "ResolveStats",
    "RetryResult",
    "Verdict",
    "address_group_delete",
    "address_group_save",
    "key_config_update",
    "key_migrate_to_group",
    "key_migration_retry",
    "keys_cooldown_reset",
    "keys_migration_retry",
    "stake_txs_resolve",
]
