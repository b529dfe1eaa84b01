"""HTTP GET for the RPC client: a small pool of keep-alive HTTP/1.1 connections per source.

The client fetches `/block` + `/block_results` for up to `max_in_flight` heights at once, ~120 kB
a height, thousands of heights in a catch-up. A general HTTP client (and its connection pool lock,
which every worker thread contends for) cost ~2.5 ms of CPU a height here; `http.client` on a reused
connection costs a third of that, and the body comes back as bytes for a fast JSON parser.

- A connection is taken from the pool for one request and put back after its body is read whole
  (LIFO, so the warmest connection is reused); any thread may use any connection, one at a time.
- A pooled connection that sat idle for more than `CHECK_IDLE_AFTER` seconds and that the server has
  closed meanwhile (its socket reads as ready while idle) is dropped before use; one put back just
  now is not checked (the check is a system call, and in a catch-up each one hands the GIL to
  another thread and waits to get it back). A reused connection that still fails before any answer
  came back (the server closed it in between) is retried once on a new connection: every read is
  idempotent. A request that is not (a broadcast) goes out on a new connection of its own, once.
- Every transport failure raises `TransportError`, named like the failure (`ConnectTimeout`,
  `ConnectError`, `ReadTimeout`, `ReadError`, `RemoteProtocolError`) for the source's `last_error`.
"""

from __future__ import annotations

import http.client
import select
import threading
import time
from dataclasses import dataclass
from email.message import Message
from urllib.parse import urlencode, urlsplit

POOL_IDLE_MAX = 32  # idle connections kept per source (more than any max_in_flight in use)
CHECK_IDLE_AFTER = 1.0  # seconds idle after which a pooled connection is checked before reuse


class TransportError(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True)
class Response:
    status_code: int
    headers: Message
    content: bytes


_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class HttpPool:
    def __init__(self, base_url: str, *, timeout: float):
        url = urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.https = url.scheme == "https"
        self.host = url.hostname
        self.port = url.port or (443 if self.https else 80)
        self.prefix = url.path
        self.timeout = timeout
        self._idle: list[tuple[http.client.HTTPConnection, float]] = []  # with when it was put back
        self._lock = threading.Lock()
        self._closed = False

    def get(self, path: str, params: dict[str, str], *, idempotent: bool = True) -> Response:
        """One GET. Not `idempotent` (a broadcast): on a new connection, never sent twice."""
        target = f"{self.prefix}{path}?{urlencode(params)}" if params else f"{self.prefix}{path}"
        conn, reused = self._take() if idempotent else (self._new(), False)
        try:
            response = self._request(conn, target)
        except _STALE as exc:
            conn.close()
            if not reused:
                raise TransportError("ReadError", str(exc) or exc.__class__.__name__) from exc
            conn, reused = self._new(), False
            response = self._request(conn, target)
        except BaseException:
            conn.close()
            raise
        self._give(conn, response)
        return response

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()

    # --- machinery ------------------------------------------------------------------------------------

    def _new(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        while True:
            with self._lock:
                conn, since = self._idle.pop() if self._idle else (None, 0.0)
            if conn is None:
                return self._new(), False
            if time.monotonic() - since < CHECK_IDLE_AFTER or _alive(conn):
                return conn, True
            conn.close()

    def _give(self, conn: http.client.HTTPConnection, response: Response) -> None:
        keep = response.headers.get("Connection", "").lower() != "close"
        with self._lock:
            if keep and not self._closed and len(self._idle) < POOL_IDLE_MAX:
                self._idle.append((conn, time.monotonic()))
                return
        conn.close()

    def _request(self, conn: http.client.HTTPConnection, target: str) -> Response:
        """One GET; connection-level resets propagate as themselves (the caller may retry a stale
        connection), every other failure as TransportError."""
        if conn.sock is None:
            try:
                conn.connect()
            except TimeoutError as exc:
                raise TransportError("ConnectTimeout", str(exc) or "timed out") from exc
            except OSError as exc:
                raise TransportError("ConnectError", str(exc)) from exc
        try:
            conn.request("GET", target, headers={"Accept": "application/json"})
            answer = conn.getresponse()
            content = answer.read()
        except _STALE:
            raise
        except TimeoutError as exc:
            raise TransportError("ReadTimeout", str(exc) or "timed out") from exc
        except http.client.HTTPException as exc:
            raise TransportError("RemoteProtocolError", f"{exc.__class__.__name__}: {exc}") from exc
        except OSError as exc:
            raise TransportError("ReadError", str(exc)) from exc
        if answer.will_close:
            conn.close()
        return Response(answer.status, answer.headers, content)


def _alive(conn: http.client.HTTPConnection) -> bool:
    """An idle keep-alive socket that reads as ready has been closed (or sent garbage) by the server."""
    sock = conn.sock
    if sock is None:
        return True  # closed by us after a `Connection: close` answer: reconnects on use
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable
