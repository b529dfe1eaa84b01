"""The re-stake schedule: claim due keys, count the attempt, broadcast the stake tx.

One pass (`restake_tick`, beat every 30 s and `manage.py keys_restake`):

1. Cool-down auto-reset of failed keys (only when KEYS_COOLDOWN_RESET_SECONDS is set).
2. Recover orphans: pending transactions still `claimed` (never sent) whose claim is older than
   the lease belong to a worker that died between its claim and its broadcast. They are taken over
   with a conditional UPDATE on the old claim and broadcast once, for the same attempt. Then settle
   lost outcomes (`migrations_app.keys.outcomes`): transactions whose broadcast ended in a transport
   error (`unknown`), or whose worker died in the call, are looked up by hash; found is the verdict,
   missing is re-sent once with the same bytes.
3. Claim batches. ONE statement per batch: due keys `FOR UPDATE SKIP LOCKED` (a range scan of the
   partial index on (next attempt, id)), the attempt counter incremented and the next attempt
   cleared, and the pending transaction inserted, then commit. Any number of workers can run this
   at once: a key locked by one is skipped by the others, a key another worker just claimed is no
   longer due (its next attempt is NULL) when its lock is released, and the partial unique index on
   pending transactions refuses a second one anyway. A key with an older attempt still pending is
   never due (see the model docstring), so the claim does not probe the transactions table.
4. Per batch, outside any transaction: one `/status` for the head height, then the deterministic tx
   bytes and hash. The kernel moves `claimed → broadcasting` (hash, heights) for rows still holding
   our claim token and commits BEFORE the broadcast (restarting the claim's lease): a row whose
   claim was taken over is not ours to send, and a crash from here on leaves a row the next pass
   looks up by its hash. Then `broadcast_tx_sync`.
5. Record: accepted → `sent` (one kernel UPDATE); refused by CheckTx → the attempt fails at once
   (verdict); timeout or transport error → `unknown`, never a failed attempt: a later pass looks
   the hash up (step 2) and verification's coverage scan covers it meanwhile.

Every state the SQL here filters on or inserts is read from the machines in
`migrations_app.models.keys` and passed as a parameter; the claim and the orphan takeover keep their
own SKIP LOCKED statements because they change no state (the key keeps its status while in flight,
a taken-over transaction stays `claimed`). Broadcast moves are engine steps with no audit row: the
key's history (`RemediationEntry`) records them.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from fleetops.audit.actors import Actor
from fleetops.lib import clock
from fleetops.lib.transition import transition_rows
from fleetops.observability.heartbeats import heartbeat_scope
from indexer.rpc import parse
from indexer.rpc.client import RpcError, TxAlreadyKnown
from migrations_app.keys.chain import rpc_for, stake_payload, tx_bytes, tx_hash
from migrations_app.keys.common import Verdict
from migrations_app.keys.lifecycle import keys_cooldown_reset
from migrations_app.keys.metrics import ATTEMPTS, BROADCASTS, SCHEDULE_DURATION, SCHEDULE_FAILURES
from migrations_app.keys.outcomes import LookupResult, Lost, stake_txs_mark_unknown, stake_txs_resolve_unknown
from migrations_app.keys.verdicts import stake_txs_resolve
from migrations_app.models.keys import (
    BROADCAST_MACHINE,
    KEY_MIGRATION_DUE,
    STAKE_TX_MACHINE,
    STAKE_TX_PENDING,
    AddressGroup,
    BroadcastState,
    Key,
    OrgKeyConfig,
    RemediationEntry,
    RemediationOutcome,
    RemediationReason,
    StakeTransaction,
)

log = logging.getLogger(__name__)

HEARTBEAT = "keys.restake"
ACTOR = Actor.scheduler("keys.restake")
KEY_TABLE = Key._meta.db_table
TX_TABLE = StakeTransaction._meta.db_table
CONFIG_TABLE = OrgKeyConfig._meta.db_table
# The states and constants the SQL below filters on or inserts, read from the machines and passed as
# parameters (never typed into the statement text).
CLAIM_CONSTANTS: dict[str, Any] = {
    "due": list(KEY_MIGRATION_DUE),
    "tx_status": STAKE_TX_MACHINE.initial,
    "broadcast_state": BROADCAST_MACHINE.initial,
    "reason": RemediationReason.ADDRESS_GROUP_MIGRATION.value,
}

# The claim, one statement: lock due keys (skipping locked ones), count the attempt, insert the
# pending transaction. The key's status does not change (a claimed attempt keeps the status it was
# claimed in, with no next attempt: "in flight"), so this is a claim, not a transition; the new
# transaction enters both of its machines at their initial states. Shared verbatim with
# bench/b2_keys.py's raw baseline (with CLAIM_CONSTANTS).
CLAIM_SQL = f"""
WITH due AS (
    SELECT k.id FROM {KEY_TABLE} k
    JOIN {CONFIG_TABLE} c ON c.org_id = k.org_id AND c.rpc_url <> ''
    WHERE k.migration_status = ANY(%(due)s)
      AND k.migration_next_attempt_at <= %(now)s
      AND k.retired_at IS NULL
      AND k.migration_attempts < k.migration_max_attempts
    ORDER BY k.migration_next_attempt_at, k.id
    LIMIT %(limit)s
    FOR UPDATE OF k SKIP LOCKED
), claimed AS (
    UPDATE {KEY_TABLE} k
    SET migration_attempts = k.migration_attempts + 1,
        migration_next_attempt_at = NULL,
        migration_updated_at = %(now)s
    FROM due WHERE k.id = due.id
    RETURNING k.id, k.migration_round, k.migration_attempts
)
INSERT INTO {TX_TABLE} (key_id, reason, round, attempt, status, broadcast_state, claim_token,
                        claimed_at, payload, hash, unavailable_checks, message, created_at)
