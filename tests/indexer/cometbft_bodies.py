"""CometBFT bodies generated from a model of a block, in each node version's shape, with the rows
the indexer must store for them; Hypothesis strategies for the models and for corruptions of the
bodies; and a tiny loopback RPC node that serves a model chain in one shape (or corrupted).

A model attribute holds raw bytes: a 0.34 node sends them base64-encoded, a 0.37/0.38 node as text
(undecodable bytes as the lone surrogates U+DC80..U+DCFF, the usual way raw bytes travel as text).
Either way the stored text is `expected_text(bytes)`: the text where the bytes are UTF-8 without
NUL and do not start with `b64:`, else `b64:` + base64 of the bytes.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from hypothesis import strategies as st

SHAPES = ("0.34", "0.37", "0.38")
VERSIONS = {"0.34": "v0.34.29", "0.37": "0.37.4", "0.38": "0.38.12"}
# Realistic attribute keys (none of them is valid base64 of printable text).
KEYS = (
    "sender",
    "recipient",
    "amount",
    "action",
    "module",
    "msg_index",
    "fee",
    "fee_payer",
    "acc_seq",
    "signature",
    "spender",
    "receiver",
    "validator",
    "mode",
    "base_fee",
    "key",
    "creator",
    "packet_data",
)
AWKWARD_BYTES = (
    b"",
    b"\x01",  # valid UTF-8, not printable: the same text from every node version
    b"\x00",  # NUL: jsonb cannot hold it
    b"a\x00b",
    b"\xff",
    b"\xff\xfe\x00\x01",
    b"\xed\xa0\x80",  # a UTF-8-encoded surrogate: not UTF-8
    b"b64:AQ==",  # text that looks like the marker
    b"b64:",
    "é 中文 😀".encode(),
    b'quote " backslash \\ tab \t newline \n',
)


def expected_text(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text or text.startswith("b64:"):
        return "b64:" + base64.b64encode(raw).decode()
    return text


# --- the model -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MAttr:
    key: bytes
    value: bytes
    index: bool


@dataclass(frozen=True)
class MEvent:
    type: str
    attributes: tuple[MAttr, ...]


@dataclass(frozen=True)
class MTx:
    raw: bytes
    code: int
    codespace: str
    gas_wanted: int
    gas_used: int
    log: str
    events: tuple[MEvent, ...]


@dataclass(frozen=True)
class MBlock:
    height: int
    hash: bytes
    parent: bytes
    time: datetime
    nanos: str  # digits CometBFT prints past the microseconds
    chain_id: str
    proposer: bytes
    txs: tuple[MTx, ...]
    begin: tuple[MEvent, ...]
    end: tuple[MEvent, ...]


def attribute_bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from(AWKWARD_BYTES),
        st.binary(max_size=10),
        st.text(max_size=8).map(lambda t: t.encode("utf-8")),
    )


def events(keys: st.SearchStrategy[bytes]) -> st.SearchStrategy[tuple[MEvent, ...]]:
    attribute = st.builds(MAttr, key=keys, value=attribute_bytes(), index=st.booleans())
    event = st.builds(
        MEvent,
        type=st.one_of(
            st.sampled_from(["transfer", "message", "coin_received", "b64:odd"]), st.text(max_size=8)
        ),
        attributes=st.lists(attribute, max_size=3).map(tuple),
    )
    return st.lists(event, max_size=3).map(tuple)


def any_keys() -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from(KEYS).map(str.encode), attribute_bytes())


def realistic_keys() -> st.SearchStrategy[bytes]:
    return st.sampled_from(KEYS).map(str.encode)


INT64 = st.integers(min_value=0, max_value=2**63 - 1)


@st.composite
def blocks(draw: st.DrawFn, keys: st.SearchStrategy[bytes] | None = None) -> MBlock:
    keys = keys if keys is not None else any_keys()
    txs = draw(
        st.lists(
            st.builds(
                MTx,
                raw=st.binary(min_size=1, max_size=24),
                code=st.one_of(st.just(0), st.integers(min_value=0, max_value=2**32 - 1)),
                codespace=st.one_of(st.just(""), st.text(max_size=6)),
                gas_wanted=INT64,
                gas_used=INT64,
                log=st.text(max_size=10),
                events=events(keys),
            ),
            max_size=3,
        )
    )
    height = draw(st.integers(min_value=1, max_value=10**12))
    first = draw(st.booleans()) if height < 5 else False
    return MBlock(
        height=height,
        hash=draw(st.binary(min_size=32, max_size=32)),
        parent=b"" if first else draw(st.binary(min_size=32, max_size=32)),
        time=draw(
            st.datetimes(
                min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
            )
        ),
        nanos=draw(st.sampled_from(["", "0", "7", "123"])),
        chain_id=draw(st.one_of(st.just("fleetops-sim-1"), st.text(max_size=10))),
        proposer=draw(st.binary(min_size=20, max_size=20)),
        txs=tuple(txs),
        begin=draw(events(keys)),
        end=draw(events(keys)),
    )


# --- rendering -------------------------------------------------------------------------------------------


class Choices:
    """The renderer's free choices (integer as number or string, empty as "" / null / absent, hex
    case); a seeded stream, or Hypothesis's `data` in property tests."""

    def __init__(self, draw: Callable[[st.SearchStrategy[Any]], Any] | None = None) -> None:
        self._draw = draw
        self._n = 0

    def pick(self, options: list[Any]) -> Any:
        if self._draw is not None:
            return self._draw(st.sampled_from(options))
        self._n += 1
        return options[self._n % len(options)]


