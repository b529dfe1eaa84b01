"""Broadcasts whose outcome was lost: look the hash up on chain, re-send once, never guess.

A `broadcast_tx_sync` that ends in a transport error (timeout, connection reset after the request
left) says nothing about the transaction: the node may have taken it (it will land), or never seen
it. Counting that as a failed attempt burns an attempt on a transaction that may well land; sending
new bytes could stake twice. So (`BROADCAST_MACHINE` in `migrations_app.models.keys`):

1. The schedule records the lost outcome: `broadcasting -> unknown` (`stake_txs_mark_unknown`), with
   a history entry, and does not fail the attempt.
2. A later pass (`stake_txs_resolve_unknown`, step 2 of the re-stake pass, at least
   KEYS_LOOKUP_DELAY_SECONDS after the error) claims `unknown` rows, and `broadcasting` or
   `resending` rows whose worker went silent past the claim lease (it died in the call), with
   `FOR UPDATE SKIP LOCKED`. Dead workers' `broadcasting` rows become `unknown` first.
3. Each hash is looked up (`/tx`):
   - on chain: its code is the verdict (`stake_txs_resolve`): code 0 succeeds, the attempt is not
     spent again;
   - not on chain, the row `unknown` and the head still below its timeout height: the bytes are
     rebuilt from the stored payload and must hash to the stored hash (the same signed bytes, or
     nothing is sent); `unknown -> resending` commits before the call (the machine has no way back,
     so a transaction is re-sent at most once, whatever crashes), then the one re-send:
       accepted, or "already in the node's cache" -> `resending -> sent`, verification follows;
       refused by CheckTx -> the attempt fails at once;
       another transport error -> stays `resending`;
   - lookup unavailable: nothing changes, the next pass asks again.
4. Whatever is left (`unknown` past its timeout height, `resending` after a lost re-send) is settled
   by verification's coverage scan, which covers these rows too: found is the verdict, absent through
   the timeout height (the transaction can no longer land) is the failed attempt, counted once.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from fleetops.audit.actors import Actor
from fleetops.lib import clock
from fleetops.lib.transition import transition_rows
from indexer.rpc import parse
from indexer.rpc.client import CometRpc, RpcError, TxAlreadyKnown, TxNotFound
from migrations_app.keys.chain import rpc_for, tx_bytes, tx_hash
from migrations_app.keys.common import Verdict
from migrations_app.keys.metrics import BROADCASTS, LOOKUPS
from migrations_app.keys.verdicts import stake_txs_resolve
from migrations_app.models.keys import (
    BROADCAST_MACHINE,
    STAKE_TX_PENDING,
    BroadcastState,
    Key,
    OrgKeyConfig,
    RemediationEntry,
    RemediationOutcome,
    StakeTransaction,
)

log = logging.getLogger(__name__)

ACTOR = Actor.scheduler("keys.restake")
TX_TABLE = StakeTransaction._meta.db_table
KEY_TABLE = Key._meta.db_table
CONFIG_TABLE = OrgKeyConfig._meta.db_table
# Rows still in a call: a live worker refreshed their claim right before it, so past the lease
# their worker is gone.
IN_CALL = (BroadcastState.BROADCASTING.value, BroadcastState.RESENDING.value)

# Step 2: claim the rows whose outcome is to be looked up (the claim token and time change, not the
# state). The states are read from the machine and passed as parameters.
CLAIM_SQL = f"""
UPDATE {TX_TABLE} t SET claim_token = %(token)s, claimed_at = %(now)s
FROM (
    SELECT t2.id FROM {TX_TABLE} t2
    WHERE t2.status = %(pending)s AND t2.hash <> '' AND (
          (t2.broadcast_state = %(unknown)s AND t2.claimed_at <= %(settled)s)
       OR (t2.broadcast_state = ANY(%(in_call)s) AND t2.claimed_at < %(stale)s))
    ORDER BY t2.claimed_at, t2.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
) due, {KEY_TABLE} k, {CONFIG_TABLE} c
WHERE t.id = due.id AND k.id = t.key_id AND c.org_id = k.org_id
RETURNING t.id, t.key_id, t.round, t.attempt, t.broadcast_state, t.hash, t.payload, t.timeout_height,
          c.rpc_url
