"""Property tests of the CometBFT parser (Hypothesis): generated valid bodies of every shape the
indexer supports (0.34 begin/end block events with base64 attributes, 0.37 the same in text,
0.38 finalize_block_events; tx results with events; nulls, omitted empties, ints as numbers or
strings) parse to exactly the rows the indexer must store; generated corruptions of them (a wrong
type at any field, a missing required key, a list cut short, an impossible timestamp, bad base64)
raise MalformedResponse or parse to exactly the same rows, never to fewer; and no input at all makes
a parser raise anything but MalformedResponse. The client's typed path (`indexer.rpc.typed`) is
compared with the parser on every generated and corrupted body it reads."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from indexer.blocks import IndexedBlock, event_rows
from indexer.ingest import block_row, tx_rows
from indexer.rpc import typed
from indexer.rpc.parse import (
    MARKER,
    MalformedResponse,
    attribute_bytes,
    attributes_base64_for,
    body_is_plain_text,
    canonical_bytes,
    canonical_text,
    check_block_results,
    parse_block,
    parse_block_results,
    parse_broadcast,
    parse_new_block_event,
    parse_status,
    parse_tx,
)
from tests.indexer.cometbft_bodies import (
    IGNORED,
    SHAPES,
    Choices,
    MBlock,
    blocks,
    corruptions,
    expected_rows,
    expected_text,
    realistic_keys,
    render_block,
    render_results,
    render_status,
    walk,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rows_of(
    block_body: Any, results_body: Any, shape: str, *, height: int, detect: bool = False
) -> tuple[list[Any], list[Any], list[Any]]:
    """What ingest would store for the pair, parsed as the client does (encoding from the node's
    version, /block checked against /block_results)."""
    encoding = (
        None if detect else attributes_base64_for({"0.34": "0.34.29", "0.37": "0.37.4"}.get(shape, "0.38.1"))
    )
    block = parse_block(block_body)
    results = parsed_both_ways(results_body, encoding)
    check_block_results(block, results, height=height)
    item = IndexedBlock(block, results)
    return [block_row(0, item)], list(tx_rows(0, item)), list(event_rows(0, item, encode=False))


def parsed_both_ways(results_body: Any, encoding: bool | None) -> Any:
    """parse_block_results as is and, when the body's JSON text allows it, through the client's
    plain-text path (no per-string conversion): the same values or the same refusal."""
    try:
        slow: Any = parse_block_results(results_body, base64_attributes=encoding)
    except MalformedResponse as exc:
        slow = exc
    content = json.dumps(results_body).encode()
    if body_is_plain_text(content):
        event("plain-text path compared")
        try:
            fast: Any = parse_block_results(json.loads(content), base64_attributes=encoding, plain_text=True)
        except MalformedResponse as exc:
            fast = exc
        assert type(fast) is type(slow)
        assert isinstance(slow, MalformedResponse) or fast == slow
        # The client's typed path reads the bytes of the common shape: never what the parser
        # refuses, and to the same values.
        read = typed.block_results(content, base64_attributes=encoding)
        if read is not None:
            event("typed path read it")
            assert read == slow
    if isinstance(slow, MalformedResponse):
        raise slow
    return slow


@st.composite
def rendered(
    draw: st.DrawFn, keys: st.SearchStrategy[bytes] | None = None
) -> tuple[MBlock, str, dict[str, Any]]:
    block = draw(blocks(keys))
    shape = draw(st.sampled_from(SHAPES))
    choices = Choices(draw)
    bodies = {"block": render_block(block, choices), "results": render_results(block, shape, choices)}
    # Through JSON text and back, as it travels (lone surrogates become \\udcXX escapes).
    bodies = json.loads(json.dumps(bodies))
    return block, shape, bodies


@PROPERTY
@given(rendered())
def test_valid_bodies_of_every_shape_parse_to_the_expected_rows(case):
    block, shape, bodies = case
    assert rows_of(bodies["block"], bodies["results"], shape, height=block.height) == expected_rows(
        block, shape
    )


@PROPERTY
@given(rendered(keys=realistic_keys()))
def test_without_the_node_version_the_encoding_is_detected_from_real_keys(case):
    block, shape, bodies = case
    detected = rows_of(bodies["block"], bodies["results"], shape, height=block.height, detect=True)
    assert detected == expected_rows(block, shape)


@settings(PROPERTY, max_examples=250)
@given(st.data())
def test_a_corrupted_body_is_malformed_or_reads_exactly_the_same_never_fewer_rows(data):
    block, shape, bodies = data.draw(rendered())
    corruption = data.draw(corruptions(bodies, shape))
    damaged = dict(bodies)
    damaged[corruption.which] = corruption.apply(bodies[corruption.which])
    try:
        rows = rows_of(damaged["block"], damaged["results"], shape, height=block.height)
    except MalformedResponse:
        event(f"malformed: {corruption.op} {corruption.kind}")
        return
    event(f"same rows: {corruption.op} {corruption.kind}")
    assert rows == expected_rows(block, shape), corruption
    # Only corruptions of fields nobody reads (or additions) may pass.
    assert corruption.kind == IGNORED or corruption.op == "extra_key" or corruption.value is None, corruption


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_no_input_makes_a_parser_raise_anything_but_malformed_response(data):
    """Random JSON spliced anywhere into a valid body (or instead of it)."""
    _, _, bodies = data.draw(rendered())
    which = data.draw(st.sampled_from(["block", "results"]))
    body = bodies[which]
    path, _ = data.draw(st.sampled_from(list(walk(body))))
    junk = data.draw(JSON)
    if path:
        node = body
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = junk
    else:
        body = junk
    for parser in (
        parse_block,
        parse_block_results,
        parse_tx,
        parse_status,
        parse_broadcast,
        parse_new_block_event,
    ):
        try:
            parser(body)
        except MalformedResponse:
            pass
    content = json.dumps(body).encode()
    read = typed.block_results(content, base64_attributes=False)  # never raises: reads it or not
    if read is not None:
        assert read == parse_block_results(json.loads(content), base64_attributes=False)


# --- the attribute text -----------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=16))
def test_attribute_bytes_have_one_lossless_text_whatever_the_node_version(raw):
    from_034 = canonical_bytes(base64.b64decode(base64.b64encode(raw)))
    from_037 = canonical_text(raw.decode("utf-8", "surrogateescape"))
    assert from_034 == from_037 == expected_text(raw)
    assert attribute_bytes(from_034) == raw  # lossless
    assert "\x00" not in from_034
    from_034.encode("utf-8")  # storable: no lone surrogates


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=12))
def test_real_text_is_never_read_as_the_marked_form(text):
    stored = canonical_text(text)
    assert attribute_bytes(stored) == text.encode("utf-8")
    if text.startswith(MARKER):
        assert stored != text and stored.startswith(MARKER)


@pytest.mark.parametrize(
    ("b64", "text", "stored"),
    [
        ("AQ==", "\x01", "\x01"),  # the case: a 0x01 byte is the same text from 0.34 and 0.37
        ("AA==", "\x00", "b64:AA=="),
        ("/w==", "\udcff", "b64:/w=="),
        ("YjY0OkFRPT0=", "b64:AQ==", "b64:YjY0OkFRPT0="),
        ("c2VuZGVy", "sender", "sender"),
        ("", "", ""),
    ],
)
def test_examples_of_the_canonical_attribute_text(b64, text, stored):
    assert canonical_bytes(base64.b64decode(b64)) == stored
    assert canonical_text(text) == stored


@pytest.mark.parametrize(
    ("version", "base64"),
    [
        ("v0.34.14", True),
        ("0.34.29", True),
        ("0.33.9", True),
        ("0.37.4", False),
        ("0.38.0-alpha.1", False),
        ("1.0.0", False),
        ("v0.35.0", False),
        ("", None),
        ("unknown", None),
    ],
)
def test_the_attribute_encoding_follows_the_node_version(version, base64):
    assert attributes_base64_for(version) is base64


# --- the cases named in the report, one by one ----------------------------------------------------------

BLOCK = render_block(
    MBlock(
        height=54810790,
        hash=b"\x01" * 32,
        parent=b"\x02" * 32,
        time=T0,
        nanos="",
        chain_id="c",
        proposer=b"\x03" * 20,
        txs=(),
        begin=(),
        end=(),
    ),
    Choices(),
)


def _with(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(body))
    node = body
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return body


@pytest.mark.parametrize("height", [None, "", 54810790.7, True, "54810790.7", -1, 0])
def test_a_height_of_the_wrong_type_is_malformed_not_zero(height):
    with pytest.raises(MalformedResponse, match="height"):
        parse_block(_with(BLOCK, ("result", "block", "header", "height"), height))


def test_block_id_null_is_malformed_not_an_empty_hash():
    with pytest.raises(MalformedResponse, match="block_id"):
        parse_block(_with(BLOCK, ("result", "block_id"), None))


@pytest.mark.parametrize("txs", ["dHg=", {"0": "dHg="}, 5])
def test_block_txs_that_are_no_list_are_malformed_not_zero_txs(txs):
    with pytest.raises(MalformedResponse, match="txs"):
        parse_block(_with(BLOCK, ("result", "block", "data", "txs"), txs))


RESULTS_038 = {
    "jsonrpc": "2.0",
    "id": -1,
    "result": {"height": "5", "txs_results": None, "finalize_block_events": []},
}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("txs_results", {"0": {}}),
        ("txs_results", "[]"),
        ("finalize_block_events", {"type": "x"}),
        ("finalize_block_events", "x"),
    ],
)
def test_result_lists_that_are_no_list_are_malformed_not_empty(field, value):
    with pytest.raises(MalformedResponse, match=field):
        parse_block_results(_with(RESULTS_038, ("result", field), value))


@pytest.mark.parametrize("catching_up", ["false", "true", 0, None])
def test_catching_up_must_be_a_boolean(catching_up):
    block = MBlock(5, b"\x01" * 32, b"", T0, "", "c", b"\x03" * 20, (), (), ())
    status = render_status(block, "0.38")
    assert parse_status(status).catching_up is False
    with pytest.raises(MalformedResponse, match="catching_up"):
        parse_status(_with(status, ("result", "sync_info", "catching_up"), catching_up))


@pytest.mark.parametrize(
    "when",
    ["2021-02-30T00:00:00Z", "2021-13-01T10:00:00.5Z", "0000-01-01T00:00:00Z", "2021-01-01 00:00:00", "2021"],
)
def test_an_impossible_timestamp_is_malformed_not_a_value_error_of_its_own(when):
    with pytest.raises(MalformedResponse, match="time"):
        parse_block(_with(BLOCK, ("result", "block", "header", "time"), when))
