"""Verification: settle pending stake transactions against the chain by coverage scanning.

One pass (`verify_tick`, beat every 30 s, `manage.py keys_verify`):

1. Claim due transactions: pending, hash known, and not checked within the backoff
   `min(unavailable_checks, 20) x 30 s` (at least a few seconds, so overlapping passes spread out).
   Every broadcast state past the pre-state counts, so a broadcast whose outcome was lost
   (`unknown`, `resending`: see `migrations_app.keys.outcomes`) is covered too.
   `FOR UPDATE SKIP LOCKED` and `last_verification_at = now` in one statement.
2. Per chain: one `/status` for the head. Each transaction is scanned from `last_covered_height + 1`
   (the first time from its execution height) up to the head, at most 30 blocks per pass; blocks and
   block results are fetched once per pass however many transactions need them.
3. Tri-state per transaction:
   - `confirmed` — the hash is in block h: code 0 is success, anything else failure;
   - `absent` up to H — failure only once coverage has passed the timeout height (the tx can no
     longer land); before that the coverage is recorded and the next pass scans on. A tx that lands
     3 blocks after broadcast is found by the pass that covers its block, whatever earlier passes saw;
   - `unavailable` — the RPC failed: never a failure. `unavailable_checks + 1` backs the next check
     off; every 50th consecutive one is logged critical and counted.
4. Terminal verdicts go to `stake_txs_resolve` (compare-and-set on the transaction, then the key).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from fleetops.audit.actors import Actor
from fleetops.lib import clock
from fleetops.observability.heartbeats import heartbeat_scope
from indexer.rpc import parse
from indexer.rpc.client import CometRpc, RpcError
from migrations_app.keys.chain import rpc_for
from migrations_app.keys.common import Verdict
from migrations_app.keys.metrics import SCHEDULE_DURATION, SCHEDULE_FAILURES, UNVERIFIABLE, VERIFICATIONS
from migrations_app.keys.verdicts import stake_txs_resolve
from migrations_app.models.keys import (
    BROADCAST_STARTED,
    STAKE_TX_PENDING,
    Key,
    OrgKeyConfig,
    StakeTransaction,
)

log = logging.getLogger(__name__)

HEARTBEAT = "keys.verify"
ACTOR = Actor.scheduler("keys.verify")
WINDOW_BLOCKS = 30
BACKOFF_MAX_STEPS = 20
UNAVAILABLE_ALERT_EVERY = 50
TX_TABLE = StakeTransaction._meta.db_table
KEY_TABLE = Key._meta.db_table
CONFIG_TABLE = OrgKeyConfig._meta.db_table

# The pending transactions past their broadcast pre-state, due for a check; the states are read
# from the machines and passed as parameters.
CLAIM_SQL = f"""
UPDATE {TX_TABLE} t SET last_verification_at = %(now)s
FROM (
    SELECT t2.id FROM {TX_TABLE} t2
    WHERE t2.status = %(pending)s AND t2.hash <> '' AND t2.execution_height IS NOT NULL
      AND t2.broadcast_state = ANY(%(started)s)
      AND (t2.last_verification_at IS NULL
           OR t2.last_verification_at <= %(now)s - make_interval(
                secs => GREATEST(LEAST(t2.unavailable_checks, {BACKOFF_MAX_STEPS}) * %(unit)s, %(min_gap)s)))
    ORDER BY t2.last_verification_at NULLS FIRST, t2.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
) due, {KEY_TABLE} k, {CONFIG_TABLE} c
WHERE t.id = due.id AND k.id = t.key_id AND c.org_id = k.org_id
RETURNING t.id, t.hash, t.execution_height, t.last_covered_height, t.timeout_height,
          t.unavailable_checks, c.rpc_url
"""  # noqa: S608 - table names come from the models

COVERAGE_SQL = f"""
UPDATE {TX_TABLE} t
SET last_covered_height = GREATEST(COALESCE(t.last_covered_height, v.covered), v.covered),
    unavailable_checks = CASE WHEN v.unavailable THEN t.unavailable_checks + 1
                              ELSE GREATEST(t.unavailable_checks - 1, 0) END