"""  # noqa: S608 - table names come from the models, values are parameters


@dataclass(frozen=True)
class Lost:
    """A broadcast whose outcome the schedule did not learn."""

    tx_id: int
    key_id: int
    round: int
    attempt: int
    hash: str
    error: str


@dataclass(frozen=True)
class Unsettled:
    tx_id: int
    key_id: int
    round: int
    attempt: int
    state: str
    hash: str
    payload: dict[str, Any]
    timeout_height: int | None
    rpc_url: str


@dataclass
class LookupResult:
    claimed: int = 0
    found: int = 0
    missing: int = 0
    unavailable: int = 0
    resent: int = 0
    resend_accepted: int = 0
    resend_rejected: int = 0
    resend_unknown: int = 0
    not_resent: int = 0
    races_lost: int = 0
    errors: list[str] = field(default_factory=list)


def _entries(items: Sequence[Any], *, outcome: str, message: str, error: str = "") -> list[RemediationEntry]:
    now = clock.now()
    return [
        RemediationEntry(
            key_id=i.key_id,
            round=i.round,
            attempt=i.attempt,
            outcome=outcome,
            message=message.format(hash=i.hash[:12])[:300],
            error=(getattr(i, "error", "") or error)[:2000],
            tx_hash=i.hash,
            actor_label=ACTOR.label,
            created_at=now,
        )
        for i in items
    ]


def stake_txs_mark_unknown(lost: Sequence[Lost]) -> set[int]:
    """Step 1: `broadcasting -> unknown` for rows still pending (a verdict that came first wins),
    the claim time restarted so the lookup waits KEYS_LOOKUP_DELAY_SECONDS; history for the rows
    moved. Never a failed attempt."""
    if not lost:
        return set()
    with transaction.atomic():
        moved = set(
            transition_rows(
                model=StakeTransaction,
                machine=BROADCAST_MACHINE,
                rows=[{"pk": i.tx_id, "status": STAKE_TX_PENDING} for i in lost],
                to=BroadcastState.UNKNOWN,
                match=("status",),
                updates={"claimed_at": clock.now()},
                operation="keys_mark_unknown",
            )
        )
        RemediationEntry.objects.bulk_create(
            _entries(
                [i for i in lost if i.tx_id in moved],
                outcome=RemediationOutcome.OUTCOME_UNKNOWN,
                message="Broadcast outcome unknown; tx {hash}… is looked up before the attempt can fail",
            )
        )
    BROADCASTS.labels(result="unknown").inc(len(moved))
    for i in lost:
        log.warning("stake tx broadcast outcome unknown; it is looked up by hash: %s", i.error)
    return moved


def _claim(*, token: str, limit: int) -> list[Unsettled]:
    now = clock.now()
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            CLAIM_SQL,
            {
                "token": token,
                "now": now,
                "limit": limit,
                "pending": STAKE_TX_PENDING,
                "unknown": BroadcastState.UNKNOWN.value,
                "in_call": list(IN_CALL),
                "settled": now - timedelta(seconds=settings.FLEETOPS_KEYS_LOOKUP_DELAY_SECONDS),
                "stale": now - timedelta(seconds=settings.FLEETOPS_KEYS_CLAIM_LEASE_SECONDS),
            },
        )
        rows = cursor.fetchall()
    claimed = []
    for tx_id, key_id, round_, attempt, state, hash_, payload, timeout, url in rows:
        if isinstance(payload, str | bytes):
            payload = json.loads(payload)
        claimed.append(Unsettled(tx_id, key_id, round_, attempt, state, hash_, payload, timeout, url))
    return claimed


def _adopt_orphans(rows: list[Unsettled], *, token: str) -> list[Unsettled]:
    """Dead workers' `broadcasting` rows: their outcome is unknown too (`broadcasting -> unknown`,
    only while still ours and pending). Rows somebody else moved are dropped."""
    orphans = [r for r in rows if r.state == BroadcastState.BROADCASTING]
    if not orphans:
        return rows
    with transaction.atomic():
        moved = set(
            transition_rows(
                model=StakeTransaction,
                machine=BROADCAST_MACHINE,
                rows=[{"pk": r.tx_id, "claim_token": token, "status": STAKE_TX_PENDING} for r in orphans],
                to=BroadcastState.UNKNOWN,
                match=("claim_token", "status"),
                operation="keys_adopt_unknown",
            )
        )
        RemediationEntry.objects.bulk_create(
            _entries(
                [r for r in orphans if r.tx_id in moved],
                outcome=RemediationOutcome.OUTCOME_UNKNOWN,
                message="The broadcasting worker went silent; tx {hash}… is looked up on chain",
            )
        )
    log.warning("adopted %d stake transactions whose broadcasting worker went silent", len(moved))
    return [
        Unsettled(**{**r.__dict__, "state": BroadcastState.UNKNOWN.value}) if r.tx_id in moved else r
        for r in rows
        if r.state != BroadcastState.BROADCASTING or r.tx_id in moved
    ]


def _lookup(rpc: CometRpc, row: Unsettled) -> tuple[str, parse.TxInfo | None]:
    try:
        info = rpc.tx(row.hash)
    except TxNotFound:
        return "missing", None
    except (RpcError, parse.MalformedResponse):
        return "unavailable", None
    if info.hash.upper() != row.hash.upper():
        return "unavailable", None  # a source answering about another tx is not an answer
    return "found", info


def _resend(rpc: CometRpc, row: Unsettled) -> tuple[Unsettled, str, parse.BroadcastResult | None, str]:
    try:
        result = rpc.broadcast_tx_sync(tx_bytes(row.payload))
    except TxAlreadyKnown:
        return row, "accepted", None, ""  # the node holds these bytes: the first send reached it
    except (RpcError, parse.MalformedResponse) as exc:
        return row, "unknown", None, str(exc)[:500]
    if result.code != 0:
        return row, "rejected", result, f"CheckTx code {result.code} ({result.codespace}): {result.log}"[:500]
    return row, "accepted", result, ""


def stake_txs_resolve_unknown(*, token: str, limit: int) -> LookupResult:
    """Steps 2-3 of the module docstring for at most `limit` rows."""
    result = LookupResult()
    rows = _claim(token=token, limit=limit)
    if not rows:
        return result
    result.claimed = len(rows)
    rows = _adopt_orphans(rows, token=token)
    by_url: dict[str, list[Unsettled]] = defaultdict(list)
    for row in rows:
        by_url[row.rpc_url].append(row)
    verdicts: list[Verdict] = []
    for url, items in by_url.items():
        if not url:
            result.unavailable += len(items)
            continue
        rpc = rpc_for(url)
        try:
            head = rpc.status().latest_height
        except (RpcError, parse.MalformedResponse) as exc:
            result.unavailable += len(items)
            result.errors.append(f"{url}: {exc}"[:300])
            LOOKUPS.labels(result="unavailable").inc(len(items))
            continue
        to_resend: list[Unsettled] = []
        for row in items:
            kind, info = _lookup(rpc, row)
            LOOKUPS.labels(result=kind).inc()
            if kind == "found" and info is not None:
                result.found += 1
                code = info.result.code
                verdicts.append(
                    Verdict(
                        tx_id=row.tx_id,
                        success=code == 0,
                        code=code,
                        message=""
                        if code == 0
                        else f"DeliverTx code {code} ({info.result.codespace}): {info.result.log}"[:500],
                        landed_height=info.height,
                    )
                )
            elif kind == "missing":
                result.missing += 1
                if row.state == BroadcastState.UNKNOWN and _may_resend(row, head):
                    to_resend.append(row)
                else:
                    result.not_resent += 1
            else:
                result.unavailable += 1
        _resend_all(rpc, to_resend, token=token, result=result, verdicts=verdicts)
    stats = stake_txs_resolve(verdicts=verdicts, actor=ACTOR)
    result.races_lost += stats.races_lost
    return result


def _may_resend(row: Unsettled, head: int) -> bool:
    """Only before the timeout height (past it the tx can no longer land), and only the very bytes
    the hash was committed for."""
    if row.timeout_height is not None and head >= row.timeout_height:
        return False
    if tx_hash(tx_bytes(row.payload)) != row.hash:
        log.error("stake tx %s: the stored payload no longer hashes to %s; not re-sent", row.tx_id, row.hash)
        return False
    return True


def stake_txs_mark_resending(rows: Sequence[Unsettled], *, token: str) -> set[int]:
    """`unknown -> resending`, committed before the call, only for rows still ours and pending: the
    one re-send of the attempt (there is no edge back into `unknown`)."""
    if not rows:
        return set()
    with transaction.atomic():
        return set(
            transition_rows(
                model=StakeTransaction,
                machine=BROADCAST_MACHINE,
                rows=[{"pk": r.tx_id, "claim_token": token, "status": STAKE_TX_PENDING} for r in rows],
                to=BroadcastState.RESENDING,
                match=("claim_token", "status"),
                updates={"claimed_at": clock.now()},
                operation="keys_mark_resending",
            )
        )


def stake_txs_record_resends(
    outcomes: Sequence[tuple[Unsettled, str, parse.BroadcastResult | None, str]],
    result: LookupResult,
    verdicts: list[Verdict],
) -> None:
    """The re-sends' outcomes: taken -> `resending -> sent` (verification follows); refused by
    CheckTx -> a failing verdict (appended to `verdicts`); lost again -> stays `resending`."""
    accepted = [row for row, kind, _, _ in outcomes if kind == "accepted"]
    lost = [(row, error) for row, kind, _, error in outcomes if kind == "unknown"]
    for row, kind, answer, error in outcomes:
        BROADCASTS.labels(result=f"resend_{kind}").inc()
        if kind == "rejected":
            result.resend_rejected += 1
            verdicts.append(
                Verdict(
                    tx_id=row.tx_id,
                    success=False,
                    code=answer.code if answer else None,
                    message=error,
                    kind="rejected",
                )
            )
    with transaction.atomic():
        moved = set(
            transition_rows(
                model=StakeTransaction,
                machine=BROADCAST_MACHINE,
                rows=[
                    {"pk": r.tx_id, "from": BroadcastState.RESENDING, "status": STAKE_TX_PENDING}
                    for r in accepted
                ],
                to=BroadcastState.SENT,
                exact_from=True,
                match=("status",),
                updates={"broadcast_at": clock.now()},
                operation="keys_resend_record",
            )
        )
        result.races_lost += len(accepted) - len(moved)
        result.resend_accepted += len(moved)
        result.resend_unknown += len(lost)
        RemediationEntry.objects.bulk_create(
            [
                *_entries(
                    [r for r in accepted if r.tx_id in moved],
                    outcome=RemediationOutcome.RESENT,
                    message="Not on chain: tx {hash}… re-sent once with the same bytes; the node took it",
                ),
                *(
                    entry
                    for row, error in lost
                    for entry in _entries(
                        [row],
                        outcome=RemediationOutcome.OUTCOME_UNKNOWN,
                        message="Re-send of tx {hash}… lost too; verification settles it by its timeout",
                        error=error,
                    )
                ),
            ]
        )


def _resend_all(
    rpc: CometRpc, rows: list[Unsettled], *, token: str, result: LookupResult, verdicts: list[Verdict]
) -> None:
    if not rows:
        return
    ours = stake_txs_mark_resending(rows, token=token)
    result.races_lost += len(rows) - len(ours)
    rows = [r for r in rows if r.tx_id in ours]
    result.resent += len(rows)
    if not rows:
        return
    workers = max(1, min(settings.FLEETOPS_KEYS_BROADCAST_CONCURRENCY, len(rows)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="keys-resend") as pool:
        outcomes = list(pool.map(_resend, [rpc] * len(rows), rows))
    stake_txs_record_resends(outcomes, result, verdicts)
