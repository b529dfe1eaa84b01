"""Parse CometBFT JSON-RPC bodies (0.34, 0.37, 0.38) into plain values. Pure functions.

Strict by design: every field is read as the JSON type CometBFT sends for it, and anything else
raises `MalformedResponse` (a fault of the source: the client fails over, it is never read as an
empty block or a zero). Per field:

- integers: a JSON integer or a string of decimal digits (Go's int64 encoding), in range; never
  null, "", a fraction or a boolean;
- lists: a JSON list, or null where Go sends a nil slice (`txs_results`, the phase events,
  `block.data.txs`, an event's `attributes`); never an object or a string;
- objects: a JSON object where CometBFT always sends one (`block_id`, `block.header`,
  `sync_info`, ...); never null;
- booleans (`catching_up`, an attribute's `index`): JSON true/false only;
- timestamps: RFC 3339 with up to nanoseconds and a zone, a real date and time;
- hashes: hex (even length) or base64, uppercase hex out;
- fields Go omits when empty (`omitempty`: a tx result's code, codespace, log, gas, events; an
  event's type and attributes; an attribute's key, value, index) read as empty when absent, but
  when present they must have their type. Keys CometBFT always sends (`height`, `txs_results`,
  the phase events of the response's version, `block.data.txs`, ...) must be there.

Across responses `CometRpc.block_with_results` checks that a height's /block and /block_results
agree (same height, one tx result per tx): a list cut short in one of them is a fault too. An event
list cut short cannot be told from a shorter one; nothing in a response counts its events.

Event attributes: a 0.34 node sends keys and values base64-encoded, 0.37+ as text; both become one
canonical text (`indexer.rpc.attributes`), in the encoding of the node's version when the caller
knows it (the client does, from the source's /status), detected per body otherwise.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import msgspec

# The attribute rules are part of the parser's interface (re-exported).
from indexer.rpc.attributes import MARKER as MARKER
from indexer.rpc.attributes import attribute_bytes as attribute_bytes
from indexer.rpc.attributes import attributes_are_base64 as attributes_are_base64
from indexer.rpc.attributes import attributes_base64_for as attributes_base64_for
from indexer.rpc.attributes import canonical_bytes as canonical_bytes
from indexer.rpc.attributes import canonical_text as canonical_text
from indexer.rpc.values import Attribute as Attribute
from indexer.rpc.values import Block as Block
from indexer.rpc.values import BlockResults as BlockResults
from indexer.rpc.values import BroadcastResult as BroadcastResult
from indexer.rpc.values import Event as Event

# The values it returns (re-exported).
from indexer.rpc.values import MalformedResponse as MalformedResponse
from indexer.rpc.values import NewBlock as NewBlock
from indexer.rpc.values import Status as Status
from indexer.rpc.values import TxInfo as TxInfo
from indexer.rpc.values import TxResult as TxResult

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT32_MAX = 2**32 - 1

_INTEGER = re.compile(r"-?[0-9]{1,20}")
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})+")
_TIME = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]{1,9}))?(Z|[+-][0-9]{2}:[0-9]{2})"
)
_MISSING: Any = object()


# --- field readers -----------------------------------------------------------------------------------


def _bad(where: str, what: str, value: Any = _MISSING) -> MalformedResponse:
    if value is _MISSING:
        return MalformedResponse(f"{where}: {what}")
    shown = repr(value)
    return MalformedResponse(f"{where}: {what}, got {shown[:80]}{'…' if len(shown) > 80 else ''}")


def _required(obj: Mapping[str, Any], key: str, where: str) -> Any:
    value = obj.get(key, _MISSING)
    if value is _MISSING:
        raise _bad(f"{where}.{key}", "missing")
    return value


def _obj(value: Any, where: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise _bad(where, "not an object", value)
    return value


def _list(value: Any, where: str) -> list[Any]:
    """A list, or null for Go's nil slice."""
    if type(value) is list:
        return value
    if value is None:
        return []
    raise _bad(where, "not a list", value)


def _str(value: Any, where: str) -> str:
    if type(value) is not str:
        raise _bad(where, "not a string", value)
    return value


