"""The client's typed path for /block_results (`indexer.rpc.typed`): a body of the common shape is
read straight from its bytes to exactly the values the checking parser gives; every other body is
left to that parser (None), whatever it is. The property tests compare the two on generated bodies;
these are the named cases."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as hevent
from hypothesis import strategies as st

from indexer.rpc import typed
from indexer.rpc.parse import MalformedResponse, parse_block_results
from tests.indexer.cometbft_bodies import walk


def body(**changes: Any) -> dict[str, Any]:
    event = {
        "type": "transfer",
        "attributes": [
            {"key": "sender", "value": "sim1abc", "index": True},
            {"key": "amount", "value": "5utok", "index": False},
        ],
    }
    result: dict[str, Any] = {
        "height": "7",
        "txs_results": [
            {"code": 0, "data": "", "log": "", "info": "", "gas_wanted": "200", "gas_used": "150",
             "events": [event, event], "codespace": ""},
            {"code": 5, "gas_wanted": 10, "gas_used": "9", "events": None, "codespace": "sdk"},
        ],
        "finalize_block_events": [event],
        "validator_updates": None,
        "consensus_param_updates": None,
        "app_hash": "q83vEjRWeJA=",
    }  # fmt: skip
    result.update(changes)
    return {"jsonrpc": "2.0", "id": -1, "result": {k: v for k, v in result.items() if v != "omit"}}


def both(document: dict[str, Any], *, base64_attributes: bool | None = False) -> tuple[Any, Any]:
    content = json.dumps(document).encode()
    try:
        parsed: Any = parse_block_results(json.loads(content), base64_attributes=base64_attributes)
    except MalformedResponse as exc:
        parsed = exc
    return typed.block_results(content, base64_attributes=base64_attributes), parsed


def test_the_common_shape_is_read_to_the_parsers_values():
    read, parsed = both(body())
    assert read is not None
    assert read == parsed
    assert (read.height, len(read.txs), read.txs[1].code, read.txs[1].gas_wanted) == (7, 2, 5, 10)
    assert read.txs[0].events[0].attributes[0].key == "sender"


def test_the_0_37_shape_with_begin_and_end_block_events_is_read_too():
    event = {"type": "mint", "attributes": [{"key": "amount", "value": "1", "index": False}]}
    document = body(finalize_block_events="omit", app_hash="omit", begin_block_events=[event],
                    end_block_events=None)  # fmt: skip
    read, parsed = both(document)
    assert read is not None
    assert read == parsed


@pytest.mark.parametrize(
    "document",
    [
        # omitted empties and nil slices inside events: the parser reads them, the typed path leaves them
        body(finalize_block_events=[{"type": "t", "attributes": None}]),
        body(finalize_block_events=[{"attributes": []}]),
        body(finalize_block_events=[{"type": "t", "attributes": [{"key": "k", "value": "v"}]}]),
        # what the parser refuses
        body(height="0"),
        body(height=""),
        body(height=7.0),
        body(txs_results={}),
        body(txs_results=[{"code": -1}]),
        body(txs_results=[{"code": True}]),
        body(txs_results=[{"gas_used": "1.5"}]),
        body(finalize_block_events=[{"type": "t", "attributes": [{"key": 1, "value": "v", "index": True}]}]),
        body(finalize_block_events=[{"type": "t", "attributes": [{"key": "k", "value": "v", "index": 1}]}]),
        body(finalize_block_events="omit", begin_block_events=[]),
        body(app_hash=5),
        # not text of the common kind: escapes, the marked form of undecodable bytes
        body(finalize_block_events=[{"type": "t\u00e9", "attributes": []}]),
        body(finalize_block_events=[{"type": "b64:AA==", "attributes": []}]),
        # an error, an unwrapped result
        {"jsonrpc": "2.0", "id": -1, "error": {"code": -32603, "message": "boom"}},
        body()["result"],
    ],
)
def test_anything_else_is_left_to_the_parser(document):
    read, parsed = both(document)
    assert read is None
    assert parsed is not None  # the parser reads it or names its fault


@pytest.mark.parametrize("encoding", [True, None])
def test_only_a_node_known_to_send_text_attributes_is_read_typed(encoding):
    read, parsed = both(body(), base64_attributes=encoding)
    assert read is None
    assert parsed is not None


@pytest.mark.parametrize("content", [b"", b"null", b"{", b"[1, 2]", b'{"result": null}', "\u00e9".encode()])
def test_bytes_that_are_no_body_are_left_to_the_parser(content):
    assert typed.block_results(content, base64_attributes=False) is None


# --- properties: generated bodies of the common shape, and every kind of damage to them -----------------

# Printable ASCII without a backslash (no escape sequence) or a colon (never the `b64:` marker).
TEXT = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126, exclude_characters="\\:"), max_size=8
)
INT = st.integers(min_value=0, max_value=2**40)
EVENTS = st.lists(
    st.fixed_dictionaries(
        {
            "type": TEXT,
            "attributes": st.lists(
                st.fixed_dictionaries({"key": TEXT, "value": TEXT, "index": st.booleans()}), max_size=3
            ),
        }
    ),
    max_size=3,
)
TX = st.fixed_dictionaries(
    {
        "code": st.integers(min_value=0, max_value=2**32 - 1),
        "gas_wanted": INT | INT.map(str),
        "gas_used": INT | INT.map(str),
        "events": EVENTS,
    },
    optional={"codespace": TEXT, "log": TEXT, "data": st.none() | TEXT},
)
COMMON = st.builds(
    lambda height, txs, events, shape: body(
        height=height,
        txs_results=txs,
        **(
            {"finalize_block_events": events}
            if shape == "0.38"
            else {"finalize_block_events": "omit", "begin_block_events": events, "end_block_events": events}
        ),
    ),
    st.integers(min_value=1, max_value=2**40).map(str),
    st.lists(TX, max_size=3),
    EVENTS,
    st.sampled_from(["0.37", "0.38"]),
)
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(TEXT, inner, max_size=2),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(COMMON)
def test_every_body_of_the_common_shape_is_read_typed_to_the_parsers_values(document):
    read, parsed = both(document)
    assert read is not None
    assert read == parsed


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_damaged_body_is_read_typed_only_to_what_the_parser_reads(data):
    document = data.draw(COMMON)
    path, _ = data.draw(st.sampled_from(list(walk(document))))
    junk = data.draw(JUNK)
    if data.draw(st.booleans()) and path and isinstance(parent := _parent(document, path), dict):
        del parent[path[-1]]  # a key left out
        hevent("key removed")
    elif path:
        _parent(document, path)[path[-1]] = junk
    else:
        document = junk
    read, parsed = both(document)
    hevent("typed read it" if read is not None else "left to the parser")
    if read is not None:
        assert read == parsed  # never a body the parser refuses, never other values


def _parent(document: Any, path: tuple[Any, ...]) -> Any:
    node = document
    for part in path[:-1]:
        node = node[part]
    return node