SELECT id, %(reason)s, migration_round, migration_attempts, %(tx_status)s, %(broadcast_state)s,
       %(token)s, %(now)s, '{{}}'::jsonb, '', 0, '', %(now)s
FROM claimed
RETURNING id, key_id, round, attempt
"""  # noqa: S608 - table names come from the models, values are parameters

# A dead worker's claim is taken over in place: the row stays in the broadcast machine's initial
# state, only the claim token and time change.
RECOVER_SQL = f"""
UPDATE {TX_TABLE} SET claim_token = %(token)s, claimed_at = %(now)s
WHERE id IN (
    SELECT id FROM {TX_TABLE}
    WHERE status = %(pending)s AND broadcast_state = %(claimed)s AND claimed_at < %(stale)s
    ORDER BY id LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING id, key_id, round, attempt
"""  # noqa: S608


@dataclass(frozen=True)
class Claim:
    tx_id: int
    key_id: int
    round: int
    attempt: int


@dataclass
class RestakeResult:
    claimed: int = 0
    recovered: int = 0
    sent: int = 0
    rejected: int = 0
    unknown: int = 0
    not_ours: int = 0
    chain_unavailable: int = 0
    auto_reset: int = 0
    lookups: LookupResult = field(default_factory=LookupResult)
    races_lost: int = 0
    duration: float = 0.0
    batches: int = 0
    errors: list[str] = field(default_factory=list)


def new_token() -> str:
    return secrets.token_hex(8)


def claim_batch(*, token: str, limit: int) -> list[Claim]:
    """Claim up to `limit` due keys in one committed transaction (step 3)."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(CLAIM_SQL, {**CLAIM_CONSTANTS, "now": clock.now(), "limit": limit, "token": token})
        rows = cursor.fetchall()
    if rows:
        ATTEMPTS.labels(result="claimed").inc(len(rows))
    return [Claim(*row) for row in rows]


def recover_orphans(*, token: str, limit: int) -> list[Claim]:
    """Take over claimed-but-never-sent transactions of dead workers (step 2)."""
    stale = clock.now() - timedelta(seconds=settings.FLEETOPS_KEYS_CLAIM_LEASE_SECONDS)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            RECOVER_SQL,
            {
                "token": token,
                "now": clock.now(),
                "stale": stale,
                "limit": limit,
                "pending": STAKE_TX_PENDING,
                "claimed": BROADCAST_MACHINE.initial,
            },
        )
        rows = cursor.fetchall()
    if rows:
        ATTEMPTS.labels(result="recovered").inc(len(rows))
        log.warning("recovered %d claimed-but-unsent stake transactions", len(rows))
    return [Claim(*row) for row in rows]


@dataclass
class _Prepared:
    claim: Claim
    raw: bytes
    hash: str
    payload: dict[str, Any]
    height: int
    timeout: int


