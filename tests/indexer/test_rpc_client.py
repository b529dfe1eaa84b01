"""The RPC client against real HTTP servers on loopback that answer with recorded responses and
misbehave on demand: failover, backoff, 429, pruned heights, timeouts, garbage."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from indexer.rpc.client import CometRpc, HeightUnavailable, RpcUnavailable, SourceConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cometbft"
BLOCK = json.loads((FIXTURES / "v0_37/block_cronostestnet_338-3_18211106.json").read_text())
STATUS = json.loads((FIXTURES / "v0_34/status_cosmoshub-4_12232219.json").read_text())


class Node:
    """A fake RPC node: `mode` is ok | down | limited | pruned | hang | garbage."""

    def __init__(self):
        self.mode = "ok"
        self.requests: list[str] = []
        node = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                return

            def do_GET(self):
                url = urlparse(self.path)
                node.requests.append(url.path)
                if node.mode == "hang":
                    time.sleep(1.0)
                if node.mode == "down":
                    return self._send(503, b"service unavailable", "text/plain")
                if node.mode == "limited":
                    self.send_response(429)
                    self.send_header("Retry-After", "30")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                if node.mode == "garbage":
                    return self._send(200, b"<html>proxy error</html>", "text/html")
                if node.mode == "pruned":
                    height = parse_qs(url.query).get("height", ["?"])[0]
                    body = {
                        "jsonrpc": "2.0",
                        "id": -1,
                        "error": {
                            "code": -32603,
                            "message": "Internal error",
                            "data": f"height {height} is not available, lowest height is 20000000",
                        },
                    }
                    return self._send(500, json.dumps(body).encode())
                body = STATUS if url.path == "/status" else BLOCK
                return self._send(200, json.dumps(body).encode())

            def _send(self, status, data, content_type="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def nodes():
    pair = [Node(), Node()]
    yield pair
    for node in pair:
        node.server.shutdown()


class FakeTime:
    def __init__(self):
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds


def client(nodes, ft=None, **kw):
    ft = ft or FakeTime()
    sources = [
        SourceConfig("primary", nodes[0].url, priority=1),
        SourceConfig("backup", nodes[1].url, priority=2),
    ]
    return CometRpc(sources, clock=ft.clock, sleep=ft.sleep, **kw), ft


def test_it_reads_blocks_and_status_from_the_preferred_source(nodes):
    rpc, _ = client(nodes)
    assert rpc.block(18211106).height == 18211106
    assert rpc.status().chain_id == "cosmoshub-4"
    assert nodes[0].requests == ["/block", "/status"] and nodes[1].requests == []


def test_an_outage_fails_over_at_once_and_backs_the_source_off(nodes):
    nodes[0].mode = "down"
    rpc, ft = client(nodes)
    assert rpc.block(1).height == 18211106
    assert nodes[1].requests == ["/block"]
    assert ft.slept == []  # failover needs no sleep
    primary = rpc.health()["primary"]
    assert primary.consecutive_failures == 1 and primary.next_retry_at == ft.now + 5

    rpc.block(2)
    assert nodes[0].requests == ["/block"]  # still backed off: not asked again
    ft.now += 6
    nodes[0].mode = "ok"
    rpc.block(3)
    assert nodes[0].requests == ["/block", "/block"]  # preferred again once its backoff passed
    assert rpc.health()["primary"].consecutive_failures == 0


def test_backoff_doubles_up_to_an_hour(nodes):
    nodes[0].mode = nodes[1].mode = "down"
    rpc, ft = client(nodes, attempts=1)
    delays = []
    for _ in range(12):
        with pytest.raises(RpcUnavailable):
            rpc.block(1)
        health = rpc.health()["primary"]
        delays.append(health.next_retry_at - ft.now)
        ft.now = max(h.next_retry_at for h in rpc.health().values())
    assert delays[:4] == [5, 10, 20, 40]
    assert delays[-1] == 3600


def test_when_every_source_is_down_it_retries_with_jittered_backoff_then_gives_up(nodes):
    nodes[0].mode = nodes[1].mode = "down"
    rpc, ft = client(nodes, attempts=4, retry_base=0.2, retry_cap=5)
    with pytest.raises(RpcUnavailable, match="every attempt failed"):
        rpc.block(1)
    assert len(ft.slept) == 3
    assert all(0 <= delay <= cap for delay, cap in zip(ft.slept, [0.2, 0.4, 0.8], strict=True))
    assert len(nodes[0].requests) == len(nodes[1].requests) == 4


def test_a_rate_limited_source_is_parked_for_its_retry_after(nodes):
    nodes[0].mode = "limited"
    rpc, ft = client(nodes)
    rpc.block(1)
    assert rpc.health()["primary"].rate_limited_until == ft.now + 30
    nodes[0].mode = "ok"
    rpc.block(2)
    assert nodes[0].requests == ["/block"]
    ft.now += 31
    rpc.block(3)
    assert nodes[0].requests == ["/block", "/block"]


def test_a_pruned_height_is_asked_elsewhere_and_is_not_an_outage(nodes):
    nodes[0].mode = "pruned"
    rpc, _ = client(nodes)
    assert rpc.block(5).height == 18211106
    assert rpc.health()["primary"].consecutive_failures == 0
    nodes[1].mode = "pruned"
    with pytest.raises(HeightUnavailable, match="no source has it"):
        rpc.block(5)


def test_a_hanging_source_times_out_and_fails_over(nodes):
    nodes[0].mode = "hang"
    rpc, _ = client(nodes, timeout=0.3)
    assert rpc.block(1).height == 18211106
    assert "ReadTimeout" in rpc.health()["primary"].last_error


def test_garbage_from_a_proxy_counts_as_a_failure(nodes):
    nodes[0].mode = "garbage"
    rpc, _ = client(nodes)
    assert rpc.block(1).height == 18211106
    assert rpc.health()["primary"].consecutive_failures == 1


def test_a_broadcast_is_sent_once_and_not_retried_elsewhere(nodes):
    nodes[0].mode = "down"
    rpc, ft = client(nodes)
    with pytest.raises(RpcUnavailable):
        rpc.broadcast_tx_sync(b"payload")
    assert ft.slept == []
    assert nodes[1].requests == []  # never re-sent to the backup
