"""Parse CometBFT JSON-RPC bodies (0.34, 0.37, 0.38) into plain values. Pure functions.

Tolerant by design: nulls, missing and unknown fields are accepted; numbers may come as strings or
ints; hashes are normalized to uppercase hex; event attributes may be base64 (0.34) or plain (0.37+).
The encoding is decided once per response: if every attribute key of the response decodes as
strict base64 into printable UTF-8, the response is base64-encoded; one plain key (`sender`,
`amount`, ... are not valid base64) makes it plain. Mixing the two in one body does not happen in
real nodes, and deciding per response avoids misreading a plain value that happens to be base64.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.utils.dateparse import parse_datetime


class MalformedResponse(ValueError):
    """The body is not a usable CometBFT response (no result, wrong types where it matters)."""


@dataclass(frozen=True)
class Status:
    chain_id: str
    latest_height: int
    latest_block_hash: str
    latest_block_time: datetime | None
    earliest_height: int | None
    catching_up: bool
    node_version: str


@dataclass(frozen=True)
class Attribute:
    key: str
    value: str
    index: bool


@dataclass(frozen=True)
class Event:
    type: str
    attributes: tuple[Attribute, ...]


def _new_attribute(key: str, value: str, index: bool) -> Attribute:
    """Attribute(key, value, index) without the frozen dataclass __init__ (three
    object.__setattr__ calls): a 300-event block builds ~1,000 of them. Same object, same eq/hash."""
    attribute = object.__new__(Attribute)
    attribute.__dict__.update(key=key, value=value, index=index)
    return attribute


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


# --- helpers -----------------------------------------------------------------------------------------


def result_of(body: Any) -> Mapping[str, Any]:
    """The `result` of a JSON-RPC envelope (or the body itself when it is already unwrapped)."""
    if not isinstance(body, Mapping):
        raise MalformedResponse("response is not a JSON object")
    if body.get("error"):
        raise MalformedResponse(f"RPC error: {body['error']}")
    result = body.get("result", body if "jsonrpc" not in body else None)
    if not isinstance(result, Mapping):
        raise MalformedResponse("response has no result object")
    return result


# `type(x) is dict` first: JSON bodies are plain dicts and lists, and an ABC isinstance check per
# attribute was a third of the parse time of a 300-event block.
def _is_mapping(value: Any) -> bool:
    return type(value) is dict or isinstance(value, Mapping)


def _obj(value: Any) -> Mapping[str, Any]:
    return value if type(value) is dict or isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if type(value) is list or isinstance(value, list) else []


def to_int(value: Any, default: int = 0) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return int(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise MalformedResponse(f"not an integer: {value!r}")


def to_hash(value: Any) -> str:
    """Uppercase hex; base64-encoded hashes (some encoders) are converted."""
    if not value or not isinstance(value, str):
        return ""
    text = value.strip()
    try:
        int(text, 16)
        return text.upper()
    except ValueError:
        pass
    try:
        return base64.b64decode(text, validate=True).hex().upper()
    except (binascii.Error, ValueError):
        raise MalformedResponse(f"not a hash: {value!r}")


def to_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    # CometBFT prints nanoseconds; Python keeps microseconds.
    text = value
    if "." in text:
        head, _, tail = text.partition(".")
        digits = "".join(ch for ch in tail if ch.isdigit())
        zone = tail[len(digits) :]
        text = f"{head}.{digits[:6]}{zone}"
    return parse_datetime(text)


def _b64_text(value: str) -> str | None:
    if not value or len(value) % 4:
        return None
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return decoded if decoded.isprintable() else None


def _raw_attributes(events: Iterable[Any]) -> Iterable[Mapping[str, Any]]:
    for event in events:
        for attribute in _list(_obj(event).get("attributes")):
            if _is_mapping(attribute):
                yield attribute


def attributes_are_base64(event_lists: Iterable[Iterable[Any]]) -> bool:
    # Stops at the first plain key (the common case on 0.37+ nodes decides on the first attribute).
    seen = False
    for events in event_lists:
        for a in _raw_attributes(events):
            key = a.get("key")
            if isinstance(key, str) and key:
                if _b64_text(key) is None:
                    return False
                seen = True
    return seen


def parse_events(events: Any, *, base64_attributes: bool) -> tuple[Event, ...]:
    parsed = []
    for event in _list(events):
        event = _obj(event)
        attributes = []
        for raw in _list(event.get("attributes")):
            if not _is_mapping(raw):
                continue
            key, value = raw.get("key") or "", raw.get("value")
            value = "" if value is None else value if type(value) is str else str(value)
            if base64_attributes:
                key = _b64_text(str(key)) or str(key)
                value = (_b64_text(value) if value else "") or value
            index = raw.get("index", False)
            attributes.append(
                _new_attribute(key if type(key) is str else str(key), value, index is True or bool(index))
            )
        parsed.append(Event(type=str(event.get("type") or ""), attributes=tuple(attributes)))
    return tuple(parsed)


def _tx_result(raw: Any, index: int, *, base64_attributes: bool) -> TxResult:
    raw = _obj(raw)
    return TxResult(
        index=index,
        code=to_int(raw.get("code")),
        codespace=str(raw.get("codespace") or ""),
        gas_wanted=to_int(raw.get("gas_wanted")),
        gas_used=to_int(raw.get("gas_used")),
        log=str(raw.get("log") or ""),
        events=parse_events(raw.get("events"), base64_attributes=base64_attributes),
    )


# --- responses -----------------------------------------------------------------------------------------


def parse_status(body: Any) -> Status:
    result = result_of(body)
    node, sync = _obj(result.get("node_info")), _obj(result.get("sync_info"))
    if "latest_block_height" not in sync:
        raise MalformedResponse("status has no sync_info.latest_block_height")
    earliest = sync.get("earliest_block_height")
    return Status(
        chain_id=str(node.get("network") or ""),
        latest_height=to_int(sync.get("latest_block_height")),
        latest_block_hash=to_hash(sync.get("latest_block_hash")),
        latest_block_time=to_time(sync.get("latest_block_time")),
        earliest_height=to_int(earliest) if earliest not in (None, "") else None,
        catching_up=bool(sync.get("catching_up", False)),
        node_version=str(node.get("version") or ""),
    )


def parse_block(body: Any) -> Block:
    result = result_of(body)
    block = _obj(result.get("block"))
    header = _obj(block.get("header"))
    if "height" not in header:
        raise MalformedResponse("block has no header.height")
    txs = []
    for tx in _list(_obj(block.get("data")).get("txs")):
        try:
            txs.append(base64.b64decode(str(tx), validate=True))
        except (binascii.Error, ValueError):
            raise MalformedResponse("a block tx is not base64")
    return Block(
        height=to_int(header.get("height")),
        hash=to_hash(_obj(result.get("block_id")).get("hash")),
        parent_hash=to_hash(_obj(header.get("last_block_id")).get("hash")),
        time=to_time(header.get("time")),
        chain_id=str(header.get("chain_id") or ""),
        proposer=to_hash(header.get("proposer_address")),
        txs=tuple(txs),
    )


def parse_block_results(body: Any) -> BlockResults:
    result = result_of(body)
    if "height" not in result:
        raise MalformedResponse("block_results has no height")
    txs = _list(result.get("txs_results"))
    phases = {
        name: _list(result.get(name))
        for name in ("begin_block_events", "end_block_events", "finalize_block_events")
    }
    encoded = attributes_are_base64([*phases.values(), *(_list(_obj(t).get("events")) for t in txs)])
    return BlockResults(
        height=to_int(result.get("height")),
        txs=tuple(_tx_result(t, i, base64_attributes=encoded) for i, t in enumerate(txs)),
        begin_block_events=parse_events(phases["begin_block_events"], base64_attributes=encoded),
        end_block_events=parse_events(phases["end_block_events"], base64_attributes=encoded),
        finalize_block_events=parse_events(phases["finalize_block_events"], base64_attributes=encoded),
        app_hash=str(result.get("app_hash") or ""),
    )


def parse_tx(body: Any) -> TxInfo:
    result = result_of(body)
    raw_result = _obj(result.get("tx_result"))
    encoded = attributes_are_base64([_list(raw_result.get("events"))])
    try:
        tx = base64.b64decode(str(result.get("tx") or ""), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedResponse("tx is not base64")
    index = to_int(result.get("index"))
    return TxInfo(
        hash=to_hash(result.get("hash")),
        height=to_int(result.get("height")),
        index=index,
        tx=tx,
        result=_tx_result(raw_result, index, base64_attributes=encoded),
    )


def parse_broadcast(body: Any) -> BroadcastResult:
    result = result_of(body)
    return BroadcastResult(
        code=to_int(result.get("code")),
        codespace=str(result.get("codespace") or ""),
        hash=to_hash(result.get("hash")),
        log=str(result.get("log") or ""),
    )


def parse_new_block_event(message: Any) -> NewBlock | None:
    """A WebSocket message for tm.event='NewBlock' or 'NewBlockHeader'; None for anything else
    (the subscription acknowledgement, other events)."""
    result = _obj(_obj(message).get("result"))
    value = _obj(_obj(result.get("data")).get("value"))
    block = _obj(value.get("block"))
    header = _obj(block.get("header")) or _obj(value.get("header"))
    if "height" not in header:
        return None
    begin = _list(_obj(value.get("result_begin_block")).get("events"))
    end = _list(_obj(value.get("result_end_block")).get("events"))
    final = _list(_obj(value.get("result_finalize_block")).get("events"))
    encoded = attributes_are_base64([begin, end, final])
    events = tuple(parse_events(begin + end + final, base64_attributes=encoded))
    return NewBlock(
        height=to_int(header.get("height")),
        hash=to_hash(_obj(value.get("block_id")).get("hash")),
        time=to_time(header.get("time")),
        events=events,
    )