ABSENT = object()  # an empty attribute key or value left out (Go's omitempty)


def _int(value: int, c: Choices) -> Any:
    return c.pick([str(value), value])


def _hex(raw: bytes, c: Choices) -> str:
    return c.pick([raw.hex().upper(), raw.hex()])


def _time(block: MBlock) -> str:
    head = block.time.strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{block.time.microsecond:06d}{block.nanos}"
    if block.time.microsecond == 0 and not block.nanos:
        return f"{head}Z"
    return f"{head}.{fraction}Z"


def _attr_value(raw: bytes, shape: str) -> str:
    if shape == "0.34":
        return base64.b64encode(raw).decode()
    return raw.decode("utf-8", "surrogateescape")


def render_events(items: tuple[MEvent, ...], shape: str, c: Choices) -> list[dict[str, Any]]:
    out = []
    for event in items:
        rendered: dict[str, Any] = {"type": event.type}
        attributes = []
        for a in event.attributes:
            attribute: dict[str, Any] = {}
            for name, raw in (("key", a.key), ("value", a.value)):
                empty = ["", ABSENT, None] if shape == "0.34" else ["", ABSENT]
                choice = c.pick(empty) if not raw else _attr_value(raw, shape)
                if choice is not ABSENT:
                    attribute[name] = choice
            if a.index or c.pick([True, False]):
                attribute["index"] = a.index
            attributes.append(attribute)
        if attributes or c.pick([True, False]):
            rendered["attributes"] = attributes or c.pick([[], None])
        out.append(rendered)
    return out


def render_block(block: MBlock, c: Choices) -> dict[str, Any]:
    parent = _hex(block.parent, c) if block.parent else ""
    txs = [base64.b64encode(tx.raw).decode() for tx in block.txs]
    return {
        "jsonrpc": "2.0",
        "id": -1,
        "result": {
            "block_id": {
                "hash": _hex(block.hash, c),
                "parts": {"total": 1, "hash": block.hash.hex().upper()},
            },
            "block": {
                "header": {
                    "version": {"block": "11"},
                    "chain_id": block.chain_id,
                    "height": _int(block.height, c),
                    "time": _time(block),
                    "last_block_id": {"hash": parent, "parts": {"total": 1, "hash": parent}},
                    "app_hash": "AB" * 16,
                    "proposer_address": _hex(block.proposer, c),
                },
                "data": {"txs": txs or c.pick([[], None])},
                "evidence": {"evidence": []},
                "last_commit": {"height": str(block.height - 1), "round": 0, "signatures": []},
            },
        },
    }


