"""The payload decoder client: real HTTP with a timeout, typed outcomes and a circuit breaker.

The decoder API (the chain simulator serves the same):
  GET /decode?data=HEX  -> 200 {"decoded": {...}}
                           400 {"error": "undecodable"}   the payload can never be decoded
                           5xx                            the decoder is down; ask again later

Circuit breaker (one per client, shared by the client's threads)::

    closed --(threshold consecutive unavailable results)--> open --(cool-down passed)--> half_open
      ^                                                      ^                               |
      └───────────────── probe succeeded ────────────────────┼──── probe failed ─────────────┘

While open, `decode` raises `BreakerOpen` without any HTTP, so an outage costs the workers nothing
and the decoder gets room to recover. Half-open lets exactly one probe through at a time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import httpx

from indexer.metrics import DECODER_BREAKER, DECODER_LATENCY, DECODER_REQUESTS

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 5.0
DEFAULT_BREAKER_THRESHOLD = 5
DEFAULT_BREAKER_COOLDOWN_SECONDS = 30.0

BREAKER_OPEN_MESSAGE = "decoder circuit breaker is open"
UNDECODABLE_MESSAGE = "the decoder cannot decode this payload"
NUL_IN_DECODED_MESSAGE = "decoded payload contains a NUL character (PostgreSQL jsonb refuses it)"


class DecoderError(Exception):
    pass


class DecoderUnavailable(DecoderError):
    """Transport error, timeout, 5xx or a garbled answer: try again later."""


class BreakerOpen(DecoderUnavailable):
    """Failed fast: no request was sent, so it must not count as an attempt."""


class Undecodable(DecoderError):
    """A permanent verdict about the payload; asking again gives the same answer."""


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        *,
        threshold: int = DEFAULT_BREAKER_THRESHOLD,
        cooldown: float = DEFAULT_BREAKER_COOLDOWN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        name: str = "decoder",
    ):
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        self.threshold, self.cooldown, self.clock, self.name = threshold, cooldown, clock, name
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        with self._lock:
            if self._state is BreakerState.OPEN and self.clock() >= self._opened_at + self.cooldown:
                return BreakerState.HALF_OPEN
            return self._state

    def retry_in(self) -> float:
        """Seconds until a call would be let through again (0 when closed or due for a probe)."""
        with self._lock:
            if self._state is not BreakerState.OPEN:
                return 0.0
            return max(0.0, self._opened_at + self.cooldown - self.clock())

    def allow(self) -> bool:
        """Whether this call may go out. In half-open only one probe is in flight at a time."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN:
                if self.clock() < self._opened_at + self.cooldown:
                    return False
                self._state = BreakerState.HALF_OPEN
            if self._probing:
                return False
            self._probing = True
            return True

    def record_success(self) -> None:
        with self._lock:
            closing = self._state is not BreakerState.CLOSED
            self._state, self._failures, self._probing = BreakerState.CLOSED, 0, False
        if closing:
            DECODER_BREAKER.labels(decoder=self.name, transition="closed").inc()
            log.info("breaker of decoder %s closed", self.name)

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            # A failed probe re-opens at once; a closed breaker opens after `threshold` in a row.
            opening = self._state is BreakerState.HALF_OPEN or (
                self._state is BreakerState.CLOSED and self._failures >= self.threshold
            )
            if opening:
                self._state, self._opened_at, self._probing = BreakerState.OPEN, self.clock(), False
        if opening:
            DECODER_BREAKER.labels(decoder=self.name, transition="opened").inc()
            log.warning("breaker of decoder %s opened for %.0f s", self.name, self.cooldown)


class DecoderClient:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        breaker: CircuitBreaker | None = None,
        max_connections: int = 16,
        name: str = "decoder",
    ):
        self.base_url = base_url.rstrip("/")
        self.name = name
        self.breaker = breaker or CircuitBreaker(name=name)
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, limits=httpx.Limits(max_connections=max_connections)
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DecoderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def decode(self, data: str) -> dict[str, Any]:
        if not self.breaker.allow():
            DECODER_REQUESTS.labels(decoder=self.name, result="breaker_open").inc()
            raise BreakerOpen(BREAKER_OPEN_MESSAGE)
        started = time.monotonic()
        try:
            response = self._http.get("/decode", params={"data": data})
        except httpx.HTTPError as exc:
            self._unavailable("unreachable")
            raise DecoderUnavailable(f"{exc.__class__.__name__}: {exc}") from exc
        DECODER_LATENCY.labels(decoder=self.name).observe(time.monotonic() - started)
        # 400/422 judge the payload; every other error (5xx, 429, a 404 from a wrong URL) says
        # nothing about it, so the row waits for the decoder instead of being condemned.
        if response.status_code in (400, 422):
            self.breaker.record_success()  # the decoder is up and answered
            DECODER_REQUESTS.labels(decoder=self.name, result="undecodable").inc()
            raise Undecodable(f"{UNDECODABLE_MESSAGE}: HTTP {response.status_code} {response.text[:200]}")
        if response.status_code != 200:
            self._unavailable(f"http_{response.status_code}")
            raise DecoderUnavailable(f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            decoded = response.json()["decoded"]
        except (ValueError, KeyError, TypeError) as exc:
            self._unavailable("malformed")
            raise DecoderUnavailable(f"malformed decoder answer: {response.text[:200]}") from exc
        if not isinstance(decoded, dict):
            self._unavailable("malformed")
            raise DecoderUnavailable(f"malformed decoder answer: {response.text[:200]}")
        self.breaker.record_success()
        if "\\u0000" in json.dumps(decoded):
            DECODER_REQUESTS.labels(decoder=self.name, result="undecodable").inc()
            raise Undecodable(NUL_IN_DECODED_MESSAGE)
        DECODER_REQUESTS.labels(decoder=self.name, result="ok").inc()
        return decoded

    def _unavailable(self, result: str) -> None:
        self.breaker.record_failure()
        DECODER_REQUESTS.labels(decoder=self.name, result=result).inc()
