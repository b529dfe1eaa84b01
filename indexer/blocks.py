"""What the writer's modules share, so none of them imports another for it: a fetched block with
its results (`IndexedBlock`, written by `indexer.ingest`, read by enrichment, verification and the
producers), its event rows with their deterministic identities (`event_rows`: what ingest stores,
what verification compares, what a producer classifies), the name of a chain's writer lease (which
fences every write of the indexed tables, and which the selectors read to name the leader), and the
actor the writer acts as."""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from fleetops.audit.actors import Actor
from indexer.models import Phase
from indexer.rpc import parse

if TYPE_CHECKING:
    from indexer.models import Chain


# The ingest loop (`indexer_run`) is an engine: the scheduler actor (the operator role plus the
# machines' engine edges, see `fleetops.access.roles`).
WRITER = Actor.scheduler("indexer_run")


@dataclass(frozen=True)
class IndexedBlock:
    block: parse.Block
    results: parse.BlockResults
    # Its COPY rows when they were built ahead, in the thread that fetched it (`indexer.ingest.
    # prepare_rows`); not part of the value.
    rows: Any = field(default=None, compare=False, repr=False)

    @property
    def height(self) -> int:
        return self.block.height


# Parsing a block builds ~10,000 short-lived objects (the JSON tree, events, attributes) that
# reference counting frees: none of them is in a cycle. At the default thresholds the cyclic collector
# runs every 700 allocations and walks the young objects each time, which doubled the CPU cost of
# parsing a block. While ingesting, start-up objects are frozen out of it and it runs less often.
INGEST_GC_THRESHOLD = (50_000, 20, 20)


def tune_gc_for_ingest() -> None:
    """For the rest of this process (a worker process that only checks blocks)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*INGEST_GC_THRESHOLD)


@contextmanager
def ingest_gc() -> Iterator[None]:
    """The cyclic collector tuned for ingest (the commands that fetch and parse blocks); the previous
    thresholds are restored after (an in-process `call_command` leaves its caller as it was)."""
    previous = gc.get_threshold()
    tune_gc_for_ingest()
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()


def lease_name(chain: Chain) -> str:
    return f"indexer:{chain.slug}"


def attributes_value(event: parse.Event) -> list[dict[str, Any]]:
    return [{"key": a.key, "value": a.value, "index": a.index} for a in event.attributes]


def _attributes(event: parse.Event) -> str:
    # orjson writes the frozen dataclasses as {"key", "value", "index"} objects itself (no dict per
    # attribute); a canonical text never holds what it refuses (lone surrogates, see parse).
    return orjson.dumps(event.attributes).decode()


def event_rows(chain_id: int, item: IndexedBlock, *, encode: bool = True) -> Iterable[tuple[Any, ...]]:
    """Deterministic identities: (height, phase, tx_index, event_index), in node order. With
    `encode=False` the attributes stay Python values (for checksums against stored rows)."""
    height, results = item.height, item.results
    attrs: Any = _attributes if encode else attributes_value
    for phase, events in (
        (Phase.BEGIN_BLOCK, results.begin_block_events),
        (Phase.END_BLOCK, results.end_block_events),
        (Phase.FINALIZE_BLOCK, results.finalize_block_events),
    ):
        for i, event in enumerate(events):
            yield (chain_id, height, phase.value, None, i, event.type[:200], attrs(event))
    tx_phase = Phase.TX.value
    for tx in results.txs:
        for i, event in enumerate(tx.events):
            yield (chain_id, height, tx_phase, tx.index, i, event.type[:200], attrs(event))