def render_results(block: MBlock, shape: str, c: Choices) -> dict[str, Any]:
    txs_results = []
    for tx in block.txs:
        result: dict[str, Any] = {"data": None, "info": ""}
        for name, value in (("code", tx.code), ("gas_wanted", tx.gas_wanted), ("gas_used", tx.gas_used)):
            if value or c.pick([True, False]):
                result[name] = value if name == "code" else _int(value, c)
        for name, text in (("codespace", tx.codespace), ("log", tx.log)):
            if text or c.pick([True, False]):
                result[name] = text
        if tx.events or c.pick([True, False]):
            result["events"] = render_events(tx.events, shape, c) or c.pick([[], None])
        txs_results.append(result)
    body: dict[str, Any] = {"height": _int(block.height, c), "txs_results": txs_results or c.pick([[], None])}
    if shape == "0.38":
        body["finalize_block_events"] = render_events(block.begin + block.end, shape, c) or c.pick([[], None])
        body["app_hash"] = c.pick(["q83vEjRWeJA=", "", None])
    else:
        body["begin_block_events"] = render_events(block.begin, shape, c) or c.pick([[], None])
        body["end_block_events"] = render_events(block.end, shape, c) or c.pick([[], None])
    body["validator_updates"] = None
    body["consensus_param_updates"] = c.pick([None, {"block": {"max_bytes": "22020096"}}])
    return {"jsonrpc": "2.0", "id": -1, "result": body}


def render_status(block: MBlock, shape: str, earliest: int = 1) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": -1,
        "result": {
            "node_info": {"network": block.chain_id, "version": VERSIONS[shape], "moniker": "stub"},
            "sync_info": {
                "latest_block_hash": block.hash.hex().upper(),
                "latest_block_height": str(block.height),
                "latest_block_time": _time(block),
                "earliest_block_height": str(earliest),
                "catching_up": False,
            },
        },
    }


# --- the rows the indexer must store -----------------------------------------------------------------------


def _event_rows(
    phase: str, tx_index: int | None, items: tuple[MEvent, ...], height: int
) -> list[tuple[Any, ...]]:
    return [
        (
            0,
            height,
            phase,
            tx_index,
            i,
            expected_text(event.type.encode("utf-8"))[:200],
            [
                {"key": expected_text(a.key), "value": expected_text(a.value), "index": a.index}
                for a in event.attributes
            ],
        )
        for i, event in enumerate(items)
    ]


def expected_rows(block: MBlock, shape: str) -> tuple[list[Any], list[Any], list[Any]]:
    time = block.time.replace(microsecond=block.time.microsecond)
    block_row = [
        (
            0,
            block.height,
            block.hash.hex().upper(),
            block.parent.hex().upper(),
            time,
            block.proposer.hex().upper(),
            len(block.txs),
        )
    ]
    tx_rows = [
        (0, block.height, i, hashlib.sha256(tx.raw).hexdigest().upper(), tx.code, tx.gas_wanted, tx.gas_used)
        for i, tx in enumerate(block.txs)
    ]
    if shape == "0.38":
        event_rows = _event_rows("finalize_block", None, block.begin + block.end, block.height)
    else:
        event_rows = _event_rows("begin_block", None, block.begin, block.height)
        event_rows += _event_rows("end_block", None, block.end, block.height)
    for i, tx in enumerate(block.txs):
        event_rows += _event_rows("tx", i, tx.events, block.height)
    return block_row, tx_rows, event_rows


# --- corruptions -------------------------------------------------------------------------------------------

# Values that are wrong for a field of each kind whatever the field held (so a body corrupted with one
# of them is no valid rendering of any block): a parser must raise on it, or (for a field it does not
# read) give the same rows.
WRONG: dict[str, list[Any]] = {
    "obj": [None, [], "", "x", 5, True],
    "int": [None, True, False, 1.5, 54810790.7, "", "1.5", "12a", " 7", "1e3", "٣", [], {}],
    "int_min1": [None, True, 1.5, "", "x", 0, "0", -3, "-3", [], {}],
    "code": [None, True, 1.5, "", -1, 2**32, [], {}],
    "hash": [None, 5, True, "", "%zz%", "abc", [], {}],
    "hash_or_empty": [None, 5, True, "%zz%", "abc", [], {}],
    "time": [
        None,
        5,
        "",
        "2021-02-30T00:00:00Z",
        "2021-13-01T00:00:00Z",
        "2021-01-01T24:00:00Z",
        "2021-01-01T00:00:00",
        "yesterday",
        [],
        {},
    ],
    "text": [None, 5, True, 1.5, [], {}],
    "nullable_text": [5, True, [], {}],
    "b64": [None, 5, True, "%%%%", "abc", "AQ=", [], {}],
    "attr_b64": [5, True, "%%%%", "abc", "AQ=", [], {}],  # null is 0.34's nil bytes: valid
    "attr_text": [None, 5, True, 1.5, [], {}],
    "bool": [None, "false", "true", 0, 1, [], {}],
    # null is Go's nil slice (valid for an empty list); for the tx lists it, and a shortened list,
    # are caught by the /block vs /block_results check.
    "txs": [None, {}, "", "x", 5, True],
    "events": [{}, {"type": "x"}, "", "x", 5, True],
}
EVENT_LISTS = ("begin_block_events", "end_block_events", "finalize_block_events")
IGNORED = "ignored"

