"""The RPC client's HTTP pool against real loopback servers: keep-alive reuse across threads, a
server that closes idle connections, `Connection: close`, timeouts and refused connections named
for the source's `last_error`."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from indexer.rpc.transport import HttpPool, TransportError


class Server:
    """HTTP/1.1 on loopback; counts the connections it accepted. `mode`: keep | close-silently
    (closes after each answer without saying so) | close-header | hang."""

    def __init__(self, mode: str = "keep"):
        self.mode = mode
        self.connections = 0
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                return

            def setup(self):
                super().setup()
                with lock:
                    server.connections += 1

            def do_GET(self):
                server.paths.append(self.path)
                if server.mode == "hang":
                    time.sleep(1.0)
                body = b'{"result": {"ok": true}}'
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    if server.mode == "close-header":
                        self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (the timeout test)
                    self.close_connection = True
                    return
                if server.mode == "close-silently":
                    self.close_connection = True

        lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    started: list[Server] = []

    def start(mode: str = "keep") -> Server:
        started.append(Server(mode))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def test_one_connection_is_reused_for_sequential_requests_and_params_are_encoded(server):
    s = server()
    pool = HttpPool(s.url, timeout=5)
    try:
        for height in range(1, 21):
            answer = pool.get("/block", {"height": str(height)})
            assert (answer.status_code, answer.content) == (200, b'{"result": {"ok": true}}')
    finally:
        pool.close()
    assert s.connections == 1
    assert s.paths == [f"/block?height={h}" for h in range(1, 21)]


def test_threads_share_the_pool_without_opening_a_connection_per_request(server):
    s = server()
    pool = HttpPool(s.url, timeout=5)
    try:
        with ThreadPoolExecutor(max_workers=8) as workers:
            codes = list(
                workers.map(lambda h: pool.get("/block", {"height": str(h)}).status_code, range(200))
            )
    finally:
        pool.close()
    assert codes == [200] * 200
    assert 1 <= s.connections <= 8


def test_a_connection_the_server_closed_is_replaced_not_failed(server):
    s = server("close-silently")
    pool = HttpPool(s.url, timeout=5)
    try:
        for _ in range(20):
            assert pool.get("/status", {}).status_code == 200
    finally:
        pool.close()
    assert s.connections == 20


def test_a_request_that_is_not_idempotent_goes_out_once_on_a_connection_of_its_own(server):
    s = server()
    pool = HttpPool(s.url, timeout=5)
    try:
        assert pool.get("/status", {}).status_code == 200
        assert pool.get("/broadcast_tx_sync", {"tx": "0x00"}, idempotent=False).status_code == 200
    finally:
        pool.close()
    assert (s.connections, len(s.paths)) == (2, 2)


def test_connection_close_is_honoured(server):
    s = server("close-header")
    pool = HttpPool(s.url, timeout=5)
    try:
        for _ in range(3):
            assert pool.get("/status", {}).status_code == 200
    finally:
        pool.close()
    assert s.connections == 3


def test_a_slow_answer_is_a_read_timeout(server):
    s = server("hang")
    pool = HttpPool(s.url, timeout=0.2)
    try:
        with pytest.raises(TransportError) as caught:
            pool.get("/status", {})
    finally:
        pool.close()
    assert caught.value.kind == "ReadTimeout"


def test_a_refused_connection_is_a_connect_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: the connection is refused
        pool = HttpPool(f"http://127.0.0.1:{port}", timeout=1)
        with pytest.raises(TransportError) as caught:
            pool.get("/status", {})
    assert caught.value.kind == "ConnectError"
    assert str(caught.value).startswith("ConnectError: ")


def test_only_http_urls_are_taken():
    with pytest.raises(ValueError):
        HttpPool("ftp://127.0.0.1/", timeout=1)
