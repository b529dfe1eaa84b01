"""The producer hook: other apps write derived rows inside the indexer's block transaction and
remove them on rollback. Registered in AppConfig.ready(); the indexer imports no other app."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from indexer.blocks import IndexedBlock
    from indexer.models import Chain


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