FROM (VALUES {{values}}) AS v(id, covered, unavailable)
WHERE t.id = v.id AND t.status = %s
"""  # noqa: S608


@dataclass(frozen=True)
class Due:
    tx_id: int
    hash: str
    execution_height: int
    last_covered_height: int | None
    timeout_height: int | None
    unavailable_checks: int
    rpc_url: str


@dataclass
class VerifyResult:
    checked: int = 0
    confirmed: int = 0
    absent: int = 0
    unavailable: int = 0
    expired: int = 0
    succeeded: int = 0
    failed: int = 0
    duration: float = 0.0


class _Chain:
    """Blocks and block results fetched at most once per pass."""

    def __init__(self, rpc: CometRpc):
        self.rpc = rpc
        self.blocks: dict[int, parse.Block] = {}
        self.results: dict[int, parse.BlockResults] = {}

    def hashes(self, height: int) -> tuple[str, ...]:
        if height not in self.blocks:
            self.blocks[height] = self.rpc.block(height)
        return self.blocks[height].tx_hashes

    def result(self, height: int, index: int) -> parse.TxResult | None:
        if height not in self.results:
            self.results[height] = self.rpc.block_results(height)
        txs = self.results[height].txs
        return txs[index] if index < len(txs) else None


@dataclass
class _Outcome:
    kind: str  # confirmed | absent | unavailable | idle
    covered: int | None = None
    verdict: Verdict | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _claim(limit: int) -> list[Due]:
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            CLAIM_SQL,
            {
                "now": clock.now(),
                "limit": limit,
                "unit": settings.FLEETOPS_KEYS_VERIFY_BACKOFF_SECONDS,
                "min_gap": settings.FLEETOPS_KEYS_VERIFY_MIN_GAP_SECONDS,
                "pending": STAKE_TX_PENDING,
                "started": list(BROADCAST_STARTED),
            },
        )
        return [Due(*row) for row in cursor.fetchall()]


def _scan(chain: _Chain, due: Due, head: int) -> _Outcome:
    start = due.last_covered_height + 1 if due.last_covered_height is not None else due.execution_height
    end = min(head, start + WINDOW_BLOCKS - 1)
    if end < start:
        return _Outcome(kind="idle")
    covered: int | None = None
    for height in range(start, end + 1):
        try:
            hashes = chain.hashes(height)
            if due.hash in hashes:
                found = chain.result(height, hashes.index(due.hash))
                if found is None:
                    return _Outcome(kind="unavailable", covered=covered)
                message = (
                    "" if found.code == 0 else f"DeliverTx code {found.code} ({found.codespace}): {found.log}"
                )
                return _Outcome(
                    kind="confirmed",
                    verdict=Verdict(
                        tx_id=due.tx_id,
                        success=found.code == 0,
                        code=found.code,
                        message=message[:500],
                        landed_height=height,
                    ),
                )
        except (RpcError, parse.MalformedResponse):
            return _Outcome(kind="unavailable", covered=covered)
        covered = height
    if due.timeout_height is not None and end >= due.timeout_height:
        return _Outcome(
            kind="expired",
            verdict=Verdict(
                tx_id=due.tx_id,
                success=False,
                message=(
                    f"expired: not on chain through its timeout height {due.timeout_height} "
                    f"(covered to {end})"
                ),
                kind="expired",
            ),
        )
    return _Outcome(kind="absent", covered=end)


def _record_coverage(rows: list[tuple[int, int | None, bool]]) -> None:
    if not rows:
        return
    values = ", ".join(["(%s::bigint, %s::bigint, %s::boolean)"] * len(rows))
    params: list[Any] = [x for row in rows for x in row]
    params.append(STAKE_TX_PENDING)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(COVERAGE_SQL.format(values=values), params)


def verify_tick(*, limit: int | None = None) -> VerifyResult:
    """One verification pass over at most `limit` due transactions."""
    started = time.monotonic()
    result = VerifyResult()
    try:
        with heartbeat_scope(HEARTBEAT) as beat:
            due = _claim(limit or settings.FLEETOPS_KEYS_VERIFY_BATCH)
            result.checked = len(due)
            by_url: dict[str, list[Due]] = defaultdict(list)
            for row in due:
                by_url[row.rpc_url].append(row)
            verdicts: list[Verdict] = []
            coverage: list[tuple[int, int | None, bool]] = []
            for url, rows in by_url.items():
                outcomes = _verify_chain(url, rows)
                for row, outcome in zip(rows, outcomes, strict=True):
                    VERIFICATIONS.labels(kind=outcome.kind).inc()
                    if outcome.verdict is not None:
                        verdicts.append(outcome.verdict)
                        if outcome.kind == "confirmed":
                            result.confirmed += 1
                        else:
                            result.expired += 1
                    elif outcome.kind == "unavailable":
                        result.unavailable += 1
                        coverage.append((row.tx_id, outcome.covered, True))
                        checks = row.unavailable_checks + 1
                        if checks % UNAVAILABLE_ALERT_EVERY == 0:
                            UNVERIFIABLE.inc()
                            log.critical(
                                "stake tx unverifiable: %d consecutive unavailable checks",
                                checks,
                                extra={"tx": row.tx_id, "hash": row.hash, "rpc": url},
                            )
                    elif outcome.kind == "absent":
                        result.absent += 1
                        coverage.append((row.tx_id, outcome.covered, False))
            _record_coverage(coverage)
            stats = stake_txs_resolve(verdicts=verdicts, actor=ACTOR)
            result.succeeded, result.failed = len(stats.succeeded), len(stats.retrying) + len(stats.failed)
            beat.details.update(
                checked=result.checked, confirmed=result.confirmed, unavailable=result.unavailable
            )
    except Exception:
        SCHEDULE_FAILURES.labels(loop="verify").inc()
        raise
    finally:
        result.duration = time.monotonic() - started
        SCHEDULE_DURATION.labels(loop="verify").observe(result.duration)
    return result


def _verify_chain(url: str, rows: list[Due]) -> list[_Outcome]:
    if not url:
        return [_Outcome(kind="unavailable") for _ in rows]
    rpc = rpc_for(url)
    try:
        head = rpc.status().latest_height
    except (RpcError, parse.MalformedResponse):
        return [_Outcome(kind="unavailable") for _ in rows]
    chain = _Chain(rpc)
    return [_scan(chain, row, head) for row in rows]


def verification_backoff(unavailable_checks: int) -> timedelta:
    """When a transaction with this many unavailable checks is looked at again."""
    return timedelta(
        seconds=max(
            min(unavailable_checks, BACKOFF_MAX_STEPS) * settings.FLEETOPS_KEYS_VERIFY_BACKOFF_SECONDS,
            settings.FLEETOPS_KEYS_VERIFY_MIN_GAP_SECONDS,
        )
    )
