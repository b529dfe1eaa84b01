"""The values the CometBFT parser (`indexer.rpc.parse`) returns: frozen, plain, no I/O."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime


class MalformedResponse(ValueError):
    """The body is not a usable CometBFT response: no result, a wrong type, a missing required
    field, an impossible value. A fault of the source that sent it."""


@dataclass(frozen=True)
class Status:
    chain_id: str
    latest_height: int
    latest_block_hash: str
    latest_block_time: datetime | None
    earliest_height: int | None
    catching_up: bool
    node_version: str


# A block holds ~300 events and ~1,000 attributes: slotted, each is one object instead of two (no
# `__dict__`), built and freed faster.
@dataclass(frozen=True, slots=True)
class Attribute:
    key: str
    value: str
    index: bool


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    attributes: tuple[Attribute, ...]


@dataclass(frozen=True)
class TxResult:
    index: int
    code: int
    codespace: str
    gas_wanted: int
    gas_used: int
    log: str
    events: tuple[Event, ...]


@dataclass(frozen=True)
class Block:
    height: int
    hash: str
    parent_hash: str
    time: datetime | None
    chain_id: str
    proposer: str
    txs: tuple[bytes, ...]

    @property
    def tx_hashes(self) -> tuple[str, ...]:
        """CometBFT's tx hash: SHA-256 of the raw tx bytes, uppercase hex."""
        return tuple(hashlib.sha256(tx).hexdigest().upper() for tx in self.txs)


@dataclass(frozen=True)
class BlockResults:
    height: int
    txs: tuple[TxResult, ...]
    begin_block_events: tuple[Event, ...] = ()
    end_block_events: tuple[Event, ...] = ()
    finalize_block_events: tuple[Event, ...] = ()
    app_hash: str = ""


@dataclass(frozen=True)
class TxInfo:
    hash: str
    height: int
    index: int
    tx: bytes
    result: TxResult


@dataclass(frozen=True)
class BroadcastResult:
    code: int
    codespace: str
    hash: str
    log: str


@dataclass(frozen=True)
class NewBlock:
    height: int
    hash: str
    time: datetime | None
    events: tuple[Event, ...] = field(default=())
