"""Row writes shared by the live producer and the backfills: read events, COPY state-change rows
(classified by `migrations_app.protocols.classify`), extend the writer spans, note new contracts,
and apply (or, on rollback, undo) the current state. Each function runs inside the caller's
transaction, after the caller's cursor CAS swapped, and costs a fixed number of round trips
whatever the number of rows.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

from django.db import connection, transaction

from fleetops.lib import clock
from indexer import selectors as indexer_selectors
from migrations_app.models import (
    ProtocolBalance,
    ProtocolContract,
    ProtocolNftOwner,
    ProtocolStateChange,
    ProtocolWriteSpan,
)

# Classification is pure and lives in its own module (the parallel backfill's worker processes
# import it without Django); re-exported here for the writers.
from migrations_app.protocols.classify import EventTuple as EventTuple
from migrations_app.protocols.classify import Row as Row
from migrations_app.protocols.classify import classify_events as classify_events
from migrations_app.protocols.registry import ProtocolSpec

STATE_CHANGE_COLUMNS = [
    "protocol_id",
    "chain_id",
    "height",
    "phase",
    "tx_index",
    "event_index",
    "kind",
    "account",
    "counterparty",
    "asset",
    "amount",
    "token_id",
]


def read_events(*, chain_id: int, types: Iterable[str], low: int, high: int) -> list[EventTuple]:
    """Stored events of the given types in [low, high] (one indexed read through the indexer's
    selectors; the (chain, type, height) index answers it)."""
    return indexer_selectors.event_tuples(chain_id=chain_id, types=types, low=low, high=high)


def block_hash(*, chain_id: int, height: int) -> str | None:
    return indexer_selectors.block_hash(chain_id=chain_id, height=height)


def copy_state_changes(*, protocol_pk: int, chain_id: int, rows: Sequence[Row]) -> int:
    if not rows:
        return 0
    table = ProtocolStateChange._meta.db_table
    with connection.cursor() as cursor:
        raw = cursor.cursor  # psycopg's cursor: COPY is not part of the DB-API
        with raw.copy(f"COPY {table} ({', '.join(STATE_CHANGE_COLUMNS)}) FROM STDIN") as copy:
            for r in rows:
                copy.write_row((protocol_pk, chain_id, *r))
    return len(rows)


_SPAN = ProtocolWriteSpan._meta.db_table
_SPAN_EXTEND = f"""
WITH extended AS (
    UPDATE {_SPAN} SET to_height = %(to)s, updated_at = %(now)s
    WHERE protocol_id = %(protocol)s AND writer = %(writer)s AND to_height = %(from)s - 1
    RETURNING 1
)
INSERT INTO {_SPAN} (protocol_id, writer, from_height, to_height, created_at, updated_at)
SELECT %(protocol)s, %(writer)s, %(from)s, %(to)s, %(now)s, %(now)s
WHERE NOT EXISTS (SELECT 1 FROM extended)
"""  # noqa: S608 - table name from the model


def span_extend(*, protocol_pk: int, writer: str, from_height: int, to_height: int) -> None:
    """Record that `writer` wrote [from_height, to_height]: extend its span ending just below, or open
    a new one (at the handoff, or after a rollback trimmed the other writer's span)."""
    params: dict[str, Any] = {
        "protocol": protocol_pk,
        "writer": writer,
        "from": from_height,
        "to": to_height,
        "now": clock.now(),
    }
    with connection.cursor() as cursor:
        cursor.execute(_SPAN_EXTEND, params)


def spans_trim(*, protocol_pks: list[int], to_height: int) -> None:
    ProtocolWriteSpan.objects.filter(protocol_id__in=protocol_pks, from_height__gt=to_height).delete()
    ProtocolWriteSpan.objects.filter(protocol_id__in=protocol_pks, to_height__gt=to_height).update(
        to_height=to_height, updated_at=clock.now()
    )


# Contracts already recorded, per process: noting them again is skipped without a round trip. Added
# only once the transaction that wrote them commits (a rollback must not make them "known").
_known_contracts: set[tuple[int, str]] = set()
_known_lock = threading.Lock()  # the parallel history workers of one run share it


def note_contracts(*, protocol_pk: int, rows: Sequence[Row]) -> None:
    first: dict[str, int] = {}
    for r in rows:
        if (protocol_pk, r.asset) not in _known_contracts and r.asset not in first:
            first[r.asset] = r.height
    if not first:
        return
    now = clock.now()
    ProtocolContract.objects.bulk_create(
        [
            ProtocolContract(protocol_id=protocol_pk, contract=c, first_seen_height=h, classified_at=now)
            for c, h in first.items()
        ],
        ignore_conflicts=True,
    )
    noted = [(protocol_pk, c) for c in first]

    def remember() -> None:
        with _known_lock:
            _known_contracts.update(noted)

    transaction.on_commit(remember)


def forget_known_contracts() -> None:
    with _known_lock:
        _known_contracts.clear()


# --- current state -------------------------------------------------------------------------------------

_BAL = ProtocolBalance._meta.db_table
_BAL_UPSERT = f"""
INSERT INTO {_BAL} (protocol_id, asset, account, amount, height)
SELECT %(protocol)s, a, b, c, d FROM unnest(%(assets)s::text[], %(accounts)s::text[],
                                              %(amounts)s::numeric[], %(heights)s::bigint[]) AS t(a, b, c, d)
ON CONFLICT (protocol_id, asset, account)
DO UPDATE SET amount = {_BAL}.amount + EXCLUDED.amount, height = EXCLUDED.height
"""  # noqa: S608
_OWN = ProtocolNftOwner._meta.db_table
_OWN_UPSERT = f"""
INSERT INTO {_OWN} (protocol_id, asset, token_id, owner, height)
SELECT %(protocol)s, a, b, c, d FROM unnest(%(assets)s::text[], %(tokens)s::text[],
                                              %(owners)s::text[], %(heights)s::bigint[]) AS t(a, b, c, d)
ON CONFLICT (protocol_id, asset, token_id)
DO UPDATE SET owner = EXCLUDED.owner, height = EXCLUDED.height
"""  # noqa: S608


def _balance_deltas(rows: Iterable[Row], sign: int) -> dict[tuple[str, str], tuple[int, int]]:
    deltas: dict[tuple[str, str], tuple[int, int]] = {}

    def add(asset: str, account: str, amount: int, height: int) -> None:
        old = deltas.get((asset, account), (0, height))
        deltas[(asset, account)] = (old[0] + sign * amount, max(old[1], height))

    for r in rows:
        amount = r.amount or 0
        if r.kind == "transfer":
            add(r.asset, r.account, -amount, r.height)
            add(r.asset, r.counterparty, amount, r.height)
        elif r.kind == "mint":
            add(r.asset, r.account, amount, r.height)
        elif r.kind == "burn":
            add(r.asset, r.account, -amount, r.height)
    return deltas


def _upsert_balances(protocol_pk: int, deltas: dict[tuple[str, str], tuple[int, int]]) -> None:
    if not deltas:
        return
    keys = sorted(deltas)  # a fixed order: two writers of one protocol never lock rows crosswise
    with connection.cursor() as cursor:
        cursor.execute(
            _BAL_UPSERT,
            {
                "protocol": protocol_pk,
                "assets": [k[0] for k in keys],
                "accounts": [k[1] for k in keys],
                "amounts": [deltas[k][0] for k in keys],
                "heights": [deltas[k][1] for k in keys],
            },
        )


def _upsert_owners(protocol_pk: int, owners: dict[tuple[str, str], tuple[str, int]]) -> None:
    if not owners:
        return
    keys = sorted(owners)
    with connection.cursor() as cursor:
        cursor.execute(
            _OWN_UPSERT,
            {
                "protocol": protocol_pk,
                "assets": [k[0] for k in keys],
                "tokens": [k[1] for k in keys],
                "owners": [owners[k][0] for k in keys],
                "heights": [owners[k][1] for k in keys],
            },
        )


def apply_current_state(*, spec: ProtocolSpec, protocol_pk: int, rows: Sequence[Row]) -> None:
    """Fold the rows (in height order) into balances or owners. Order matters for owners: the last
    change of a token wins, so callers commit windows strictly in height order."""
    if spec.current_state == "balances":
        _upsert_balances(protocol_pk, _balance_deltas(rows, +1))
        return
    owners: dict[tuple[str, str], tuple[str, int]] = {}
    for r in rows:
        owners[(r.asset, r.token_id)] = (r.counterparty if r.kind == "transfer" else r.account, r.height)
    _upsert_owners(protocol_pk, owners)


def undo_current_state(*, spec: ProtocolSpec, protocol_pk: int, rows: Sequence[Row], to_height: int) -> None:
    """Undo the rows (heights above `to_height`) from the current state: balances subtract them; a
    token goes back to the sender of its first transfer above the fork point, or away if minted there."""
    if spec.current_state == "balances":
        deltas = {k: (v[0], to_height) for k, v in _balance_deltas(rows, -1).items()}
        _upsert_balances(protocol_pk, deltas)
        return
    first: dict[tuple[str, str], Row] = {}
    for r in rows:
        first.setdefault((r.asset, r.token_id), r)
    restore = {k: (r.account, to_height) for k, r in first.items() if r.kind == "transfer"}
    _upsert_owners(protocol_pk, restore)
    minted = [k for k, r in first.items() if r.kind == "mint"]
    if minted:
        with connection.cursor() as cursor:
            cursor.execute(
                f"DELETE FROM {_OWN} WHERE protocol_id = %s AND (asset, token_id) IN "  # noqa: S608
                "(SELECT * FROM unnest(%s::text[], %s::text[]))",
                [protocol_pk, [k[0] for k in minted], [k[1] for k in minted]],
            )