def _bool(value: Any, where: str) -> bool:
    if type(value) is not bool:
        raise _bad(where, "not a boolean", value)
    return value


def to_int(value: Any, where: str = "integer", *, minimum: int = INT64_MIN, maximum: int = INT64_MAX) -> int:
    """A JSON integer or a string of decimal digits, within [minimum, maximum]."""
    if type(value) is int:
        number = value
    elif type(value) is str and _INTEGER.fullmatch(value):
        number = int(value)
    else:
        raise _bad(where, "not an integer", value)
    if not minimum <= number <= maximum:
        raise _bad(where, f"out of range [{minimum}, {maximum}]", value)
    return number


def _opt_int(
    obj: Mapping[str, Any], key: str, where: str, *, minimum: int = INT64_MIN, maximum: int = INT64_MAX
) -> int:
    value = obj.get(key, _MISSING)
    return 0 if value is _MISSING else to_int(value, f"{where}.{key}", minimum=minimum, maximum=maximum)


def _opt_str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key, _MISSING)
    return "" if value is _MISSING else _str(value, f"{where}.{key}")


def to_hash(value: Any, where: str = "hash", *, empty: bool = False) -> str:
    """Uppercase hex; base64-encoded hashes (some encoders) are converted. "" only where `empty`."""
    text = _str(value, where)
    if not text:
        if empty:
            return ""
        raise _bad(where, "empty hash")
    if _HEX.fullmatch(text):
        return text.upper()
    try:
        return base64.b64decode(text, validate=True).hex().upper()
    except (binascii.Error, ValueError):
        raise _bad(where, "not a hex or base64 hash", value) from None


def to_time(value: Any, where: str = "time") -> datetime:
    """RFC 3339 with up to nanoseconds (Python keeps microseconds) and a zone; a real instant."""
    text = _str(value, where)
    match = _TIME.fullmatch(text)
    if match is None:
        raise _bad(where, "not an RFC 3339 timestamp", value)
    head, fraction, zone = match.groups()
    micros = (fraction or "")[:6].ljust(6, "0")
    try:
        return datetime.fromisoformat(f"{head}.{micros}{'+00:00' if zone == 'Z' else zone}")
    except ValueError:
        raise _bad(where, "an impossible timestamp", value) from None


