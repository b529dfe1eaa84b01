"""`/block_results` of the common shape decoded straight from the body's bytes into the parser's
values (msgspec, typed: the JSON text is read once, in C, into the frozen Event and Attribute values
the checking parser builds one by one in Python).

Only a body whose every field already has the type `indexer.rpc.parse` requires of it, in the
encoding it takes as it comes, is read here: text attributes (a 0.37+ node, known from its /status),
every string its own canonical text (`parse.body_is_plain_text`), every event with its `type` and a
list of attributes, every attribute with its `key`, `value` and `index`. Anything else (a field of
the wrong type, a null where Go sends a nil slice in an event, an omitted empty, an error, an unwrapped
result) returns None, and the caller parses the body the checking way, which reads it or names its
fault: this path accepts nothing the checking parser refuses and reads what it accepts to the same
values (a property test compares the two on generated and corrupted bodies).
"""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.rpc.parse import UINT32_MAX, MalformedResponse, body_is_plain_text, to_int
from indexer.rpc.values import BlockResults, Event, TxResult

_UNSET: Any = msgspec.UNSET


class _TxResult(msgspec.Struct):
    code: int | str = 0
    codespace: str = ""
    gas_wanted: int | str = 0
    gas_used: int | str = 0
    log: str = ""
    events: tuple[Event, ...] | None = None


class _Results(msgspec.Struct):
    height: int | str
    txs_results: list[_TxResult] | None
    begin_block_events: tuple[Event, ...] | msgspec.UnsetType | None = _UNSET
    end_block_events: tuple[Event, ...] | msgspec.UnsetType | None = _UNSET
    finalize_block_events: tuple[Event, ...] | msgspec.UnsetType | None = _UNSET
    app_hash: str | None = None


class _Envelope(msgspec.Struct):
    result: _Results
    error: Any = None


_DECODER = msgspec.json.Decoder(_Envelope)


def _events(value: Any) -> tuple[Event, ...]:
    return () if value is None or value is _UNSET else value


_new_object = object.__new__


def _tx_result(index: int, tx: _TxResult) -> TxResult:
    """TxResult(...) without the frozen dataclass __init__ (~100 per block): the same value."""
    value = _new_object(TxResult)
    value.__dict__.update(
        index=index,
        code=to_int(tx.code, minimum=0, maximum=UINT32_MAX),
        codespace=tx.codespace,
        gas_wanted=to_int(tx.gas_wanted),
        gas_used=to_int(tx.gas_used),
        log=tx.log,
        events=_events(tx.events),
    )
    return value


def block_results(content: bytes, *, base64_attributes: bool | None) -> BlockResults | None:
    """The body's BlockResults, or None when it is not of the common shape (parse it the checking
    way: `parse.parse_block_results`)."""
    if base64_attributes is not False or not body_is_plain_text(content):
        return None
    try:
        envelope = _DECODER.decode(content)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    result = envelope.result
    if envelope.error is not None or (
        result.finalize_block_events is _UNSET
        and (result.begin_block_events is _UNSET or result.end_block_events is _UNSET)
    ):
        return None
    try:
        txs = tuple(_tx_result(i, tx) for i, tx in enumerate(result.txs_results or ()))
        height = to_int(result.height, minimum=1)
    except MalformedResponse:
        return None
    return BlockResults(
        height=height,
        txs=txs,
        begin_block_events=_events(result.begin_block_events),
        end_block_events=_events(result.end_block_events),
        finalize_block_events=_events(result.finalize_block_events),
        app_hash=result.app_hash or "",
    )