def _prepare(claims: list[Claim]) -> dict[str, list[tuple[Claim, Key, AddressGroup | None]]]:
    keys = Key.objects.in_bulk([c.key_id for c in claims])
    group_ids = {k.address_group_id for k in keys.values() if k.address_group_id}
    groups = AddressGroup.objects.in_bulk(list(group_ids))
    urls = dict(
        OrgKeyConfig.objects.filter(org_id__in={k.org_id for k in keys.values()}).values_list(
            "org_id", "rpc_url"
        )
    )
    by_url: dict[str, list[tuple[Claim, Key, AddressGroup | None]]] = defaultdict(list)
    for claim in claims:
        key = keys[claim.key_id]
        by_url[urls.get(key.org_id, "")].append(
            (claim, key, groups.get(key.address_group_id) if key.address_group_id else None)
        )
    return by_url


def stake_txs_mark_broadcasting(prepared: list[_Prepared], *, token: str) -> set[int]:
    """`claimed -> broadcasting` with the hash, payload and heights, committed before the broadcast,
    only for rows still pending and still holding our claim token (a row taken over is not ours)."""
    if not prepared:
        return set()
    return set(
        transition_rows(
            model=StakeTransaction,
            machine=BROADCAST_MACHINE,
            rows=[
                {
                    "pk": p.claim.tx_id,
                    "hash": p.hash,
                    "payload": p.payload,
                    "execution_height": p.height,
                    "timeout_height": p.timeout,
                    "claim_token": token,
                    "status": STAKE_TX_PENDING,
                }
                for p in prepared
            ],
            to=BroadcastState.BROADCASTING,
            set_fields=("hash", "payload", "execution_height", "timeout_height"),
            match=("claim_token", "status"),
            # The lease restarts here: a row still `broadcasting` past it belongs to a dead worker.
            updates={"claimed_at": clock.now()},
            operation="keys_mark_broadcasting",
        )
    )


def _broadcast(rpc: Any, item: _Prepared) -> tuple[_Prepared, str, parse.BroadcastResult | None, str]:
    try:
        result = rpc.broadcast_tx_sync(item.raw)
    except TxAlreadyKnown:
        return item, "sent", None, ""  # the node already holds these exact bytes
    except (RpcError, parse.MalformedResponse) as exc:
        return item, "unknown", None, str(exc)[:500]
    if result.code != 0:
        return (
            item,
            "rejected",
            result,
            f"CheckTx code {result.code} ({result.codespace}): {result.log}"[:500],
        )
    return item, "sent", result, ""