_BLOCK_SCHEMA: dict[tuple[str, ...], tuple[str, bool]] = {
    (): ("obj", True),
    ("block_id",): ("obj", True),
    ("block_id", "hash"): ("hash", True),
    ("block",): ("obj", True),
    ("block", "header"): ("obj", True),
    ("block", "header", "height"): ("int_min1", True),
    ("block", "header", "time"): ("time", True),
    ("block", "header", "chain_id"): ("text", True),
    ("block", "header", "proposer_address"): ("hash", True),
    ("block", "header", "last_block_id"): ("obj", True),
    ("block", "header", "last_block_id", "hash"): ("hash_or_empty", True),
    ("block", "data"): ("obj", True),
    ("block", "data", "txs"): ("txs", True),
    ("block", "data", "txs", "*"): ("b64", True),
}
_RESULTS_SCHEMA: dict[tuple[str, ...], tuple[str, bool]] = {
    (): ("obj", True),
    ("height",): ("int_min1", True),
    ("txs_results",): ("txs", True),
    ("txs_results", "*"): ("obj", True),
    ("txs_results", "*", "code"): ("code", False),
    ("txs_results", "*", "codespace"): ("text", False),
    ("txs_results", "*", "log"): ("text", False),
    ("txs_results", "*", "gas_wanted"): ("int", False),
    ("txs_results", "*", "gas_used"): ("int", False),
    ("app_hash",): ("nullable_text", False),
}


def _event_kind(sub: tuple[str, ...], shape: str) -> tuple[str, bool]:
    table = {
        ("*",): ("obj", True),
        ("*", "type"): ("text", False),
        ("*", "attributes"): ("events", False),
        ("*", "attributes", "*"): ("obj", True),
        ("*", "attributes", "*", "key"): ("attr_b64" if shape == "0.34" else "attr_text", False),
        ("*", "attributes", "*", "value"): ("attr_b64" if shape == "0.34" else "attr_text", False),
        ("*", "attributes", "*", "index"): ("bool", False),
    }
    return table.get(sub, (IGNORED, False))


def kind_of(path: tuple[Any, ...], which: str, shape: str) -> tuple[str, bool]:
    """(kind, required) of the value at `path` of a rendered body; `which` is block | results."""
    if path in (("jsonrpc",), ("id",)):
        return IGNORED, False
    if not path or path[0] != "result":
        return IGNORED, False
    norm = tuple("*" if isinstance(p, int) else p for p in path[1:])
    if which == "results":
        for i, part in enumerate(norm):
            if part in EVENT_LISTS and i == 0:
                required = (
                    part == "finalize_block_events" if shape == "0.38" else part != "finalize_block_events"
                )
                return ("events", required) if len(norm) == 1 else _event_kind(norm[1:], shape)
            if part == "events" and norm[:2] == ("txs_results", "*") and i == 2:
                return ("events", False) if len(norm) == 3 else _event_kind(norm[3:], shape)
        return _RESULTS_SCHEMA.get(norm, (IGNORED, False))
    return _BLOCK_SCHEMA.get(norm, (IGNORED, False))