def _b64(value: str, where: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(where, "not base64", value) from None


def result_of(body: Any) -> dict[str, Any]:
    """The `result` of a JSON-RPC envelope (or the body itself when it is already unwrapped)."""
    if type(body) is not dict:
        raise MalformedResponse("response is not a JSON object")
    if body.get("error") is not None:
        raise MalformedResponse(f"RPC error: {str(body['error'])[:300]}")
    result = body.get("result", body if "jsonrpc" not in body else None)
    if type(result) is not dict:
        raise MalformedResponse("response has no result object")
    return result


# --- events ------------------------------------------------------------------------------------------


def _attribute_text(value: Any, base64_attributes: bool) -> str | None:
    """The stored text of an attribute key or value as sent (`_MISSING` when omitted); None when it
    has the wrong type or is not base64 (the caller names the field: no path strings in the hot loop)."""
    if type(value) is str:
        if not base64_attributes:
            return canonical_text(value)
        if not value:
            return ""
        try:
            return canonical_bytes(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            return None
    if value is _MISSING or (value is None and base64_attributes):  # omitempty; 0.34's nil bytes
        return ""
    return None


# The attributes of JSON objects each checked to be exactly {key: str, value: str, index: bool} with
# canonical texts, built in one call (in C) instead of one constructor call each.
_ATTRIBUTES = tuple[Attribute, ...]
_adopt_attributes = functools.partial(msgspec.convert, type=_ATTRIBUTES)


def parse_events(
    events: Any, *, base64_attributes: bool, where: str = "events", plain_text: bool = False
) -> tuple[Event, ...]:
    """`plain_text`: the caller saw that every string of the body is already its canonical text
    (ASCII, no escape sequence, no marker; see `body_is_plain_text`), so none is converted; types and
    shapes are checked all the same."""
    plain = plain_text and not base64_attributes
    parsed = []
    for i, event in enumerate(_list(events, where)):
        if type(event) is not dict:
            raise _bad(f"{where}[{i}]", "not an object", event)
        kind = event.get("type", "")
        if type(kind) is not str:
            raise _bad(f"{where}[{i}].type", "not a string", kind)
        raw_attributes = event.get("attributes")
        if type(raw_attributes) is not list:
            raw_attributes = _list(raw_attributes, f"{where}[{i}].attributes")
        attributes: list[Attribute] = []
        if plain:
            # The common shape, checked in one pass; the first attribute that is not it (an omitted
            # field, an extra key, a wrong type) sends the whole event through the loop below.
            for attribute in raw_attributes:
                if not (
                    type(attribute) is dict
                    and len(attribute) == 3
                    and type(attribute.get("key")) is str
                    and type(attribute.get("value")) is str
                    and type(attribute.get("index")) is bool
                ):
                    break
            else:
                parsed.append(Event(kind, _adopt_attributes(raw_attributes)))
                continue
        for j, attribute in enumerate(raw_attributes):
            if type(attribute) is not dict:
                raise _bad(f"{where}[{i}].attributes[{j}]", "not an object", attribute)
            raw_key, raw_value = attribute.get("key", _MISSING), attribute.get("value", _MISSING)
            key = _attribute_text(raw_key, base64_attributes)
            value = _attribute_text(raw_value, base64_attributes)
            index = attribute.get("index", False)
            if key is None or value is None or type(index) is not bool:
                name, got, what = (
                    ("key", raw_key, "not a string")
                    if key is None
                    else ("value", raw_value, "not a string")
                    if value is None
                    else ("index", index, "not a boolean")
                )
                if type(got) is str:
                    what = "not base64"
                raise _bad(f"{where}[{i}].attributes[{j}].{name}", what, got)
            attributes.append(Attribute(key, value, index))
        parsed.append(Event(kind if plain else canonical_text(kind), tuple(attributes)))
    return tuple(parsed)


def _tx_result(
    raw: Any, index: int, where: str, *, base64_attributes: bool, plain_text: bool = False
) -> TxResult:
    result = _obj(raw, where)
    return TxResult(
        index=index,
        code=_opt_int(result, "code", where, minimum=0, maximum=UINT32_MAX),
        codespace=_opt_str(result, "codespace", where),
        gas_wanted=_opt_int(result, "gas_wanted", where),
        gas_used=_opt_int(result, "gas_used", where),
        log=_opt_str(result, "log", where),
        events=parse_events(
            result.get("events"),
            base64_attributes=base64_attributes,
            where=f"{where}.events",
            plain_text=plain_text,
        ),
    )


# --- responses -----------------------------------------------------------------------------------------


def parse_status(body: Any) -> Status:
    result = result_of(body)
    node = _obj(_required(result, "node_info", "status"), "status.node_info")
    sync = _obj(_required(result, "sync_info", "status"), "status.sync_info")
    earliest = sync.get("earliest_block_height", _MISSING)  # older nodes do not send it
    return Status(
        chain_id=_str(_required(node, "network", "status.node_info"), "status.node_info.network"),
        latest_height=to_int(
            _required(sync, "latest_block_height", "status.sync_info"),
            "status.sync_info.latest_block_height",
            minimum=0,
        ),
        latest_block_hash=to_hash(
            _required(sync, "latest_block_hash", "status.sync_info"),
            "status.sync_info.latest_block_hash",
            empty=True,
        ),
        latest_block_time=to_time(
            _required(sync, "latest_block_time", "status.sync_info"), "status.sync_info.latest_block_time"
        ),
        earliest_height=None
        if earliest is _MISSING
        else to_int(earliest, "status.sync_info.earliest_block_height", minimum=0),
        catching_up=_bool(_required(sync, "catching_up", "status.sync_info"), "status.sync_info.catching_up"),
        node_version=_str(_required(node, "version", "status.node_info"), "status.node_info.version"),
    )


def parse_block(body: Any) -> Block:
    result = result_of(body)
    block_id = _obj(_required(result, "block_id", "block"), "block.block_id")
    block = _obj(_required(result, "block", "block"), "block.block")
    header = _obj(_required(block, "header", "block.block"), "block.block.header")
    data = _obj(_required(block, "data", "block.block"), "block.block.data")
    where = "block.block.header"
    last_block_id = _obj(_required(header, "last_block_id", where), f"{where}.last_block_id")
    raw_txs = _list(_required(data, "txs", "block.block.data"), "block.block.data.txs")
    txs = []
    for i, tx in enumerate(raw_txs):
        txs.append(_b64(_str(tx, f"block.block.data.txs[{i}]"), f"block.block.data.txs[{i}]"))
    return Block(
        height=to_int(_required(header, "height", where), f"{where}.height", minimum=1),
        hash=to_hash(_required(block_id, "hash", "block.block_id"), "block.block_id.hash"),
        # Empty at a chain's first block (its initial height need not be 1).
        parent_hash=to_hash(
            _required(last_block_id, "hash", f"{where}.last_block_id"),
            f"{where}.last_block_id.hash",
            empty=True,
        ),
        time=to_time(_required(header, "time", where), f"{where}.time"),
        chain_id=_str(_required(header, "chain_id", where), f"{where}.chain_id"),
        proposer=to_hash(_required(header, "proposer_address", where), f"{where}.proposer_address"),
        txs=tuple(txs),
    )


_PHASES = ("begin_block_events", "end_block_events", "finalize_block_events")


def body_is_plain_text(content: bytes) -> bool:
    """Every JSON string in these raw body bytes is its own canonical text: ASCII, no `\\u` escape
    (so no NUL, no lone surrogate) and no `b64:` anywhere. Three scans in C; the parsers then skip
    the per-string conversion (`plain_text`)."""
    return content.isascii() and b"\\u" not in content and MARKER.encode() not in content


def parse_block_results(
    body: Any, *, base64_attributes: bool | None = None, plain_text: bool = False
) -> BlockResults:
    """`base64_attributes`: the node's encoding (`attributes_base64_for`), or None to detect it.
    `plain_text`: `body_is_plain_text` of the bytes the body was read from."""
    result = result_of(body)
    height = to_int(_required(result, "height", "block_results"), "block_results.height", minimum=1)
    txs = _list(_required(result, "txs_results", "block_results"), "block_results.txs_results")
    # 0.34 / 0.37 send begin_block_events and end_block_events, 0.38 finalize_block_events.
    if "finalize_block_events" not in result:
        _required(result, "begin_block_events", "block_results")
        _required(result, "end_block_events", "block_results")
    phases = {name: _list(result.get(name), f"block_results.{name}") for name in _PHASES}
    app_hash = result.get("app_hash")
    if app_hash is not None and type(app_hash) is not str:
        raise _bad("block_results.app_hash", "not a string", app_hash)
    if base64_attributes is None:
        base64_attributes = attributes_are_base64(
            [*phases.values(), *(t.get("events") for t in txs if type(t) is dict)]
        )
    return BlockResults(
        height=height,
        txs=tuple(
            _tx_result(
                t,
                i,
                f"block_results.txs_results[{i}]",
                base64_attributes=base64_attributes,
                plain_text=plain_text,
            )
            for i, t in enumerate(txs)
        ),
        begin_block_events=parse_events(
            phases["begin_block_events"],
            base64_attributes=base64_attributes,
            where="block_results.begin_block_events",
            plain_text=plain_text,
        ),
        end_block_events=parse_events(
            phases["end_block_events"],
            base64_attributes=base64_attributes,
            where="block_results.end_block_events",
            plain_text=plain_text,
        ),
        finalize_block_events=parse_events(
            phases["finalize_block_events"],
            base64_attributes=base64_attributes,
            where="block_results.finalize_block_events",
            plain_text=plain_text,
        ),
        app_hash=app_hash or "",
    )


def check_block_results(block: Block, results: BlockResults, *, height: int | None = None) -> None:
    """A height's /block and /block_results must agree: the same height (the one asked for) and
    one tx result per tx. Raises MalformedResponse otherwise."""
    if block.height != results.height:
        raise MalformedResponse(f"/block is height {block.height} but /block_results is {results.height}")
    if height is not None and block.height != height:
        raise MalformedResponse(f"asked for height {height}, got {block.height}")
    if len(block.txs) != len(results.txs):
        raise MalformedResponse(
            f"height {block.height}: {len(block.txs)} txs in /block but {len(results.txs)} tx results"
        )


def parse_tx(body: Any, *, base64_attributes: bool | None = None, plain_text: bool = False) -> TxInfo:
    result = result_of(body)
    raw_result = _obj(_required(result, "tx_result", "tx"), "tx.tx_result")
    if base64_attributes is None:
        base64_attributes = attributes_are_base64([raw_result.get("events")])
    index = to_int(_required(result, "index", "tx"), "tx.index", minimum=0)
    return TxInfo(
        hash=to_hash(_required(result, "hash", "tx"), "tx.hash"),
        height=to_int(_required(result, "height", "tx"), "tx.height", minimum=1),
        index=index,
        tx=_b64(_str(_required(result, "tx", "tx"), "tx.tx"), "tx.tx"),
        result=_tx_result(
            raw_result, index, "tx.tx_result", base64_attributes=base64_attributes, plain_text=plain_text
        ),
    )


def parse_broadcast(body: Any) -> BroadcastResult:
    result = result_of(body)
    return BroadcastResult(
        code=_opt_int(result, "code", "broadcast", minimum=0, maximum=UINT32_MAX),
        codespace=_opt_str(result, "codespace", "broadcast"),
        # A tx CheckTx refused may come back without a hash.
        hash=to_hash(result.get("hash", ""), "broadcast.hash", empty=True),
        log=_opt_str(result, "log", "broadcast"),
    )


_NEW_BLOCK_TYPES = ("tendermint/event/NewBlock", "tendermint/event/NewBlockHeader")


def parse_new_block_event(message: Any) -> NewBlock | None:
    """A WebSocket message for tm.event='NewBlock' or 'NewBlockHeader'; None for anything else
    (the subscription acknowledgement, other events). A NewBlock message of the wrong shape is
    malformed."""
    if type(message) is not dict:
        raise MalformedResponse("message is not a JSON object")
    result = message.get("result")
    data = result.get("data") if type(result) is dict else None
    if type(data) is not dict:
        return None
    value = data.get("value")
    kind = data.get("type")
    if type(value) is not dict:
        if kind in _NEW_BLOCK_TYPES:
            raise _bad("event.data.value", "not an object", value)
        return None
    block = value.get("block")
    if kind not in _NEW_BLOCK_TYPES and not (
        (type(block) is dict and "header" in block) or "header" in value
    ):
        return None
    where = "event.data.value"
    if block is not None:
        header = _obj(
            _required(_obj(block, f"{where}.block"), "header", f"{where}.block"), f"{where}.block.header"
        )
    else:
        header = _obj(_required(value, "header", where), f"{where}.header")
    phases = []
    for name in ("result_begin_block", "result_end_block", "result_finalize_block"):
        phase = value.get(name)
        phases.append(
            _list(_obj(phase, f"{where}.{name}").get("events"), f"{where}.{name}.events")
            if phase is not None
            else []
        )
    encoded = attributes_are_base64(phases)
    block_id = value.get("block_id")
    return NewBlock(
        height=to_int(_required(header, "height", f"{where}.header"), f"{where}.header.height", minimum=1),
        hash=""
        if block_id is None
        else to_hash(
            _required(_obj(block_id, f"{where}.block_id"), "hash", f"{where}.block_id"),
            f"{where}.block_id.hash",
        ),
        time=to_time(_required(header, "time", f"{where}.header"), f"{where}.header.time"),
        events=parse_events(
            phases[0] + phases[1] + phases[2], base64_attributes=encoded, where=f"{where}.events"
        ),
    )
