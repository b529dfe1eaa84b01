"""Verdicts: the terminal outcome of stake transactions moves the transactions and their keys.

An engine service (the re-stake schedule for CheckTx refusals, verification for everything else):
only the portal's own processes call it (`require_engine`, audited refusal otherwise).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction

from fleetops.access.models import Organization
from fleetops.access.roles import require_engine
from fleetops.audit.actors import Actor
from fleetops.audit.services import record_many
from fleetops.lib import clock
from fleetops.lib.backoff import backoff_delay
from fleetops.lib.cas import note_race_lost
from fleetops.lib.transition import transition_rows
from fleetops.notifications.services import notification_publish
from migrations_app.keys.common import FAILED_EVENT, KeyAction, ResolveStats, Verdict
from migrations_app.keys.metrics import ATTEMPTS
from migrations_app.models.keys import (
    KEY_MIGRATION_DUE,
    KEY_MIGRATION_MACHINE,
    STAKE_TX_MACHINE,
    Key,
    KeyMigrationStatus,
    KeyState,
    RemediationEntry,
    RemediationOutcome,
    StakeTransaction,
    StakeTxStatus,
)

# On success the key is staked again if the migration had it staking or failed to remediate.
RESTAKED_FROM = (KeyState.REMEDIATION_FAILED, KeyState.STAKING)
KEY_FIELDS = (
    "pk",
    "org_id",
    "address",
    "state",
    "migration_status",
    "migration_round",
    "migration_attempts",
    "migration_max_attempts",
    "migration_next_attempt_at",
)
ACTION_OF = {
    KeyMigrationStatus.SUCCEEDED: KeyAction.SUCCEEDED,
    KeyMigrationStatus.RETRYING: KeyAction.ATTEMPT_FAILED,
    KeyMigrationStatus.FAILED: KeyAction.FAILED,
}

_rng = random.Random()  # noqa: S311 - retry jitter, not cryptography


def _retry_delay(attempt: int) -> float:
    return backoff_delay(
        attempt,
        base=float(settings.FLEETOPS_KEYS_BACKOFF_BASE_SECONDS),
        cap=float(settings.FLEETOPS_KEYS_BACKOFF_CAP_SECONDS),
        rng=_rng,
    )


def _in_flight(key: Mapping[str, Any]) -> bool:
    return key["migration_status"] in KEY_MIGRATION_DUE and key["migration_next_attempt_at"] is None


def stake_txs_resolve(*, verdicts: Sequence[Verdict], actor: Actor) -> ResolveStats:
    """Apply terminal verdicts in one transaction.

    1. Lock the transactions still pending, in id order (every resolver locks transactions, then
       keys, each in id order: no deadlock cycles). A verdict for a row somebody else resolved is a
       lost race, counted once, never applied twice. The rest move `pending -> success | failure`
       through the kernel (one set-based UPDATE).
    2. Lock their keys. A key still on the attempt the transaction belongs to (same round, same
       attempt number, in flight) takes the verdict — success → `succeeded`; failure → `retrying`
       after backoff with jitter, or `failed` at the attempt limit — through the kernel, from the
       status read. No height or "last updated" guard: a transaction that landed late must still
       flip its key. A key the operator has moved on (migrated again, retried) only gets a
       `superseded` history entry, and is released if its new round was waiting for this attempt.
    3. History entries, one audit row per moved key (one INSERT per outcome) and the failure
       notification, in the same transaction.
    """
    stats = ResolveStats()
    if not verdicts:
        return stats
    require_engine(actor=actor, org=None, what="keys.stake_tx_resolve")
    by_id = {v.tx_id: v for v in verdicts}
    now = clock.now()
    with transaction.atomic():
        txs = list(
            StakeTransaction.objects.select_for_update()
            .filter(pk__in=by_id, status__in=STAKE_TX_MACHINE.non_terminal)
            .order_by("pk")
            .values("pk", "key_id", "round", "attempt", "hash", "status")
        )
        stats.races_lost = len(by_id) - len(txs)
        if stats.races_lost:
            note_race_lost("keys_stake_tx_resolve", expected=len(by_id), changed=len(txs))
        if not txs:
            return stats
        resolved = set(
            transition_rows(
                model=StakeTransaction,
                machine=STAKE_TX_MACHINE,
                rows=[
                    {
                        "pk": tx["pk"],
                        "from": tx["status"],
                        "to": StakeTxStatus.SUCCESS if by_id[tx["pk"]].success else StakeTxStatus.FAILURE,
                        "code": by_id[tx["pk"]].code,
                        "message": by_id[tx["pk"]].message[:2000],
                        "landed_height": by_id[tx["pk"]].landed_height,
                    }
                    for tx in txs
                ],
                exact_from=True,
                set_fields=("code", "message", "landed_height"),
                updates={"resolved_at": now},
                operation="keys_stake_tx_resolve",
            )
        )
        txs = [tx for tx in txs if tx["pk"] in resolved]
        keys = {
            k["pk"]: k
            for k in Key.objects.select_for_update()
            .filter(pk__in={tx["key_id"] for tx in txs})
            .order_by("pk")
            .values(*KEY_FIELDS)
        }
        _apply(txs, keys, by_id=by_id, actor=actor, stats=stats)
    for result, ids in (
        ("succeeded", stats.succeeded),
        ("retrying", stats.retrying),
        ("failed", stats.failed),
        ("superseded", stats.superseded),
    ):
        if ids:
            ATTEMPTS.labels(result=result).inc(len(ids))
    return stats


def _apply(
    txs: Sequence[Mapping[str, Any]],
    keys: Mapping[int, Mapping[str, Any]],
    *,
    by_id: Mapping[int, Verdict],
    actor: Actor,
    stats: ResolveStats,
) -> None:
    """Step 2-3 of `stake_txs_resolve`, inside its transaction, transactions and keys locked."""
    now = clock.now()
    moves: list[dict[str, Any]] = []
    audits: dict[str, list[dict[str, Any]]] = defaultdict(list)
    entries: list[RemediationEntry] = []
    released: list[int] = []
    for tx in txs:
        verdict = by_id[tx["pk"]]
        key = keys[tx["key_id"]]
        entry = RemediationEntry(
            key_id=key["pk"],
            round=tx["round"],
            attempt=tx["attempt"],
            tx_hash=tx["hash"],
            result_code=verdict.code,
            error="" if verdict.success else verdict.message[:2000],
            actor_label=actor.label[:200],
            created_at=now,
        )
        entries.append(entry)
        current = (
            key["migration_round"] == tx["round"]
            and key["migration_attempts"] == tx["attempt"]
            and _in_flight(key)
        )
        if not current:
            entry.outcome = RemediationOutcome.SUPERSEDED
            entry.message = f"{'success' if verdict.success else 'failure'} of a superseded attempt"
            stats.superseded.append(key["pk"])
            if _in_flight(key):
                # The key's new round was waiting for this (its only) pending attempt: release it.
                released.append(key["pk"])
            continue
        move: dict[str, Any] = {
            "pk": key["pk"],
            "from": key["migration_status"],
            "migration_next_attempt_at": None,
            "migration_last_error": verdict.message[:2000],
            "state": key["state"],
        }
        if verdict.success:
            move.update(to=KeyMigrationStatus.SUCCEEDED, migration_last_error="")
            if key["state"] in RESTAKED_FROM:
                move["state"] = KeyState.STAKED
            entry.outcome = RemediationOutcome.SUCCEEDED
            entry.message = f"Re-staked at height {verdict.landed_height}"
            stats.succeeded.append(key["pk"])
        elif key["migration_attempts"] < key["migration_max_attempts"]:
            delay = _retry_delay(key["migration_attempts"])
            move.update(
                to=KeyMigrationStatus.RETRYING, migration_next_attempt_at=now + timedelta(seconds=delay)
            )
            entry.outcome = RemediationOutcome.ATTEMPT_FAILED
            entry.message = (
                f"Attempt {tx['attempt']} of {key['migration_max_attempts']} failed; next in {delay:.0f} s"
            )
            stats.retrying.append(key["pk"])
        else:
            move.update(to=KeyMigrationStatus.FAILED)
            entry.outcome = RemediationOutcome.FAILED
            entry.message = f"Failed after {tx['attempt']} attempt(s)"
            stats.failed.append(key["pk"])
        moves.append(move)
        audits[ACTION_OF[move["to"]]].append(
            {
                "org_id": key["org_id"],
                "target_type": "migrations_app.key",
                "target_id": str(key["pk"]),
                "target_label": key["address"],
                "changes": {
                    "migration_status": [move["from"], move["to"]],
                    **({"state": [key["state"], move["state"]]} if move["state"] != key["state"] else {}),
                },
                "metadata": {
                    "attempt": tx["attempt"],
                    "max_attempts": key["migration_max_attempts"],
                    "round": tx["round"],
                    "tx_hash": tx["hash"],
                    "code": verdict.code,
                    "kind": verdict.kind,
                    "error": "" if verdict.success else verdict.message[:500],
                    "next_attempt_at": move["migration_next_attempt_at"],
                },
            }
        )
    moved = set(
        transition_rows(
            model=Key,
            machine=KEY_MIGRATION_MACHINE,
            rows=moves,
            exact_from=True,
            set_fields=("migration_next_attempt_at", "migration_last_error", "state"),
            updates={"migration_updated_at": now},
            operation="keys_migration_verdict",
        )
    )
    if released:
        # Not a status change: the waiting round's next attempt becomes due (still in flight: the
        # key is locked, so this only re-checks what was read).
        Key.objects.filter(
            pk__in=released, migration_status__in=KEY_MIGRATION_DUE, migration_next_attempt_at__isnull=True
        ).update(migration_next_attempt_at=now, migration_updated_at=now)
    RemediationEntry.objects.bulk_create(entries)
    for action, rows in audits.items():
        record_many(action=action, actor=actor, entries=[r for r in rows if int(r["target_id"]) in moved])
    failed = [keys[pk] for pk in stats.failed if pk in moved]
    by_org: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for key in failed:
        by_org[key["org_id"]].append(key)
    orgs = Organization.objects.in_bulk(list(by_org))
    last_error = {m["pk"]: m["migration_last_error"] for m in moves}
    for org_id, group in by_org.items():
        _notify_failed(orgs[org_id], group, last_error)


def _notify_failed(
    org: Organization, keys: Sequence[Mapping[str, Any]], last_error: Mapping[int, str]
) -> None:
    addresses = [k["address"] for k in keys]
    subject = (
        f"Key re-stake failed: {addresses[0]}"
        if len(keys) == 1
        else f"Key re-stake failed for {len(keys)} keys"
    )
    body = "\n".join(
        f"{k['address']}: failed after {k['migration_attempts']} attempt(s): {last_error[k['pk']][:200]}"
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
                    "id": k["pk"],
                    "address": k["address"],
                    "attempts": k["migration_attempts"],
                    "error": last_error[k["pk"]][:500],
                }
                for k in keys
            ]
        },
    )
