"""Live production: the indexer's producer hook, inside each block commit transaction.

For the batch of blocks [first, last] being committed and each protocol of the chain whose cursor
row exists: `CAS(cursor: first-1 -> last)`; if it swapped, write that protocol's rows for the batch.
One CAS per batch is the same as one per block: the backfill only ever claims heights that are
already indexed, so while this batch is uncommitted the cursor is at most first-1; either it is
exactly first-1 (live owns the whole batch) or lower (the backfill is behind and owns all of it).

A rollback to R locks the protocol cursors first (so a backfill window that already took its CAS
commits before we look, and one that has not yet sees the rewound cursor), undoes the current state
above R, rewinds the cursors above R, and deletes the state changes and spans above R.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from indexer.producers import Producer, block_events
from migrations_app.models import Cursor, Protocol, ProtocolStateChange
from migrations_app.protocols import registry, store
from migrations_app.protocols.cursor import CasResult, cursor_cas, cursors_lock, cursors_rewind
from migrations_app.protocols.metrics import STATE_CHANGES

if TYPE_CHECKING:
    from indexer.producers import IndexedBlock
    from indexer.selectors import ChainModel as Chain

log = logging.getLogger(__name__)

PRODUCER_NAME = "protocols"


def _protocols(chain: Chain) -> list[Protocol]:
    """The chain's protocols (each identified by (chain, protocol id)), with the chain attached so
    naming their cursors costs no query."""
    protocols = list(Protocol.objects.filter(chain_id=chain.pk).order_by("protocol_id"))
    for p in protocols:
        p.chain = chain
    return protocols


def protocols_write(chain: Chain, blocks: Sequence[IndexedBlock]) -> None:
    protocols = _protocols(chain)
    if not protocols:
        return
    names = [n for p in protocols for n in (p.history_cursor_name, p.current_state_cursor_name)]
    existing = set(Cursor.objects.filter(name__in=names).values_list("name", flat=True))
    if not existing:
        return  # nobody has started a migration: produce nothing (the seed's gating)
    first, last = blocks[0].height, blocks[-1].height
    events: list[store.EventTuple] | None = None
    for protocol in protocols:
        spec = registry.get(protocol.protocol_id)
        if spec is None:
            continue
        history = protocol.history_cursor_name in existing and (
            cursor_cas(name=protocol.history_cursor_name, expected=first - 1, new=last, writer="live")
            is CasResult.SWAPPED
        )
        current = protocol.current_state_cursor_name in existing and (
            cursor_cas(
                name=protocol.current_state_cursor_name,
                expected=first - 1,
                new=last,
                writer="live_current_state",
            )
            is CasResult.SWAPPED
        )
        if not history and not current:
            continue  # the backfill owns these heights, or is behind
        if events is None:
            events = block_events(blocks)
        rows = store.classify_events(spec, events)
        if history:
            store.copy_state_changes(protocol_pk=protocol.pk, chain_id=chain.pk, rows=rows)
            store.span_extend(protocol_pk=protocol.pk, writer="live", from_height=first, to_height=last)
            store.note_contracts(protocol_pk=protocol.pk, rows=rows)
            STATE_CHANGES.labels(writer="live").inc(len(rows))
        if current:
            store.apply_current_state(spec=spec, protocol_pk=protocol.pk, rows=rows)


def protocols_rollback(chain: Chain, height: int) -> None:
    protocols = _protocols(chain)
    if not protocols:
        return
    names = [n for p in protocols for n in (p.history_cursor_name, p.current_state_cursor_name)]
    cursors = cursors_lock(names)
    for protocol in protocols:
        spec = registry.get(protocol.protocol_id)
        top = cursors.get(protocol.current_state_cursor_name)
        if spec is None or top is None or top <= height:
            continue
        # The events are still stored: the indexer deletes them after the producers ran.
        events = store.read_events(chain_id=chain.pk, types=spec.event_types, low=height + 1, high=top)
        rows = store.classify_events(spec, events)
        store.undo_current_state(spec=spec, protocol_pk=protocol.pk, rows=rows, to_height=height)
    rewound = cursors_rewind(names=names, to_height=height)
    pks = [p.pk for p in protocols]
    deleted, _ = ProtocolStateChange.objects.filter(
        protocol_id__in=pks, chain_id=chain.pk, height__gt=height
    ).delete()
    store.spans_trim(protocol_pks=pks, to_height=height)
    if rewound or deleted:
        log.info(
            "protocol rows rolled back",
            extra={
                "chain": chain.slug,
                "to_height": height,
                "cursors_rewound": rewound,
                "rows_deleted": deleted,
            },
        )


PRODUCER = Producer(name=PRODUCER_NAME, write=protocols_write, rollback=protocols_rollback)
