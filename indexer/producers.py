"""The producer hook: other apps write derived rows inside the indexer's block transaction and
remove them on rollback. Registered in AppConfig.ready(); the indexer imports no other app.

This module is all a producer needs of the indexer's write side: the hook (`Producer`), the blocks
it is handed (`IndexedBlock`) and their events as the indexer stores them (`block_events`). Reads
of stored rows go through `indexer.selectors`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from indexer.blocks import IndexedBlock as IndexedBlock  # what a producer is handed
from indexer.blocks import event_rows

if TYPE_CHECKING:
    from indexer.models import Chain

# (height, phase, tx_index, event_index, type, attributes): the shape of
# `indexer.selectors.event_tuples` for stored events.
EventTuple = tuple[int, str, int | None, int, str, Any]


@dataclass(frozen=True)
class Producer:
    name: str
    # Called inside the commit transaction with the blocks being written (ascending heights).
    write: Callable[[Chain, Sequence[IndexedBlock]], None]
    # Called inside the rollback transaction: remove everything above `height`.
    rollback: Callable[[Chain, int], None]


_producers: dict[str, Producer] = {}


def register_producer(producer: Producer) -> None:
    _producers[producer.name] = producer


def unregister_producer(name: str) -> None:
    _producers.pop(name, None)


def producers() -> list[Producer]:
    return list(_producers.values())


def block_events(blocks: Sequence[IndexedBlock]) -> list[EventTuple]:
    """The events of `blocks` as the indexer stores them (same identities and order as the rows
    `indexer.ingest` writes), attributes as Python values, in the shape
    `indexer.selectors.event_tuples` returns for stored events."""
    return [row[1:] for b in blocks for row in event_rows(0, b, encode=False)]
