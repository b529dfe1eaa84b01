"""Head tracking over a CometBFT WebSocket: subscribe to new block headers, remember the newest.

`HeadWatcher` runs one daemon thread. It connects, subscribes to `tm.event='NewBlockHeader'`, and
records the height of every header (NewBlock messages, as some proxies send, are read too). When the
socket drops it reconnects with exponential backoff and full jitter; `.connected` is False until the
new subscription is acknowledged, and the runner polls `/status` meanwhile, so losing the socket
never stalls ingestion. Nothing in here raises into the caller: errors are logged and counted, and
malformed messages are counted and skipped.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from websockets.exceptions import WebSocketException
from websockets.sync.client import connect
from websockets.sync.connection import Connection

from fleetops.lib.backoff import backoff_delay
from indexer.metrics import WS_CONNECTIONS, WS_MESSAGES
from indexer.rpc import parse

log = logging.getLogger(__name__)

NEW_BLOCK_HEADER_QUERY = "tm.event='NewBlockHeader'"
SUBSCRIBE_ID = 1
RECV_TICK = 0.5  # seconds: how often the reader looks at the stop flag between messages
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # NewBlock bodies of busy chains pass 1 MiB

OnHead = Callable[[int, parse.NewBlock], None]


class SubscriptionRefused(Exception):
    pass


class HeadWatcher:
    def __init__(
        self,
        url: str,
        *,
        on_head: OnHead | None = None,
        reconnect_base: float = 1.0,
        reconnect_cap: float = 60.0,
        open_timeout: float = 5.0,
        query: str = NEW_BLOCK_HEADER_QUERY,
        name: str = "",
        source: str = "",
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ):
        self.url = url
        self.source = source  # the sync source it was chosen for (`indexer.watch`); "" if by hand
        self.on_head = on_head
        self.reconnect_base, self.reconnect_cap = reconnect_base, reconnect_cap
        self.open_timeout = open_timeout
        self.query = query
        self.name = name or url
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.malformed = 0
        self.reconnects = 0
        self.last_error = ""
        self._latest: tuple[int, float] | None = None
        self._connected = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socket: Connection | None = None
        self._thread: threading.Thread | None = None

    # --- the API --------------------------------------------------------------------------------------

    def start(self) -> HeadWatcher:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"head-watcher {self.name}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the socket and join the thread (prompt: the reader wakes every RECV_TICK)."""
        self._stop.set()
        with self._lock:
            sock = self._socket
        if sock is not None:
            try:
                sock.close()
            except Exception:  # closing a broken socket may fail any way it likes
                log.debug("head watcher %s: close failed", self.name, exc_info=True)
        if self._thread is not None:
            self._thread.join(timeout)

    def latest(self) -> tuple[int, float] | None:
        """(height, monotonic time it arrived) of the newest header, or None before the first."""
        with self._lock:
            return self._latest

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._connected

    def thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def started(self) -> bool:
        """start() was called (it may have been stopped since)."""
        return self._thread is not None

    def __enter__(self) -> HeadWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- machinery ------------------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            subscribed = False
            try:
                subscribed = self._session()
            except (OSError, TimeoutError, WebSocketException, SubscriptionRefused) as exc:
                if not self._stop.is_set():  # closing it ourselves is not news
                    self.last_error = f"{exc.__class__.__name__}: {exc}"
                    log.warning("head watcher %s: %s", self.name, self.last_error)
            except Exception as exc:  # a watcher must never die of a surprise
                self.last_error = f"{exc.__class__.__name__}: {exc}"
                log.exception("head watcher %s failed", self.name)
            finally:
                with self._lock:
                    self._connected = False
                    self._socket = None
            if self._stop.is_set():
                return
            WS_CONNECTIONS.labels(source=self.name, result="dropped" if subscribed else "failed").inc()
            # A session that got as far as a subscription resets the backoff: it was a drop, not an
            # outage; a node that keeps refusing is asked less and less often.
            failures = 1 if subscribed else failures + 1
            self.reconnects += 1
            delay = backoff_delay(failures, base=self.reconnect_base, cap=self.reconnect_cap, rng=self.rng)
            self._stop.wait(max(delay, self.reconnect_base / 10))

    def _session(self) -> bool:
        """One connection: subscribe, then read heads until the socket closes or stop(). Returns
        whether the subscription was acknowledged."""
        with connect(
            self.url,
            open_timeout=self.open_timeout,
            close_timeout=1.0,
            max_size=MAX_MESSAGE_BYTES,
            compression=None,
            proxy=None,
        ) as sock:
            with self._lock:
                self._socket = sock
            if self._stop.is_set():
                return False
            subscribe = {
                "jsonrpc": "2.0",
                "method": "subscribe",
                "id": SUBSCRIBE_ID,
                "params": {"query": self.query},
            }
            sock.send(json.dumps(subscribe))
            subscribed = False
            while not self._stop.is_set():
                try:
                    raw = sock.recv(timeout=RECV_TICK if subscribed else self.open_timeout)
                except TimeoutError:
                    if not subscribed:
                        raise SubscriptionRefused("no answer to the subscription") from None
                    continue
                message = self._decode(raw)
                if message is None:
                    continue
                if not subscribed:
                    subscribed = self._acknowledged(message)
                    if subscribed:
                        with self._lock:
                            self._connected = True
                        WS_CONNECTIONS.labels(source=self.name, result="subscribed").inc()
                        log.info("head watcher %s: subscribed", self.name)
                        continue
                self._handle(message)
            return subscribed

    def _decode(self, raw: str | bytes) -> dict[str, Any] | None:
        try:
            message = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            message = None
        if not isinstance(message, dict):
            self._malformed("not a JSON object")
            return None
        return message

    def _acknowledged(self, message: dict[str, Any]) -> bool:
        if message.get("id") != SUBSCRIBE_ID:
            return False
        if message.get("error"):
            raise SubscriptionRefused(f"subscription refused: {message['error']}")
        return isinstance(message.get("result"), dict)

    def _handle(self, message: dict[str, Any]) -> None:
        result = message.get("result")
        if message.get("error"):
            self._malformed(f"error message: {message['error']}")
            return
        if not isinstance(result, dict) or not result.get("data"):
            WS_MESSAGES.labels(source=self.name, result="ignored").inc()  # acks, keep-alives
            return
        try:
            block = parse.parse_new_block_event(message)
        except parse.MalformedResponse as exc:
            self._malformed(str(exc))
            return
        if block is None or block.height <= 0:
            self._malformed("event without a block height")
            return
        with self._lock:
            self._latest = (block.height, self.clock())
        WS_MESSAGES.labels(source=self.name, result="head").inc()
        if self.on_head is not None:
            try:
                self.on_head(block.height, block)
            except Exception:  # the caller's hook must not kill the watcher
                log.exception("head watcher %s: on_head failed", self.name)

    def _malformed(self, why: str) -> None:
        self.malformed += 1
        WS_MESSAGES.labels(source=self.name, result="malformed").inc()
        log.info("head watcher %s: skipped a malformed message (%s)", self.name, why)