def broadcast_claims(claims: list[Claim], *, token: str, result: RestakeResult) -> None:
    """Steps 4-5 for one batch of claims."""
    expiration = settings.FLEETOPS_KEYS_TX_EXPIRATION_BLOCKS
    for url, items in _prepare(claims).items():
        if not url:
            # The org's chain was unset after the claim: leave the rows for recovery after the lease.
            result.chain_unavailable += len(items)
            continue
        rpc = rpc_for(url)
        try:
            head = rpc.status().latest_height
        except (RpcError, parse.MalformedResponse) as exc:
            # Nothing was sent: the claims stay `claimed` and the lease hands them to a later pass.
            result.chain_unavailable += len(items)
            result.errors.append(f"{url}: {exc}"[:300])
            BROADCASTS.labels(result="chain_unavailable").inc(len(items))
            continue
        prepared = []
        for claim, key, group in items:
            payload = stake_payload(
                key_id=key.pk,
                address=key.address,
                owner_address=key.owner_address,
                services=list(group.services) if group else [],
                operator_shares=list(group.operator_shares) if group else [],
                round=claim.round,
                attempt=claim.attempt,
                timeout_height=head + expiration,
            )
            raw = tx_bytes(payload)
            prepared.append(_Prepared(claim, raw, tx_hash(raw), payload, head, head + expiration))
        ours = stake_txs_mark_broadcasting(prepared, token=token)
        result.not_ours += len(prepared) - len(ours)
        to_send = [p for p in prepared if p.claim.tx_id in ours]
        workers = max(1, min(settings.FLEETOPS_KEYS_BROADCAST_CONCURRENCY, len(to_send)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="keys-broadcast") as pool:
            outcomes = list(pool.map(_broadcast, [rpc] * len(to_send), to_send))
        stake_txs_record_broadcasts(outcomes, result)


def stake_txs_record_broadcasts(
    outcomes: list[tuple[_Prepared, str, parse.BroadcastResult | None, str]], result: RestakeResult
) -> None:
    """Step 5: the broadcasts' outcomes. `sent` rows move `broadcasting -> sent`; CheckTx refusals
    are failed attempts (`stake_txs_resolve`); lost outcomes move `broadcasting -> unknown`
    (`stake_txs_mark_unknown`), to be looked up by hash."""
    now = clock.now()
    sent = [p for p, kind, _, _ in outcomes if kind == "sent"]
    rejected = [(p, r, error) for p, kind, r, error in outcomes if kind == "rejected"]
    lost = [
        Lost(p.claim.tx_id, p.claim.key_id, p.claim.round, p.claim.attempt, p.hash, error)
        for p, kind, _, error in outcomes
        if kind == "unknown"
    ]
    result.unknown += len(lost)
    if sent:
        with transaction.atomic():
            # Lock the rows in id order (as every resolver does), then `broadcasting -> sent`
            # through the kernel for those still pending; history only for the rows it moved. A row
            # somebody else moved meanwhile (a verification that resolved it) is a lost race,
            # counted once, with no BROADCAST entry.
            ids = [p.claim.tx_id for p in sent]
            list(
                StakeTransaction.objects.select_for_update()
                .filter(pk__in=ids)
                .order_by("pk")
                .values_list("pk")
            )
            moved = set(
                transition_rows(
                    model=StakeTransaction,
                    machine=BROADCAST_MACHINE,
                    rows=[{"pk": pk, "status": STAKE_TX_PENDING} for pk in ids],
                    to=BroadcastState.SENT,
                    match=("status",),
                    updates={"broadcast_at": now},
                    operation="keys_broadcast_record",
                )
            )
            result.races_lost += len(sent) - len(moved)
            sent = [p for p in sent if p.claim.tx_id in moved]
            RemediationEntry.objects.bulk_create(
                [
                    RemediationEntry(
                        key_id=p.claim.key_id,
                        round=p.claim.round,
                        attempt=p.claim.attempt,
                        outcome=RemediationOutcome.BROADCAST,
                        message=f"Stake tx broadcast at height {p.height} (timeout {p.timeout})",
                        tx_hash=p.hash,
                        actor_label=ACTOR.label,
                        created_at=now,
                    )
                    for p in sent
                ]
            )
        result.sent += len(sent)
        BROADCASTS.labels(result="sent").inc(len(sent))
    if lost:
        result.races_lost += len(lost) - len(stake_txs_mark_unknown(lost))
    if rejected:
        stake_txs_resolve(
            verdicts=[
                Verdict(
                    tx_id=p.claim.tx_id,
                    success=False,
                    code=r.code if r else None,
                    message=error,
                    kind="rejected",
                )
                for p, r, error in rejected
            ],
            actor=ACTOR,
        )
        result.rejected += len(rejected)
        BROADCASTS.labels(result="rejected").inc(len(rejected))


def restake_tick(*, batch_size: int | None = None, max_batches: int | None = None) -> RestakeResult:
    """One pass of the re-stake schedule (see the module docstring)."""
    started = time.monotonic()
    result = RestakeResult()
    size = batch_size or settings.FLEETOPS_KEYS_CLAIM_BATCH
    token = new_token()
    try:
        with heartbeat_scope(HEARTBEAT) as beat:
            result.auto_reset = keys_cooldown_reset()
            recovered = recover_orphans(token=token, limit=size)
            if recovered:
                result.recovered = len(recovered)
                broadcast_claims(recovered, token=token, result=result)
            result.lookups = stake_txs_resolve_unknown(token=token, limit=size)
            result.errors += result.lookups.errors
            while max_batches is None or result.batches < max_batches:
                claims = claim_batch(token=token, limit=size)
                if not claims:
                    break
                result.batches += 1
                result.claimed += len(claims)
                broadcast_claims(claims, token=token, result=result)
                if len(claims) < size:
                    break
            beat.details.update(
                claimed=result.claimed,
                sent=result.sent,
                rejected=result.rejected,
                recovered=result.recovered,
                unknown=result.unknown,
                looked_up=result.lookups.claimed,
                found_on_chain=result.lookups.found,
                resent=result.lookups.resent,
            )
    except Exception:
        SCHEDULE_FAILURES.labels(loop="restake").inc()
        raise
    finally:
        result.duration = time.monotonic() - started
        SCHEDULE_DURATION.labels(loop="restake").observe(result.duration)
    return result
