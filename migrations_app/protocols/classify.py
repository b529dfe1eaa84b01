"""Stored events to state-change rows: pure Python over plain tuples, no Django. The live producer and
the backfills call `classify_events` in process; the parallel history backfill runs
`classify_window` in a pool of worker processes (`migrations_app.protocols.parallel`), which import
this module, the registry and the classifiers only.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any, NamedTuple

from migrations_app.protocols import registry
from migrations_app.protocols.registry import ProtocolSpec, attribute_map

# (height, phase, tx_index, event_index, type, attributes) as the indexer stores an event.
EventTuple = tuple[int, str, int | None, int, str, Any]


class Row(NamedTuple):
    height: int
    phase: str
    tx_index: int | None
    event_index: int
    kind: str
    account: str
    counterparty: str
    asset: str
    amount: int | None
    token_id: str


PHASE_RANK = {"begin_block": 0, "tx": 1, "end_block": 2, "finalize_block": 3}


def _order(r: Row, rank: Any = PHASE_RANK.get) -> tuple[int, int, int, int]:
    height, phase, tx_index, event_index = r[0], r[1], r[2], r[3]
    return (height, rank(phase, 9), -1 if tx_index is None else tx_index, event_index)


def classify_events(spec: ProtocolSpec, events: Iterable[EventTuple]) -> list[Row]:
    """The protocol's state changes among `events`, in chain order (height, phase, tx, event) whatever
    order the events came in: live ingestion and the backfill see them ordered differently."""
    rows: list[Row] = []
    append, types, classify = rows.append, spec.event_types, spec.classify
    for height, phase, tx_index, event_index, event_type, attributes in events:
        if event_type not in types:
            continue
        change = classify(event_type, attribute_map(attributes))
        if change is None:
            continue
        append(
            Row(
                height,
                phase,
                tx_index,
                event_index,
                change.kind,
                change.account[:200],
                change.counterparty[:200],
                change.asset[:200],
                change.amount,
                change.token_id[:200],
            )
        )
    rows.sort(key=_order)
    return rows


# --- worker processes ------------------------------------------------------------------------------------


def classify_window(
    specs: Sequence[ProtocolSpec], events: Sequence[EventTuple]
) -> list[list[tuple[Any, ...]]]:
    """Per spec (in the given order): its rows among `events`, as plain tuples (`rows_from_tuples`
    makes them rows again). Runs in a worker process; a spec travels by value, its classifier by
    reference (a module-level function, imported here)."""
    return [list(map(tuple, classify_events(spec, events))) for spec in specs]


# Plain tuples cross the process boundary several times cheaper than named tuples (whose pickling
# calls back into Python once per row); `tuple.__new__(Row, t)` turns them back without doing so.
_as_row = partial(tuple.__new__, Row)


def rows_from_tuples(tuples: Iterable[tuple[Any, ...]]) -> list[Row]:
    return list(map(_as_row, tuples))


def worker_init(parent_pid: int) -> None:
    """Pool worker start-up: load the classifiers; leave SIGINT and SIGTERM to the parent (a Ctrl-C
    at the terminal reaches the whole process group: the parent stops the run in order and shuts the
    pool down); exit when the parent process is gone (a parent killed with SIGKILL cannot shut its
    pool down, and its workers must not linger)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    registry.all_specs()

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