def walk(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    yield path, value
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from walk(inner, (*path, key))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from walk(inner, (*path, i))


def _parent(body: Any, path: tuple[Any, ...]) -> Any:
    node = body
    for part in path[:-1]:
        node = node[part]
    return node


@dataclass
class Corruption:
    which: str  # block | results
    path: tuple[Any, ...]
    op: str  # replace | delete | truncate | extra_key
    value: Any = None
    kind: str = ""
    notes: list[str] = field(default_factory=list)

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        body = copy.deepcopy(body)
        if self.op == "replace":
            if self.path:
                _parent(body, self.path)[self.path[-1]] = self.value
            else:
                body = self.value
        elif self.op == "delete":
            del _parent(body, self.path)[self.path[-1]]
        elif self.op == "truncate":
            shortened: list[Any] = _parent(body, self.path)[self.path[-1]]
            shortened.pop()
        elif self.op == "extra_key":
            extended: dict[str, Any] = _parent(body, self.path)[self.path[-1]]
            extended["brand_new_field"] = {"anything": [1, "x", None]}
        return body


@st.composite
def corruptions(draw: st.DrawFn, bodies: dict[str, Any], shape: str) -> Corruption:
    """One corruption of the block or the results body that no valid rendering can produce (or
    one of a field nobody reads)."""
    which = draw(st.sampled_from(["block", "results"]))
    body = bodies[which]
    paths = [(p, v) for p, v in walk(body) if p]
    read = [(p, v) for p, v in paths if kind_of(p, which, shape)[0] != IGNORED]
    # Mostly the fields the parser reads; now and then one it ignores (which must change nothing).
    path, value = draw(
        st.sampled_from(read if draw(st.sampled_from(["read"] * 9 + ["any"])) == "read" else paths)
    )
    kind, required = kind_of(path, which, shape)
    ops = ["replace"]
    if isinstance(path[-1], str) and (required or kind == IGNORED):
        ops.append("delete")
    if kind == "txs" and isinstance(value, list) and value:
        ops.append("truncate")
    if isinstance(value, dict):
        ops.append("extra_key")
    op = draw(st.sampled_from(ops))
    if op != "replace":
        return Corruption(which, path, op, kind=kind)
    if kind == IGNORED:
        wrong = draw(st.sampled_from(WRONG["obj"] + WRONG["int"]))
    else:
        wrong = draw(st.sampled_from(WRONG[kind]))
    return Corruption(which, path, "replace", wrong, kind=kind)


# --- a loopback node --------------------------------------------------------------------------------------


class StubNode:
    """Serves /status, /block and /block_results of a model chain in one shape over real HTTP.
    `corrupt` (a function of method and body) rewrites the answers while set."""

    def __init__(self, chain: dict[int, MBlock], shape: str) -> None:
        self.chain, self.shape = chain, shape
        self.corrupt: Callable[[str, dict[str, Any]], Any] | None = None
        self.requests: list[str] = []
        node = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                url = urlparse(self.path)
                method = url.path.strip("/")
                node.requests.append(method)
                params = {k: v[-1] for k, v in parse_qs(url.query).items()}
                head = max(node.chain)
                height = int(params.get("height") or head)
                block = node.chain.get(height)
                if method == "status":
                    body: Any = render_status(node.chain[head], node.shape, earliest=min(node.chain))
                elif block is None:
                    body = {
                        "jsonrpc": "2.0",
                        "id": -1,
                        "error": {
                            "code": -32603,
                            "message": "Internal error",
                            "data": f"height {height} is not available",
                        },
                    }
                    return self._send(500, body)
                elif method == "block":
                    body = render_block(block, Choices())
                elif method == "block_results":
                    body = render_results(block, node.shape, Choices())
                else:
                    return self._send(404, {"error": "no such method"})
                if node.corrupt is not None:
                    body = node.corrupt(method, body)
                return self._send(200, body)

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def awkward_chain(length: int = 3, *, first: int = 1) -> dict[int, MBlock]:
    """A fixed chain whose attributes carry every awkward byte string, in keys and values."""
    chain: dict[int, MBlock] = {}
    parent = b""
    for height in range(first, first + length):
        digest = hashlib.sha256(f"block {height}".encode()).digest()
        attrs = tuple(
            MAttr(key=KEYS[i % len(KEYS)].encode() if i % 3 else raw or b"k", value=raw, index=i % 2 == 0)
            for i, raw in enumerate(AWKWARD_BYTES)
        )
        tx_events = (MEvent("transfer", attrs), MEvent("payload", (MAttr(b"data", b"\xfe\xff", True),)))
        chain[height] = MBlock(
            height=height,
            hash=digest,
            parent=parent,
            time=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=height, microseconds=123456),
            nanos="789",
            chain_id="fleetops-sim-1",
            proposer=hashlib.sha256(b"proposer").digest()[:20],
            txs=tuple(
                MTx(f"tx-{height}-{i}".encode(), i, "sdk" if i else "", 200_000, 90_000 + i, "", tx_events)
                for i in range(2)
            ),
            begin=(MEvent("coin_received", attrs[:4]), MEvent("b64:type", ())),
            end=(MEvent("fee_market", attrs[4:]),),
        )
        parent = digest
    return chain
