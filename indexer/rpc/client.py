"""CometBFT RPC client: real HTTP, timeouts, retries with backoff and jitter, failover between
sources by health and priority, per-source metrics.

A source that fails is backed off (5 s doubling to 1 h) and the next best source is tried at once;
a 429 parks the source for its Retry-After. `height ... is not available` is a fact about that
source's history (pruned, or not there yet), not an outage: the next source is asked, and if none
has it the caller gets HeightUnavailable.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from fleetops.lib.backoff import backoff_delay
from indexer.metrics import RPC_LATENCY, RPC_REQUESTS
from indexer.rpc import parse

log = logging.getLogger(__name__)
T = TypeVar("T")

SOURCE_BACKOFF_BASE = 5.0
SOURCE_BACKOFF_CAP = 3600.0
_HEIGHT_UNAVAILABLE = re.compile(r"(is not available|must be less than or equal to|lowest height is)", re.I)


class RpcError(Exception):
    pass


class RpcUnavailable(RpcError):
    """Transport error, timeout or 5xx: nothing is known about the request's effect."""


class RpcRateLimited(RpcUnavailable):
    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class HeightUnavailable(RpcError):
    """No source can serve the height (pruned below, or above its head)."""


@dataclass(frozen=True)
class SourceConfig:
    name: str
    url: str
    priority: int = 100  # lower is preferred


@dataclass
class SourceHealth:
    consecutive_failures: int = 0
    last_failure_at: float | None = None
    last_success_at: float | None = None
    next_retry_at: float = 0.0
    rate_limited_until: float = 0.0
    last_latency: float | None = None
    last_error: str = ""


@dataclass
class _Source:
    config: SourceConfig
    http: httpx.Client
    health: SourceHealth = field(default_factory=SourceHealth)


