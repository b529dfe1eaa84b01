"""The chain simulator's own contract, over loopback HTTP and WebSocket (no database).

Every RPC body is read with the portal's own parser (indexer.rpc.parse), so a shape drift between the
simulator and what the indexer expects fails here.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from indexer.rpc.parse import (
    parse_block,
    parse_block_results,
    parse_broadcast,
    parse_new_block_event,
    parse_status,
    parse_tx,
)
from simulators.chain.server import ChainHTTPServer, ChainSimulator, serve_in_thread

Sim = tuple[ChainHTTPServer, ChainSimulator, str]


def call(url: str, path: str, body: Any = None, **params: Any) -> tuple[int, Any, Any]:
    query = ("?" + urllib.parse.urlencode(params)) if params else ""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path + query, data=data, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, headers, payload = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, headers, payload = exc.code, exc.headers, exc.read()
    assert headers["Content-Type"] == "application/json"
    return status, headers, json.loads(payload)


def rpc(url: str, method: str, **params: Any) -> Any:
    status, _, body = call(url, "/" + method, **params)
    assert status == 200, body
    assert body["jsonrpc"] == "2.0" and body["id"] == -1 and "result" in body
    return body


def control(url: str, what: str, body: Any) -> Any:
    status, _, answer = call(url, "/control/" + what, body)
    assert status == 200, answer
    return answer


def start(**options: Any) -> Sim:
    options.setdefault("seed", 1)
    return serve_in_thread(**options)


@pytest.fixture
def sim() -> Iterator[Sim]:
    running = start()
    yield running
    running[0].shutdown()


def test_parser_accepts_every_response_in_both_shapes(sim: Sim) -> None:
    _, _, url = sim
    control(url, "produce", {"blocks": 12})
    seen_by_shape = {}
    for shape in ("0.34", "0.38"):
        control(url, "shape", {"shape": shape})
        status = parse_status(rpc(url, "status"))
        assert status.chain_id == "fleetops-sim-1" and status.latest_height == 13
        assert status.node_version.startswith(shape) and status.earliest_height == 1
        assert not status.catching_up
        assert status.latest_block_hash == parse_block(rpc(url, "block")).hash
        events = []
        for height in range(1, 14):
            block = parse_block(rpc(url, "block", height=height))
            results = parse_block_results(rpc(url, "block_results", height=height))
            assert block.height == results.height == height and block.chain_id == "fleetops-sim-1"
            assert block.time is not None and block.time.second == height % 60
            assert len(block.proposer) == 40
            assert len(results.txs) == len(block.txs)
            for index, tx_hash in enumerate(block.tx_hashes):
                tx = parse_tx(rpc(url, "tx", hash="0x" + tx_hash))
                assert (tx.hash, tx.height, tx.index) == (tx_hash, height, index)
                assert tx.result == results.txs[index]
            block_level = (
                results.begin_block_events + results.end_block_events + results.finalize_block_events
            )
            events.append((results.txs, block_level))
            if shape == "0.34":
                assert results.begin_block_events and results.end_block_events
                assert not results.finalize_block_events
            else:
                assert results.finalize_block_events and not results.begin_block_events
                assert results.app_hash
        seen_by_shape[shape] = events
    # The parser reads the base64 0.34 attributes back to the same keys and values as plain 0.38.
    assert [txs for txs, _ in seen_by_shape["0.34"]] == [txs for txs, _ in seen_by_shape["0.38"]]
    assert [b for _, b in seen_by_shape["0.34"]] == [b for _, b in seen_by_shape["0.38"]]
    kinds = {e.type for txs, _ in seen_by_shape["0.38"] for tx in txs for e in tx.events}
    assert {"transfer", "mint", "nft_mint"} <= kinds


def test_034_attributes_are_really_base64(sim: Sim) -> None:
    _, _, url = sim
    control(url, "produce", {"blocks": 3})
    control(url, "shape", {"shape": "0.34"})
    raw = rpc(url, "block_results", height=2)["result"]
    attribute = raw["begin_block_events"][0]["attributes"][0]
    assert base64.b64decode(attribute["key"]) == b"receiver" and attribute["index"] is True
    assert "finalize_block_events" not in raw
    control(url, "shape", {"shape": "0.38"})
    raw = rpc(url, "block_results", height=2)["result"]
    assert raw["finalize_block_events"][0]["attributes"][0]["key"] == "receiver"
    assert raw["validator_updates"] is None and "begin_block_events" not in raw


def test_same_seed_same_chain_and_linkage() -> None:
    first, second, other = start(), start(), start(seed=2)
    try:
        hashes = []
        for _, _, url in (first, second, other):
            control(url, "produce", {"blocks": 19})
            blocks = [parse_block(rpc(url, "block", height=h)) for h in range(1, 21)]
            for parent, child in itertools.pairwise(blocks):
                assert child.parent_hash == parent.hash
            hashes.append([(b.hash, b.tx_hashes) for b in blocks])
        assert hashes[0] == hashes[1]
        assert hashes[0][5][0] != hashes[2][5][0]
    finally:
        for running in (first, second, other):
            running[0].shutdown()


def test_tx_hash_is_sha256_of_bytes_and_unknown_tx_is_an_error(sim: Sim) -> None:
    _, _, url = sim
    control(url, "produce", {"blocks": 10})
    block = next(b for h in range(2, 12) if (b := parse_block(rpc(url, "block", height=h))).txs)
    raw_tx = block.txs[0]
    tx_hash = hashlib.sha256(raw_tx).hexdigest().upper()
    tx = parse_tx(rpc(url, "tx", hash="0x" + tx_hash))
    assert tx.tx == raw_tx and tx.height == block.height
    status, _, body = call(url, "/tx", hash="0x" + "AB" * 32)
    assert status == 500
    assert body["error"]["data"] == f"tx ({'AB' * 32}) not found"


def test_broadcast_lands_one_to_three_blocks_later(sim: Sim) -> None:
    _, _, url = sim
    control(url, "produce", {"blocks": 2})
    head = parse_status(rpc(url, "status")).latest_height
    payload = {
        "type": "transfer",
        "sender": "sim1a",
        "recipient": "sim1b",
        "amount": "5utok",
        "contract": "tok1x",
    }
    raw = json.dumps(payload).encode()
    sent = parse_broadcast(rpc(url, "broadcast_tx_sync", tx="0x" + raw.hex()))
    assert sent.code == 0 and sent.hash == hashlib.sha256(raw).hexdigest().upper()
    rejected_raw = b'{"type": "other", "reject": true}'
    rejected = parse_broadcast(rpc(url, "broadcast_tx_sync", tx="0x" + rejected_raw.hex()))
    status, _, body = call(url, "/tx", hash="0x" + sent.hash)
    assert status == 500 and "not found" in body["error"]["data"]
    control(url, "produce", {"blocks": 3})
    tx = parse_tx(rpc(url, "tx", hash="0x" + sent.hash))
    assert head + 1 <= tx.height <= head + 3 and tx.tx == raw
    assert tx.result.code == 0
    transfer = tx.result.events[0]
    assert transfer.type == "transfer"
    assert {a.key: a.value for a in transfer.attributes}["recipient"] == "sim1b"
    assert parse_block(rpc(url, "block", height=tx.height)).tx_hashes[tx.index] == sent.hash
    assert parse_tx(rpc(url, "tx", hash="0x" + rejected.hash)).result.code == 4
    status, _, body = call(url, "/broadcast_tx_sync", tx="0xZZ")
    assert status == 500 and body["error"]["code"] == -32602
    assert control(url, "state", {})["broadcasts"] == 2


def test_reorg_replaces_exactly_the_last_blocks(sim: Sim) -> None:
    _, _, url = sim
    control(url, "produce", {"blocks": 9})
    before = [parse_block(rpc(url, "block", height=h)) for h in range(1, 11)]
    state = control(url, "reorg", {"depth": 3})
    assert state["head"] == 10
    after = [parse_block(rpc(url, "block", height=h)) for h in range(1, 11)]
    changed = [b.height for b, a in zip(before, after, strict=True) if b.hash != a.hash]
    assert changed == [8, 9, 10]
    for parent, child in itertools.pairwise(after):
        assert child.parent_hash == parent.hash
    assert after[-1].txs != before[-1].txs or not before[-1].txs
    control(url, "produce", {"blocks": 1})
    assert parse_block(rpc(url, "block", height=11)).parent_hash == after[-1].hash
    status, _, _ = call(url, "/control/reorg", {"depth": 0})
    assert status == 400


def test_halt_stops_production() -> None:
    running = start(block_interval=0.05)
    try:
        _, _sim, url = running
        control(url, "halt", {"halted": True})
        head = control(url, "state", {})["head"]
        assert call(url, "/control/produce", {"blocks": 2})[0] == 409
        for _ in range(3):  # a producer tick, then two more
            running[0].stopping.wait(0.1)
        assert control(url, "state", {})["head"] == head
        control(url, "halt", {"halted": False})
        assert control(url, "produce", {"blocks": 2})["head"] >= head + 2
    finally:
        running[0].shutdown()


def test_pruned_and_above_head_errors(sim: Sim) -> None:
    _, _, url = sim
    control(url, "produce", {"blocks": 49})
    control(url, "knobs", {"pruned_below": 20})
    status, _, body = call(url, "/block", height=5)
    assert status == 500
    assert body == {
        "jsonrpc": "2.0",
        "id": -1,
        "error": {
            "code": -32603,
            "message": "Internal error",
            "data": "height 5 is not available, lowest height is 20",
        },
    }
    status, _, body = call(url, "/block_results", height=999)
    assert status == 500
    assert (
        body["error"]["data"] == "height 999 must be less than or equal to the current blockchain height 50"
    )
    assert parse_status(rpc(url, "status")).earliest_height == 20
    assert parse_block(rpc(url, "block", height=20)).height == 20


def test_rate_limit_and_error_rate_knobs(sim: Sim) -> None:
    _, _, url = sim
    control(url, "knobs", {"rate_limit": 1.0})
    status, headers, _ = call(url, "/status")
    assert status == 429 and headers["Retry-After"] == "1"
    control(url, "knobs", {"rate_limit": 0.0, "error_rate": 1.0})
    status, _, body = call(url, "/block")
    assert status == 500 and body["error"]["data"] == "internal error"
    assert control(url, "state", {})["requests"]["block"] == 1  # control calls are never failed
    control(url, "knobs", {"error_rate": 0.5})
    statuses = [call(url, "/status")[0] for _ in range(40)]
    assert 0 < statuses.count(500) < 40 and set(statuses) == {200, 500}
    for bad in (
        {"error_rate": 2},
        {"rate_limit": -1},
        {"pruned_below": 1.5},
        {"decoder_outage": 1},
        {"nope": 1},
    ):
        assert call(url, "/control/knobs", bad)[0] == 400


def test_decode_endpoint(sim: Sim) -> None:
    _, simulator, url = sim
    control(url, "produce", {"blocks": 40})
    payloads = [
        attrs["data"]
        for block in simulator.blocks
        for tx in block.txs
        for kind, pairs in tx.events
        if kind == "payload" and (attrs := dict(pairs))["encoding"] == "sim-hex"
    ]
    assert payloads
    decodable = [p for p in payloads if call(url, "/decode", data=p)[0] == 200]
    assert decodable
    status, _, body = call(url, "/decode", data=decodable[0])
    assert status == 200 and body["decoded"] == json.loads(bytes.fromhex(decodable[0]))
    status, _, body = call(url, "/decode", data=b"\xffnot json".hex())
    assert (status, body) == (400, {"error": "undecodable"})
    assert call(url, "/decode", data="zz")[0] == 400
    control(url, "knobs", {"decoder_outage": True})
    assert call(url, "/decode", data=decodable[0])[0] == 503


def test_websocket_new_block_header_and_drop(sim: Sim) -> None:
    _, _, url = sim
    ws_url = url.replace("http://", "ws://") + "/websocket"
    with connect(ws_url, open_timeout=10) as ws:
        query = "tm.event='NewBlockHeader'"
        ws.send(json.dumps({"jsonrpc": "2.0", "method": "subscribe", "id": 1, "params": {"query": query}}))
        ack = json.loads(ws.recv(timeout=10))
        assert ack == {"jsonrpc": "2.0", "id": 1, "result": {}}
        assert parse_new_block_event(ack) is None
        control(url, "produce", {"blocks": 2})
        heights = []
        for _ in range(2):
            message = json.loads(ws.recv(timeout=10))
            assert message["result"]["query"] == query
            assert message["result"]["data"]["type"] == "tendermint/event/NewBlockHeader"
            header = message["result"]["data"]["value"]["header"]
            assert header["chain_id"] == "fleetops-sim-1"
            event = parse_new_block_event(message)
            assert event is not None
            block = parse_block(rpc(url, "block", height=event.height))
            assert header["last_block_id"]["hash"] == block.parent_hash and event.time == block.time
            heights.append(event.height)
        assert heights == [2, 3]
        control(url, "knobs", {"drop_websocket": True})
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)


def test_bad_control_bodies(sim: Sim) -> None:
    _, _, url = sim
    assert call(url, "/control/shape", {"shape": "0.99"})[0] == 400
    assert call(url, "/control/halt", {"halted": "yes"})[0] == 400
    assert call(url, "/control/produce", {"blocks": -1})[0] == 400
    assert call(url, "/nope")[0] == 404


def test_a_height_is_rendered_once_and_never_served_stale(sim: Sim) -> None:
    _, simulator, url = sim
    control(url, "produce", {"blocks": 4})
    first = simulator.rendered_body("block_results", {"height": "5"})
    assert simulator.rendered_body("block_results", {"height": "5"}) is first  # not rendered again
    assert json.loads(first) == rpc(url, "block_results", height=5)
    old_hash = parse_block(rpc(url, "block", height=5)).hash
    # Replaced without a control request (as a fork in the producing thread would): not served stale.
    simulator.reorg(2)
    assert parse_block(json.loads(simulator.rendered_body("block", {"height": "5"}))).hash != old_hash
    assert parse_block(rpc(url, "block", height=5)).hash != old_hash
