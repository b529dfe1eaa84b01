"""CometBFT RPC client: real HTTP, timeouts, retries with backoff and jitter, failover between
sources by health, head lag and priority, per-source metrics.

A source that fails is backed off (5 s doubling to 1 h) and the next best source is tried at once;
a 429 parks the source for its Retry-After. A malformed answer (`parse.MalformedResponse`: a wrong
type, a missing field, a body that is not JSON, a /block and /block_results that disagree) is such a
failure too, recorded as `malformed: …` in the source's `last_error`, never read as an empty block.
`height ... is not available` is a fact about that source's history (pruned, or not there yet),
not an outage: the next source is asked, and if none has it the caller gets HeightUnavailable.

Per-source health stays in memory (monotonic times drive the backoff; wall-clock times from
`fleetops.lib.clock` are kept beside them for the SyncSource rows that `indexer.sources` writes after
every step), together with each source's head from `/status` and the pruned heights it could not
serve, so the status machine can tell a lagging or pruned source from a healthy one.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar, cast

from fleetops.lib import clock as wallclock
from fleetops.lib.backoff import backoff_delay
from indexer.metrics import RPC_LATENCY, RPC_REQUESTS
from indexer.rpc import bodies, parse, typed
from indexer.rpc.errors import HeightUnavailable as HeightUnavailable
from indexer.rpc.errors import RpcError as RpcError
from indexer.rpc.errors import RpcRateLimited as RpcRateLimited
from indexer.rpc.errors import RpcUnavailable as RpcUnavailable
from indexer.rpc.errors import TxAlreadyKnown as TxAlreadyKnown
from indexer.rpc.errors import TxNotFound as TxNotFound
from indexer.rpc.transport import HttpPool, TransportError

log = logging.getLogger(__name__)
T = TypeVar("T")

SOURCE_BACKOFF_BASE = 5.0
SOURCE_BACKOFF_CAP = 3600.0
PROBE_INTERVAL = 5.0  # seconds between /status probes of one source (head tracking of every source)
LAGGING_HEAD_BLOCKS = 10  # a source this many blocks below the best head is lagging
HEAD_FRESH_SECONDS = 60.0  # a /status answer older than this (monotonic) is not compared
FORKED_BACKOFF_BASE = 60.0  # a source showing a fork the trusted sources do not: ranked last this long,
FORKED_BACKOFF_CAP = 3600.0  # doubling each time it is caught again
RECENT_WINDOW = 50  # request outcomes kept per source for the error rate
LATENCY_SMOOTHING = 0.3  # weight of the newest sample in the moving average
_HEIGHT_UNAVAILABLE = re.compile(r"(is not available|must be less than or equal to|lowest height is)", re.I)
# Below the source's history (pruned), as opposed to above its head (not there yet).
_PRUNED = re.compile(r"is not available|lowest height is", re.I)
_LOWEST = re.compile(r"lowest height is (\d+)", re.I)
# Answers about one tx that are facts, not outages: no such committed tx, or the bytes are known.
_TX_FACTS = {"tx": re.compile(r"tx \(\w*\) not found"), "broadcast_tx_sync": re.compile("in cache")}


def lowest_available(error_text: str) -> int | None:
    """The `lowest height is N` a node names when a height is pruned, if it names one."""
    match = _LOWEST.search(error_text)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class SourceConfig:
    name: str
    url: str
    priority: int = 100  # lower is preferred


@dataclass
class SourceHealth:
    # Monotonic (the client's clock): they drive backoff and ranking.
    consecutive_failures: int = 0
    last_failure_at: float | None = None
    last_success_at: float | None = None
    next_retry_at: float = 0.0
    rate_limited_until: float = 0.0
    last_latency: float | None = None
    last_error: str = ""
    # Wall clock (fleetops.lib.clock) for the SyncSource row: a monotonic value means nothing to
    # another process, and re-deriving wall times from it every step would move them with the clock.
    first_failure_wall: datetime | None = None
    last_failure_wall: datetime | None = None
    last_success_wall: datetime | None = None
    recovered_wall: datetime | None = None
    latency_avg: float | None = None
    recent: tuple[bool, ...] = ()  # newest last; True = answered
    head_height: int | None = None
    earliest_height: int | None = None
    status_at: float | None = None  # monotonic time of the last /status answer
    status_count: int = 0  # /status answers so far: tells a newer answer from an older one
    catching_up: bool = False  # the source's own /status says it is still syncing
    node_version: str = ""  # from its last /status: which encoding its event attributes use
    # Pruned heights this source could not serve since the last take_range_failures():
    # (lowest, highest, error text).
    missing_range: tuple[int, int, str] | None = None
    # It showed a fork the trusted sources do not show (`demote_forked`): ranked last until then.
    forked_until: float = 0.0
    forked_detail: str = ""
    forks: int = 0

    @property
    def error_rate(self) -> float:
        return self.recent.count(False) / len(self.recent) if self.recent else 0.0

    @property
    def active(self) -> bool:
        """Asked at least once by this client."""
        return self.last_success_at is not None or self.last_failure_at is not None


@dataclass
class _Source:
    config: SourceConfig
    http: HttpPool
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
        wall: Callable[[], datetime] | None = None,
        lag_blocks: int = LAGGING_HEAD_BLOCKS,
    ):
        if not sources:
            raise ValueError("at least one RPC source is required")
        self.timeout = timeout
        self.lag_blocks = lag_blocks
        self._sources = [_Source(config=s, http=HttpPool(s.url, timeout=timeout)) for s in sources]
        self.attempts = attempts
        self.retry_base, self.retry_cap = retry_base, retry_cap
        self.clock, self.sleep = clock, sleep
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.wall = wall or wallclock.now
        self._lock = threading.Lock()
        self._last_source: str | None = None

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
        return self._call(
            "block_results", {"height": str(height)}, parse.parse_block_results, attributes=True
        )

    def block_with_results(self, height: int) -> tuple[parse.Block, parse.BlockResults]:
        """`/block` and `/block_results` of one height from the same source, checked against each
        other (the height asked for, one tx result per tx). A source whose answers disagree is
        faulted like one that sent a malformed body, and the next source is asked."""
        params = {"height": str(height)}

        def both(source: _Source) -> tuple[parse.Block, parse.BlockResults]:
            block = self._once(source, "block", params, parse.parse_block)
            results = self._once(source, "block_results", params, parse.parse_block_results, attributes=True)
            try:
                parse.check_block_results(block, results, height=height)
            except parse.MalformedResponse as exc:
                self._malformed(source, "block_results", exc)
                raise
            return block, results

        return self._failover(f"block+block_results {params}", both)

    def tx(self, tx_hash: str) -> parse.TxInfo:
        return self._call("tx", {"hash": f"0x{tx_hash}"}, parse.parse_tx, attributes=True)

    def broadcast_tx_sync(self, tx: bytes) -> parse.BroadcastResult:
        # One request to one source: after a timeout the node may have taken the tx, so re-sending is
        # the caller's decision (the re-stake schedule looks the tx up on chain first).
        return self._call(
            "broadcast_tx_sync", {"tx": f"0x{tx.hex()}"}, parse.parse_broadcast, attempts=1, failover=False
        )

    def health(self) -> dict[str, SourceHealth]:
        with self._lock:
            return {s.config.name: SourceHealth(**s.health.__dict__) for s in self._sources}

    @property
    def source_names(self) -> list[str]:
        return [s.config.name for s in self._sources]

    @property
    def last_source(self) -> str | None:
        """The source that answered the latest successful request."""
        with self._lock:
            return self._last_source

    def heads(self) -> dict[str, int | None]:
        """Each source's latest height from its last `/status` answer (None if never asked)."""
        with self._lock:
            return {s.config.name: s.health.head_height for s in self._sources}

    def probe_heads(self, *, min_interval: float = PROBE_INTERVAL) -> dict[str, int | None]:
        """Ask `/status` of every source that is not backed off and was not asked within
        `min_interval`: once each, no retries, no failover. This is how standby sources are watched
        (their head, their reachability) while the best one serves the ingest."""
        now = self.clock()
        with self._lock:
            due = [
                s
                for s in self._sources
                if s.health.next_retry_at <= now
                and s.health.rate_limited_until <= now
                and (s.health.status_at is None or now - s.health.status_at >= min_interval)
            ]
        for source in due:
            try:
                self._once(source, "status", {}, parse.parse_status)
            except (RpcError, parse.MalformedResponse):
                pass  # recorded in the source's health by _once
        return self.heads()

    def fresh_heads(self) -> dict[str, int]:
        """Heads of the sources that answer now (no failure streak, not ranked down for a fork) from
        a /status younger than HEAD_FRESH_SECONDS: the ones the chain head is agreed from."""
        now = self.clock()
        with self._lock:
            return {
                s.config.name: s.health.head_height
                for s in self._sources
                if s.health.head_height is not None
                and s.health.consecutive_failures == 0
                and s.health.forked_until <= now
                and s.health.status_at is not None
                and now - s.health.status_at <= HEAD_FRESH_SECONDS
            }

    def lagging(self) -> dict[str, int]:
        """Sources whose fresh head is more than `lag_blocks` below the best fresh head, with how
        many blocks they are behind. They are ranked last, and neither set the head nor show a reorg."""
        heads = self.fresh_heads()
        if not heads:
            return {}
        best = max(heads.values())
        return {name: best - head for name, head in heads.items() if best - head > self.lag_blocks}

    def block_from(self, name: str, height: int) -> parse.Block:
        """`/block` of one named source: no retries, no failover (checking what another source said)."""
        return self._once(self._by_name(name), "block", {"height": str(height)}, parse.parse_block)

    def set_sources(self, sources: Sequence[SourceConfig]) -> bool:
        """Take a new source list (an operator enabled, disabled or re-prioritized sources while
        the process runs): a source kept by name keeps its health; a new one starts fresh; a removed
        one is closed. Returns whether anything changed."""
        if not sources:
            raise ValueError("at least one RPC source is required")
        with self._lock:
            current = {s.config.name: s for s in self._sources}
            if [s.config for s in self._sources] == list(sources):
                return False
            kept: list[_Source] = []
            for config in sources:
                known = current.pop(config.name, None)
                if known is not None and known.config.url == config.url:
                    known.config = config
                    kept.append(known)
                else:
                    if known is not None:
                        known.http.close()
                    http = HttpPool(config.url, timeout=self.timeout)
                    kept.append(_Source(config=config, http=http))
            for gone in current.values():
                gone.http.close()
            self._sources = kept
        return True

    def mark_rate_limited(self, name: str, seconds: float) -> None:
        """Park a source for `seconds` (a 429 seen elsewhere, or an operator's cooldown)."""
        with self._lock:
            source = self._by_name(name)
            source.health.rate_limited_until = max(source.health.rate_limited_until, self.clock() + seconds)

    def demote_forked(self, name: str, *, detail: str) -> float:
        """`name` served a fork the trusted sources do not show: rank it last (and keep it out of the
        trusted sources) for a backoff that doubles each time. Returns the seconds."""
        with self._lock:
            health = self._by_name(name).health
            health.forks += 1
            seconds = backoff_delay(
                health.forks, base=FORKED_BACKOFF_BASE, cap=FORKED_BACKOFF_CAP, jitter=False
            )
            health.forked_until = self.clock() + seconds
            health.forked_detail = f"{detail} (ranked last for {seconds:.0f} s)"[:300]
        return seconds

    def take_range_failures(self) -> dict[str, tuple[int, int, str]]:
        """The pruned ranges each source failed to serve since the last call, and forget them."""
        taken: dict[str, tuple[int, int, str]] = {}
        with self._lock:
            for source in self._sources:
                if source.health.missing_range is not None:
                    taken[source.config.name] = source.health.missing_range
                    source.health.missing_range = None
        return taken

    def adopt_streak(
        self, name: str, *, consecutive_failures: int, first_failure_at: datetime | None
    ) -> None:
        """Continue a failure streak a previous process recorded (SyncSource row), so a restart
        neither resets the backoff nor the 24 h until the source counts as dead. A source this
        client has already heard from keeps what it saw."""
        with self._lock:
            health = self._by_name(name).health
            if consecutive_failures <= 0 or health.last_success_at is not None:
                return
            health.consecutive_failures += consecutive_failures
            if first_failure_at is not None and (
                health.first_failure_wall is None or first_failure_at < health.first_failure_wall
            ):
                health.first_failure_wall = first_failure_at
            now = self.clock()
            health.next_retry_at = max(
                health.next_retry_at,
                (health.last_failure_at or now)
                + backoff_delay(
                    health.consecutive_failures,
                    base=SOURCE_BACKOFF_BASE,
                    cap=SOURCE_BACKOFF_CAP,
                    jitter=False,
                ),
            )

    def _by_name(self, name: str) -> _Source:
        for source in self._sources:
            if source.config.name == name:
                return source
        raise KeyError(name)

    # --- machinery ------------------------------------------------------------------------------------

    def ranked_sources(self) -> list[_Source]:
        """Healthy sources by priority first (lagging, self-declared catching-up or forked ones after
        the others); sources in backoff last, soonest retry first."""
        lagging = self.lagging()
        now = self.clock()
        with self._lock:
            ready = [
                s
                for s in self._sources
                if s.health.next_retry_at <= now and s.health.rate_limited_until <= now
            ]
            waiting = [s for s in self._sources if s not in ready]
        ready.sort(
            key=lambda s: (
                s.config.name in lagging or s.health.catching_up or s.health.forked_until > now,
                s.config.priority,
                s.health.consecutive_failures,
            )
        )
        waiting.sort(key=lambda s: max(s.health.next_retry_at, s.health.rate_limited_until))
        return ready + waiting

    def _call(
        self,
        method: str,
        params: dict[str, str],
        parser: Callable[..., T],
        *,
        attempts: int | None = None,
        failover: bool = True,
        attributes: bool = False,
    ) -> T:
        return self._failover(
            f"{method} {params}",
            lambda source: self._once(source, method, params, parser, attributes=attributes),
            attempts=attempts,
            failover=failover,
        )

    def _failover(
        self,
        what: str,
        ask: Callable[[_Source], T],
        *,
        attempts: int | None = None,
        failover: bool = True,
    ) -> T:
        """`ask` the best source; on a fault (transport, 5xx, malformed answer) the next one at
        once, then again after a jittered backoff, `attempts` rounds in all."""
        last_error: Exception | None = None
        missing_height: list[str] = []
        lowest: int | None = None
        for attempt in range(1, (attempts or self.attempts) + 1):
            candidates = self.ranked_sources()
            for source in candidates if failover else candidates[:1]:
                if source.config.name in missing_height:
                    continue
                try:
                    return ask(source)
                except HeightUnavailable as exc:
                    missing_height.append(source.config.name)
                    last_error = exc
                    if exc.lowest is not None:
                        lowest = exc.lowest if lowest is None else min(lowest, exc.lowest)
                except (RpcUnavailable, parse.MalformedResponse) as exc:
                    last_error = exc  # fail over to the next source at once
            if len(missing_height) == len(self._sources):
                break
            if attempt < (attempts or self.attempts):
                self.sleep(backoff_delay(attempt, base=self.retry_base, cap=self.retry_cap, rng=self.rng))
        if len(missing_height) == len(self._sources):
            raise HeightUnavailable(
                f"{what}: no source has it ({last_error})", sources=missing_height, lowest=lowest
            )
        raise RpcUnavailable(f"{what}: every attempt failed: {last_error}") from last_error

    def _once(
        self,
        source: _Source,
        method: str,
        params: dict[str, str],
        parser: Callable[..., T],
        *,
        attributes: bool = False,
    ) -> T:
        """One request to one source. With `attributes` the body carries event attributes, read in
        the encoding of the source's node version (from its /status, asked first if this client has
        not seen one from it; detected per body only when the version says nothing)."""
        if attributes and not self._knows_version(source):
            self._once(source, "status", {}, parse.parse_status)
        name = source.config.name
        started = self.clock()
        try:
            # A broadcast is never re-sent, not even on a new connection after a stale one.
            response = source.http.get(f"/{method}", params, idempotent=method != "broadcast_tx_sync")
        except TransportError as exc:
            self._failed(source, str(exc))
            RPC_REQUESTS.labels(source=name, method=method, result="unavailable").inc()
            raise RpcUnavailable(f"{name}: {exc}") from exc
        latency = self.clock() - started
        RPC_LATENCY.labels(source=name, method=method).observe(latency)
        if response.status_code == 429:
            retry_after = bodies.retry_after(response.headers.get("Retry-After"))
            with self._lock:
                source.health.rate_limited_until = self.clock() + retry_after
                source.health.last_error = f"HTTP 429 (retry after {retry_after:g} s)"
            RPC_REQUESTS.labels(source=name, method=method, result="rate_limited").inc()
            raise RpcRateLimited(f"{name}: HTTP 429", retry_after)
        if attributes and method == "block_results" and response.status_code == 200:
            # Of the common shape, it is read straight into values; any other is parsed below.
            fast = typed.block_results(response.content, base64_attributes=self._attribute_encoding(source))
            if fast is not None:
                return self._served(source, method, latency, cast(T, fast))
        body = bodies.json_body(response.content)
        error_text = bodies.error_text(body)
        if error_text and _HEIGHT_UNAVAILABLE.search(error_text):
            RPC_REQUESTS.labels(source=name, method=method, result="height_unavailable").inc()
            self._succeeded(source, latency)  # the source answered; it just lacks that height
            lowest = lowest_available(error_text)
            if _PRUNED.search(error_text) and params.get("height", "").isdigit():
                self._missing(source, int(params["height"]), error_text)
            raise HeightUnavailable(f"{name}: {error_text}", sources=(name,), lowest=lowest)
        if error_text and method in _TX_FACTS and _TX_FACTS[method].search(error_text):
            RPC_REQUESTS.labels(source=name, method=method, result="tx_fact").inc()
            self._succeeded(source, latency)  # an answer about the tx, not a failing source
            raise (TxNotFound if method == "tx" else TxAlreadyKnown)(f"{name}: {error_text}")
        if response.status_code >= 500 or (body is None and response.status_code != 200):
            self._failed(source, f"HTTP {response.status_code}")
            RPC_REQUESTS.labels(source=name, method=method, result="unavailable").inc()
            raise RpcUnavailable(f"{name}: HTTP {response.status_code}")
        try:
            if body is None:
                raise parse.MalformedResponse("HTTP 200 but the body is not JSON")
            if attributes:
                parsed = parser(
                    body,
                    base64_attributes=self._attribute_encoding(source),
                    plain_text=parse.body_is_plain_text(response.content),
                )
            else:
                parsed = parser(body)
        except parse.MalformedResponse as exc:
            self._malformed(source, method, exc)
            raise
        return self._served(source, method, latency, parsed)

    def _served(self, source: _Source, method: str, latency: float, parsed: T) -> T:
        self._succeeded(source, latency, served=True)
        if isinstance(parsed, parse.Status):
            with self._lock:
                source.health.head_height = parsed.latest_height
                source.health.earliest_height = parsed.earliest_height
                source.health.status_at = self.clock()
                source.health.status_count += 1
                source.health.catching_up = parsed.catching_up
                source.health.node_version = parsed.node_version
        RPC_REQUESTS.labels(source=source.config.name, method=method, result="ok").inc()
        return parsed

    def _knows_version(self, source: _Source) -> bool:
        with self._lock:
            return source.health.status_count > 0

    def _attribute_encoding(self, source: _Source) -> bool | None:
        with self._lock:
            return parse.attributes_base64_for(source.health.node_version)

    def _malformed(self, source: _Source, method: str, exc: parse.MalformedResponse) -> None:
        """A malformed answer is a fault of the source, recorded like an outage (backoff, the
        failure streak, `last_error` for the SyncSource row's degraded detail)."""
        self._failed(source, f"malformed: {exc}")
        RPC_REQUESTS.labels(source=source.config.name, method=method, result="malformed").inc()

    def _missing(self, source: _Source, height: int, error: str) -> None:
        with self._lock:
            # What an older /status said about its history is contradicted; the error names the
            # floor (or not), and the next /status tells again.
            source.health.earliest_height = lowest_available(error)
            known = source.health.missing_range
            if known is None:
                source.health.missing_range = (height, height, error[:500])
            else:
                source.health.missing_range = (min(known[0], height), max(known[1], height), error[:500])

    def _failed(self, source: _Source, error: str) -> None:
        now = self.clock()
        wall = self.wall()
        with self._lock:
            health = source.health
            if health.consecutive_failures == 0 or health.first_failure_wall is None:
                health.first_failure_wall = wall
            health.consecutive_failures += 1
            health.last_failure_at = now
            health.last_failure_wall = wall
            health.recent = (*health.recent, False)[-RECENT_WINDOW:]
            health.last_error = error[:500]
            health.next_retry_at = now + backoff_delay(
                health.consecutive_failures, base=SOURCE_BACKOFF_BASE, cap=SOURCE_BACKOFF_CAP, jitter=False
            )
        log.warning("rpc source %s failed: %s", source.config.name, error)

    def _succeeded(self, source: _Source, latency: float, *, served: bool = False) -> None:
        wall = self.wall()
        with self._lock:
            health = source.health
            if health.consecutive_failures:
                health.recovered_wall = wall
            health.consecutive_failures = 0
            health.first_failure_wall = None
            health.last_success_at = self.clock()
            health.last_success_wall = wall
            health.next_retry_at = 0.0
            health.last_latency = latency
            health.latency_avg = (
                latency
                if health.latency_avg is None
                else LATENCY_SMOOTHING * latency + (1 - LATENCY_SMOOTHING) * health.latency_avg
            )
            health.recent = (*health.recent, True)[-RECENT_WINDOW:]
            if served:
                self._last_source = source.config.name