class CometRpc:
    def __init__(
        self,
        sources: Sequence[SourceConfig],
        *,
        timeout: float = 10.0,
        attempts: int = 4,
        retry_base: float = 0.2,
        retry_cap: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        if not sources:
            raise ValueError("at least one RPC source is required")
        self._sources = [
            _Source(config=s, http=httpx.Client(base_url=s.url.rstrip("/"), timeout=timeout)) for s in sources
        ]
        self.attempts = attempts
        self.retry_base, self.retry_cap = retry_base, retry_cap
        self.clock, self.sleep = clock, sleep
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._lock = threading.Lock()

    def close(self) -> None:
        for source in self._sources:
            source.http.close()

    def __enter__(self) -> CometRpc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the API --------------------------------------------------------------------------------------

    def status(self) -> parse.Status:
        return self._call("status", {}, parse.parse_status)

    def block(self, height: int) -> parse.Block:
        return self._call("block", {"height": str(height)}, parse.parse_block)

    def block_results(self, height: int) -> parse.BlockResults:
        return self._call("block_results", {"height": str(height)}, parse.parse_block_results)

    def tx(self, tx_hash: str) -> parse.TxInfo:
        return self._call("tx", {"hash": f"0x{tx_hash}"}, parse.parse_tx)

    def broadcast_tx_sync(self, tx: bytes) -> parse.BroadcastResult:
        # One request to one source: after a timeout the node may have taken the tx, so re-sending is
        # the caller's decision (the re-stake schedule looks the tx up on chain first).
        return self._call(
            "broadcast_tx_sync", {"tx": f"0x{tx.hex()}"}, parse.parse_broadcast, attempts=1, failover=False
        )

    def health(self) -> dict[str, SourceHealth]:
        with self._lock:
            return {s.config.name: SourceHealth(**s.health.__dict__) for s in self._sources}

    # --- machinery ------------------------------------------------------------------------------------

    def ranked_sources(self) -> list[_Source]:
        """Healthy sources by priority first; sources in backoff last, soonest retry first."""
        now = self.clock()
        with self._lock:
            ready = [
                s
                for s in self._sources
                if s.health.next_retry_at <= now and s.health.rate_limited_until <= now
            ]
            waiting = [s for s in self._sources if s not in ready]
        ready.sort(key=lambda s: (s.config.priority, s.health.consecutive_failures))
        waiting.sort(key=lambda s: max(s.health.next_retry_at, s.health.rate_limited_until))
        return ready + waiting

    def _call(
        self,
        method: str,
        params: dict[str, str],
        parser: Callable[[Any], T],
        *,
        attempts: int | None = None,
        failover: bool = True,
    ) -> T:
        last_error: Exception | None = None
        missing_height: list[str] = []
        for attempt in range(1, (attempts or self.attempts) + 1):
            candidates = self.ranked_sources()
            for source in candidates if failover else candidates[:1]:
                if source.config.name in missing_height:
                    continue
                try:
                    return self._once(source, method, params, parser)
                except HeightUnavailable as exc:
                    missing_height.append(source.config.name)
                    last_error = exc
                except (RpcUnavailable, parse.MalformedResponse) as exc:
                    last_error = exc  # fail over to the next source at once
            if len(missing_height) == len(self._sources):
                break
            if attempt < (attempts or self.attempts):
                self.sleep(backoff_delay(attempt, base=self.retry_base, cap=self.retry_cap, rng=self.rng))
        if len(missing_height) == len(self._sources):
            raise HeightUnavailable(f"{method} {params}: no source has it ({last_error})")
        raise RpcUnavailable(f"{method} {params}: every attempt failed: {last_error}") from last_error

    def _once(self, source: _Source, method: str, params: dict[str, str], parser: Callable[[Any], T]) -> T:
        name = source.config.name
        started = self.clock()
        try:
            response = source.http.get(f"/{method}", params=params)
        except httpx.HTTPError as exc:
            self._failed(source, f"{exc.__class__.__name__}: {exc}")
            RPC_REQUESTS.labels(source=name, method=method, result="unavailable").inc()
            raise RpcUnavailable(f"{name}: {exc.__class__.__name__}: {exc}") from exc
        latency = self.clock() - started
        RPC_LATENCY.labels(source=name, method=method).observe(latency)
        if response.status_code == 429:
            retry_after = _retry_after(response.headers.get("Retry-After"))
            with self._lock:
                source.health.rate_limited_until = self.clock() + retry_after
            RPC_REQUESTS.labels(source=name, method=method, result="rate_limited").inc()
            raise RpcRateLimited(f"{name}: HTTP 429", retry_after)
        body: Any = None
        try:
            body = response.json()
        except ValueError:
            body = None
        error_text = _error_text(body)
        if error_text and _HEIGHT_UNAVAILABLE.search(error_text):
            RPC_REQUESTS.labels(source=name, method=method, result="height_unavailable").inc()
            self._succeeded(source, latency)  # the source answered; it just lacks that height
            raise HeightUnavailable(f"{name}: {error_text}")
        if response.status_code >= 500 or body is None:
            self._failed(source, f"HTTP {response.status_code}")
            RPC_REQUESTS.labels(source=name, method=method, result="unavailable").inc()
            raise RpcUnavailable(f"{name}: HTTP {response.status_code}")
        try:
            parsed = parser(body)
        except parse.MalformedResponse as exc:
            self._failed(source, f"malformed: {exc}")
            RPC_REQUESTS.labels(source=name, method=method, result="malformed").inc()
            raise
        self._succeeded(source, latency)
        RPC_REQUESTS.labels(source=name, method=method, result="ok").inc()
        return parsed

    def _failed(self, source: _Source, error: str) -> None:
        now = self.clock()
        with self._lock:
            health = source.health
            health.consecutive_failures += 1
            health.last_failure_at = now
            health.last_error = error[:500]
            health.next_retry_at = now + backoff_delay(
                health.consecutive_failures, base=SOURCE_BACKOFF_BASE, cap=SOURCE_BACKOFF_CAP, jitter=False
            )
        log.warning("rpc source %s failed: %s", source.config.name, error)

    def _succeeded(self, source: _Source, latency: float) -> None:
        with self._lock:
            health = source.health
            health.consecutive_failures = 0
            health.last_success_at = self.clock()
            health.next_retry_at = 0.0
            health.last_latency = latency


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 1.0
    except ValueError:
        return 1.0


def _error_text(body: Any) -> str:
    if isinstance(body, dict) and body.get("error"):
        error = body["error"]
        if isinstance(error, dict):
            return " ".join(str(error.get(k, "")) for k in ("message", "data")).strip()
        return str(error)
    return ""
