"""HeadWatcher against the chain simulator's real WebSocket on loopback (and a small recorded-message
server for the real CometBFT event bodies): new heads, dropped sockets, a node that goes away and
comes back, malformed messages, prompt stop."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from websockets.sync.server import ServerConnection, serve

from indexer.rpc.ws import HeadWatcher
from simulators.chain.server import serve_in_thread

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cometbft" / "devnet"


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


@pytest.fixture
def chain():
    server, sim, url = serve_in_thread()
    yield server, sim, url
    server.shutdown()


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/websocket"


def produce(url: str, blocks: int) -> None:
    httpx.post(f"{url}/control/produce", json={"blocks": blocks}).raise_for_status()


def test_it_subscribes_and_sees_every_new_head(chain):
    _, sim, url = chain
    seen: list[int] = []
    with HeadWatcher(ws_url(url), on_head=lambda height, block: seen.append(height)) as watcher:
        assert wait_for(lambda: watcher.connected)
        assert watcher.latest() is None
        produce(url, 3)
        assert wait_for(lambda: (watcher.latest() or (0, 0))[0] == sim.head)
        height, received_at = watcher.latest() or (0, 0.0)
        assert height == 4 and received_at <= time.monotonic()
        assert seen == [2, 3, 4]
        assert watcher.malformed == 0


def test_it_reads_full_new_block_events_as_well(chain):
    _, _, url = chain
    with HeadWatcher(ws_url(url), query="tm.event='NewBlock'") as watcher:
        assert wait_for(lambda: watcher.connected)
        produce(url, 2)
        assert wait_for(lambda: (watcher.latest() or (0, 0))[0] == 3)


def test_a_dropped_socket_shows_disconnected_then_reconnects_and_keeps_tracking(chain):
    _, sim, url = chain
    with HeadWatcher(ws_url(url), reconnect_base=0.3, reconnect_cap=0.3) as watcher:
        assert wait_for(lambda: watcher.connected)
        httpx.post(f"{url}/control/knobs", json={"drop_websocket": True}).raise_for_status()
        assert wait_for(lambda: not watcher.connected, timeout=2)
        assert wait_for(lambda: watcher.connected, timeout=5)
        assert watcher.reconnects >= 1
        produce(url, 2)
        assert wait_for(lambda: (watcher.latest() or (0, 0))[0] == sim.head == 3)


def test_a_node_that_goes_away_leaves_it_disconnected_until_the_node_is_back():
    server, _, url = serve_in_thread()
    port = server.server_address[1]
    watcher = HeadWatcher(ws_url(url), reconnect_base=0.05, reconnect_cap=0.2).start()
    try:
        assert wait_for(lambda: watcher.connected)
        server.shutdown()
        assert wait_for(lambda: not watcher.connected)
        before = watcher.reconnects
        # Several reconnect attempts against a closed port, none of them successful.
        assert wait_for(lambda: watcher.reconnects >= before + 2, timeout=30)
        assert not watcher.connected and watcher.reconnects >= 2
        assert watcher.thread_alive()
        server, _, url = serve_in_thread(port=port)
        assert wait_for(lambda: watcher.connected, timeout=5)
        produce(url, 1)
        assert wait_for(lambda: (watcher.latest() or (0, 0))[0] == 2)
    finally:
        watcher.stop()
        server.shutdown()


def test_nothing_listening_never_raises_and_stop_is_prompt():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    watcher = HeadWatcher(f"ws://127.0.0.1:{port}/websocket", reconnect_base=0.05, reconnect_cap=0.1)
    watcher.start()
    assert wait_for(lambda: watcher.reconnects >= 2)
    assert not watcher.connected and "refused" in watcher.last_error.lower()
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 1.0
    assert not watcher.thread_alive()


def test_stop_closes_a_live_subscription_at_once(chain):
    _, _, url = chain
    watcher = HeadWatcher(ws_url(url)).start()
    assert wait_for(lambda: watcher.connected)
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 1.0
    assert not watcher.thread_alive() and not watcher.connected


class Recorded:
    """A WebSocket server that acknowledges the subscription, then sends the given messages."""

    def __init__(self, messages: list[str]):
        self.messages = messages
        self.subscriptions: list[dict] = []

        def handler(conn: ServerConnection) -> None:
            request = json.loads(conn.recv())
            self.subscriptions.append(request)
            conn.send(json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": {}}))
            for message in self.messages:
                conn.send(message)
            try:
                conn.recv()  # hold the socket open until the client leaves
            except Exception:
                return

        self.server = serve(handler, "127.0.0.1", 0)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"ws://127.0.0.1:{self.server.socket.getsockname()[1]}/websocket"


def test_recorded_new_block_events_are_read_and_malformed_messages_are_skipped():
    v034 = (FIXTURES / "event_NewBlock_v0_34_gaia-ibc-0_167.json").read_text()
    v038 = (FIXTURES / "event_NewBlock_v0_38_kvstore-dockerchain_235.json").read_text()
    no_height = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"data": {"value": {"header": {}}}}})
    bad_height = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "result": {"data": {"value": {"header": {"height": "tall"}}}}}
    )
    node = Recorded([v034, "not json {", "[1, 2]", no_height, bad_height, v038])
    heights: list[int] = []

    def flaky_hook(height, block):
        heights.append(height)
        if height == 167:
            raise RuntimeError("the caller's bug")

    try:
        with HeadWatcher(node.url, on_head=flaky_hook) as watcher:
            assert wait_for(lambda: (watcher.latest() or (0, 0))[0] == 235)
            assert heights == [167, 235]
            assert watcher.malformed == 4
            assert watcher.connected
        assert node.subscriptions == [
            {
                "jsonrpc": "2.0",
                "method": "subscribe",
                "id": 1,
                "params": {"query": "tm.event='NewBlockHeader'"},
            }
        ]
    finally:
        node.server.shutdown()


def test_a_refused_subscription_is_retried_not_raised():
    def refuse(conn: ServerConnection) -> None:
        request = json.loads(conn.recv())
        conn.send(json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": {"code": -32602}}))

    server = serve(refuse, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"ws://127.0.0.1:{server.socket.getsockname()[1]}/websocket"
    try:
        with HeadWatcher(url, reconnect_base=0.05, reconnect_cap=0.1) as watcher:
            assert wait_for(lambda: watcher.reconnects >= 2)
            assert not watcher.connected and "refused" in watcher.last_error
    finally:
        server.shutdown()
