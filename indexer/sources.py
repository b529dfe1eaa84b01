"""Sync sources (seed 002): which connection status each RPC source should have, and its persisted
health.

The RPC client (`indexer.rpc.client.CometRpc`) keeps each source's health in memory while it works;
after every runner step `sources_observe` writes that health to the SyncSource rows in one
set-based UPDATE and derives the connection status:

    disconnected -> connecting -> connected            a source that answers and is caught up (not
                                                       catching up itself, not lagging) on two
                                                       /status checks in a row (the settle re-check)
    connected -> syncing -> connected                  the source the indexer catches up from, until
                                                       the indexer is caught up on two steps in a row
    syncing -> connected_degraded                      ... when a range it had to serve failed:
                                                       partial data (the only meaning of status 4)
    live -> disconnected                               the connection was lost (failing for a while)
    live -> disconnecting -> disconnected              intentional: disabled by an operator, or the
                                                       process stops
    disconnected | connecting -> refused               DNS, TLS or protocol error: kept off (and out of
                                                       the client) until an operator re-enables it

The status moves through `indexer.source_status` (`CONNECTION_MACHINE` steps through the
transition kernel, shortest legal path, not audited; the operator's clear and re-enable are).
Reasons (`degraded_reasons`, with `degraded_detail` saying why):

- historic_range_failed: the source could not serve a range the indexer asked for (pruned or
  missing blocks). Sticky: it holds until the source serves that range again (its earliest height
  drops to the range) or an operator clears it; this is the "degraded (partial data)" of seed 002
  and the only reason that makes the status connected_degraded.
- lagging_head: its head is more than `lag_blocks` behind the best source's head (the client ranks
  it last and does not trust it for the head or a reorg).
- error_rate: it is failing now, or a quarter of its recent requests failed.
- latency: its smoothed latency is over the threshold.
- flapping: it dropped to disconnected `FLAP_LOSSES` times within `FLAP_WINDOW`.
- forked: it served a block the trusted sources do not show (`indexer.forks`): ranked last, and not
  trusted, until its backoff ends.

The last five are health reasons: the status stays what the connection is, and the health
(`SyncSource.health`) reads `degraded` while one holds. Every connection attempt to a source that was
not connected is counted in `fleetops_indexer_source_connection_attempts_total{result}`.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction

from fleetops.lib import clock
from indexer.metrics import SOURCE_CONNECTION_ATTEMPTS
from indexer.models import CONNECTION_MACHINE, Chain, ConnectionStatus, DegradedReason, SyncSource
from indexer.rpc.client import (
    HEAD_FRESH_SECONDS,
    LAGGING_HEAD_BLOCKS,
    CometRpc,
    SourceConfig,
    SourceHealth,
    lowest_available,
)
from indexer.source_status import (
    DASH,
    RANGE_FRAGMENT,
    ordered_reasons,
    refusal,
    source_transition,
)
from indexer.watch import websocket_source

log = logging.getLogger(__name__)

S = ConnectionStatus
LIVE = frozenset({S.SYNCING, S.CONNECTED, S.CONNECTED_DEGRADED})
# Where a range failure leaves the status as it is: the states connected_degraded itself may move to
# and keep its reasons in (syncing, disconnecting), so the reason waits there and shows when the
# source settles (seed 002). `connected` is not one of them: it is connected_degraded's reason-free
# twin, and a failed range turns it connected_degraded (as every other state).
# `disconnected` is no such state either: a source that answered "not available" is connected.
KEEPS_STATUS_ON_RANGE_FAILURE = frozenset(CONNECTION_MACHINE.targets(S.CONNECTED_DEGRADED)) - {
    S.CONNECTED,
    S.DISCONNECTED,
}

ERROR_RATE_THRESHOLD = 0.25
ERROR_RATE_MIN_SAMPLES = 8
LATENCY_THRESHOLD_SECONDS = 2.0
SETTLE_CHECKS = 2  # caught up on this many checks in a row before connected
DISCONNECT_AFTER_FAILURES = 3  # with the 5 s doubling backoff: about 15 s of failures
DISCONNECT_AFTER_SECONDS = 60.0
FLAP_LOSSES = 3
FLAP_WINDOW = timedelta(minutes=10)

HEALTH_FIELDS = [
    "consecutive_failures",
    "first_failure_at",
    "last_failure_at",
    "last_success_at",
    "recovered_at",
    "next_retry_at",
    "rate_limited_until",
    "head_height",
    "latency_ms",
    "last_error",
    "degraded_reasons",
    "degraded_detail",
]
WS_DOWN_NOTE = "websocket down: head polled from /status"

_ABOVE_HEAD = re.compile(r"must be less than or equal to", re.I)
_BELOW_HISTORY = re.compile(r"is not available|lowest height is|not found|pruned", re.I)


# --- degraded reasons -----------------------------------------------------------------------------


def _why(error: str) -> str:
    lowest = lowest_available(error)
    if lowest is not None:
        return f"pruned below {lowest}"
    text = re.sub(r"[()\s;]+", " ", error).strip()
    return (text or "not served")[:200]


def _range_fragment(first: int, last: int, why: str) -> str:
    return f"blocks {first}{DASH}{last} unavailable ({why})"


def _historic_range(detail: str) -> tuple[int, int, str] | None:
    match = RANGE_FRAGMENT.search(detail or "")
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), match.group(3)


def _merged_range(detail: str, first: int, last: int, error: str) -> tuple[int, int, str]:
    # Catch-up asks batch after batch; consecutive failed batches read as one range.
    known = _historic_range(detail)
    why = _why(error)
    if known is not None:
        first, last = min(first, known[0]), max(last, known[1])
    return first, last, why


@dataclass
class _Verdict:
    status: int | None  # None: leave the status as it is
    reasons: list[str]
    detail: str
    lost: bool = False  # a live source dropped to disconnected (counts towards flapping)
    intentional: bool = False  # a disconnect on purpose (disabled): walks through disconnecting
    refused: str = ""  # why the source is refused (status refused)


# Losses per source id, for the flapping reason. In memory: only the lease-holding writer observes
# sources, and a restart forgetting a few minutes of history errs towards "not flapping".
_losses: dict[int, deque[datetime]] = {}
_losses_lock = threading.Lock()
# Sources whose range failure was reported directly (source_range_failed): the earliest height the
# client knows may predate the failure, so only a /status answered after the next observation may
# clear it. Source id -> the client's status_count at that observation (None until then).
_await_status: dict[int, int | None] = {}
# CometRpc objects whose failure streaks were already continued from the rows.
_adopted: weakref.WeakSet[CometRpc] = weakref.WeakSet()
# The settle re-check: source id -> (caught-up checks in a row, the /status answer last counted) for
# sources on their way to connected, and -> caught-up runner steps in a row for the syncing one.
_settling: dict[int, tuple[int, int]] = {}
_sync_settling: dict[int, int] = {}


def _status_since_failure(source_id: int, health: SourceHealth) -> bool:
    if source_id not in _await_status:
        return True
    seen = _await_status[source_id]
    if seen is None:
        _await_status[source_id] = health.status_count
        return False
    return health.status_count > seen


def _note_loss(source_id: int, at: datetime) -> None:
    with _losses_lock:
        _losses.setdefault(source_id, deque(maxlen=FLAP_LOSSES * 4)).append(at)


def _recent_losses(source_id: int, now: datetime) -> int:
    with _losses_lock:
        return sum(1 for at in _losses.get(source_id, ()) if now - at <= FLAP_WINDOW)


def _judge(
    row: SyncSource,
    health: SourceHealth | None,
    *,
    now: datetime,
    mono: float,
    range_failure: tuple[int, int, str] | None,
    best_head: int | None,
    lag_blocks: int,
    latency_threshold: float,
    error_rate_threshold: float,
    ws_down: bool,
) -> _Verdict:
    fragments: dict[str, str] = {}
    historic = (
        _historic_range(row.degraded_detail)
        if DegradedReason.HISTORIC_RANGE_FAILED in (row.degraded_reasons or [])
        else None
    )
    if historic is None and DegradedReason.HISTORIC_RANGE_FAILED in (row.degraded_reasons or []):
        historic = (0, 0, "")  # set by hand or by an older writer: keep the reason, no range known
    if range_failure is not None:
        first, last, error = range_failure
        historic = _merged_range(row.degraded_detail, first, last, error)
    elif (
        historic is not None
        and health is not None
        and _status_since_failure(row.pk, health)
        and health.earliest_height is not None
        and historic[1] > 0
        and health.earliest_height <= historic[0]
    ):
        log.info("source %s: serves blocks %s-%s again", row.name, historic[0], historic[1])
        historic = None  # the range is there again
        _await_status.pop(row.pk, None)
    if historic is not None:
        fragments[DegradedReason.HISTORIC_RANGE_FAILED] = (
            _range_fragment(*historic) if historic[1] else "historic range failed"
        )

    flaps = _recent_losses(row.pk, now)

    current = row.connection_status

    def verdict(
        status: int | None, lost: bool = False, intentional: bool = False, refused: str = ""
    ) -> _Verdict:
        losses = flaps + (1 if lost else 0)
        if losses >= FLAP_LOSSES:
            fragments[DegradedReason.FLAPPING] = f"dropped {losses} times in {FLAP_WINDOW.seconds // 60} min"
        reasons = ordered_reasons(fragments)
        parts = [fragments[r] for r in reasons]
        if ws_down:
            parts.append(WS_DOWN_NOTE)
        effective = current if status is None else status
        # Status 4 is partial data only; every other reason shows in the health.
        partial = DegradedReason.HISTORIC_RANGE_FAILED in reasons
        if effective == S.CONNECTED and partial:
            effective = S.CONNECTED_DEGRADED
        elif effective == S.CONNECTED_DEGRADED and not partial:
            effective = S.CONNECTED
        return _Verdict(effective, reasons, "; ".join(parts), lost, intentional, refused)

    if current == S.REFUSED:
        _settling.pop(row.pk, None)
        return verdict(None)  # only an operator takes it out of refused (source_reenable)
    if health is None:  # disabled, or not among the client's sources: nobody is connected to it
        _settling.pop(row.pk, None)
        return verdict(S.DISCONNECTED, intentional=True)
    if not health.active:
        # This client has not heard from it yet: nothing new is known, the row stays as it is.
        return _Verdict(None, list(row.degraded_reasons or []), row.degraded_detail)
    if health.consecutive_failures:
        _settling.pop(row.pk, None)
        refused = refusal(health.last_error) if current not in LIVE else None
        if refused is not None:
            return verdict(S.REFUSED, refused=refused)
        since = health.first_failure_wall or now
        if (
            current == S.CONNECTING
            or health.consecutive_failures >= DISCONNECT_AFTER_FAILURES
            or (now - since).total_seconds() >= DISCONNECT_AFTER_SECONDS
        ):
            lost = current in LIVE
            return verdict(S.DISCONNECTED, lost)  # the connection was lost: no disconnecting
        fragments[DegradedReason.ERROR_RATE] = (
            f"failing ({health.consecutive_failures} in a row): {health.last_error}"[:300]
        )
        return verdict(None)  # still down (not live), or live and failing: a health reason

    # It answers.
    if len(health.recent) >= ERROR_RATE_MIN_SAMPLES and health.error_rate >= error_rate_threshold:
        fragments[DegradedReason.ERROR_RATE] = (
            f"{health.error_rate:.0%} of the last {len(health.recent)} requests failed"
        )
    if health.latency_avg is not None and health.latency_avg > latency_threshold:
        fragments[DegradedReason.LATENCY] = (
            f"latency {health.latency_avg * 1000:.0f} ms (over {latency_threshold * 1000:.0f} ms)"
        )
    head_fresh = health.status_at is not None and mono - health.status_at <= HEAD_FRESH_SECONDS
    lagging = False
    if head_fresh and health.head_height is not None and best_head is not None:
        behind = best_head - health.head_height
        if behind > lag_blocks:
            lagging = True
            fragments[DegradedReason.LAGGING_HEAD] = (
                f"head {health.head_height} is {behind} blocks behind {best_head}"
            )
    if health.forked_until > mono:
        fragments[DegradedReason.FORKED] = health.forked_detail or "showed a fork"
    if current in LIVE:
        return verdict(None)
    # Disconnected or connecting: connected only once caught up on SETTLE_CHECKS /status answers in
    # a row (not catching up itself, not lagging); connecting meanwhile.
    checks, seen = _settling.get(row.pk, (0, 0))
    if head_fresh and not health.catching_up and not lagging:
        if health.status_count > seen:
            checks, seen = checks + 1, health.status_count
    else:
        checks, seen = 0, health.status_count
    if checks >= SETTLE_CHECKS:
        _settling.pop(row.pk, None)
        return verdict(S.CONNECTED)
    _settling[row.pk] = (checks, seen)
    return verdict(S.CONNECTING)


def _wall_after(mono_at: float, mono_now: float, now: datetime) -> datetime | None:
    if mono_at <= mono_now:
        return None
    return now + timedelta(seconds=mono_at - mono_now)


def _apply_health(row: SyncSource, health: SourceHealth, *, now: datetime, mono: float) -> None:
    if health.consecutive_failures == 0 and row.consecutive_failures and health.recovered_wall is None:
        # The failure streak a previous process left on the row ended with this client's first
        # answer: that answer is the recovery.
        row.recovered_at = health.last_success_wall
    row.consecutive_failures = health.consecutive_failures
    row.first_failure_at = health.first_failure_wall if health.consecutive_failures else None
    row.last_failure_at = health.last_failure_wall or row.last_failure_at
    row.last_success_at = health.last_success_wall or row.last_success_at
    row.recovered_at = health.recovered_wall or row.recovered_at
    row.next_retry_at = _wall_after(health.next_retry_at, mono, now)
    row.rate_limited_until = _wall_after(health.rate_limited_until, mono, now)
    if health.head_height is not None:
        row.head_height = health.head_height
    if health.latency_avg is not None:
        row.latency_ms = round(health.latency_avg * 1000, 3)
    row.last_error = health.last_error


def _adopt_streaks(rpc: CometRpc, rows: Iterable[SyncSource]) -> None:
    if rpc in _adopted:
        return
    names = set(rpc.source_names)
    for row in rows:
        if row.name in names and row.consecutive_failures:
            rpc.adopt_streak(
                row.name, consecutive_failures=row.consecutive_failures, first_failure_at=row.first_failure_at
            )
    _adopted.add(rpc)


def _walk(row: SyncSource, verdict: _Verdict) -> None:
    status = row.connection_status if verdict.status is None else verdict.status
    if verdict.lost and status == S.DISCONNECTED and row.connection_status != S.DISCONNECTED:
        _note_loss(row.pk, clock.now())
    if status != row.connection_status:
        updates = {"refused_reason": verdict.refused} if status == S.REFUSED else None
        if status == S.REFUSED:
            log.error("source %s refused: %s", row.name, verdict.refused)
        source_transition(
            source=row,
            to=status,
            reasons=verdict.reasons,
            detail=verdict.detail,
            intentional=verdict.intentional,
            updates=updates,
        )


def _attempt(
    chain: Chain,
    row: SyncSource,
    before: int,
    failures_before: int,
    verdict: _Verdict,
    health: SourceHealth | None,
) -> None:
    """Count a connection attempt to a source that was not connected (disconnected or connecting):
    success when it answered, failure when a new request failed, refused when it was refused."""
    if health is None or not health.active or before not in (S.DISCONNECTED, S.CONNECTING):
        return
    result = None
    if verdict.status == S.REFUSED:
        result = "refused"
    elif health.consecutive_failures > failures_before or (
        health.consecutive_failures and before == S.CONNECTING
    ):
        result = "failure"
    elif before == S.DISCONNECTED and verdict.status in (S.CONNECTING, S.CONNECTED):
        result = "success"
    if result is not None:
        SOURCE_CONNECTION_ATTEMPTS.labels(chain=chain.slug, source=row.name, result=result).inc()


def usable_configs(rows: Iterable[SyncSource]) -> list[SourceConfig]:
    """The client's sources: enabled and not refused, preferred first."""
    usable = [r for r in rows if r.enabled and r.connection_status != S.REFUSED]
    usable.sort(key=lambda r: (r.priority, r.name))
    return [SourceConfig(r.name, r.rpc_url, r.priority) for r in usable]


# --- what the runner calls ------------------------------------------------------------------------


def sources_ensure_rows(*, chain: Chain, rpc: CometRpc | None = None) -> list[SyncSource]:
    """At process start: disabled sources left in a live status go to disconnected (through
    disconnecting), and failure streaks on the rows are continued in `rpc` (so a restart does not
    reset the backoff or the 24 h to dead). Returns the chain's sources."""
    rows = list(chain.sources.all())
    for row in rows:
        if not row.enabled and row.connection_status not in (S.DISCONNECTED, S.REFUSED):
            source_transition(
                source=row,
                to=S.DISCONNECTED,
                reasons=row.degraded_reasons,
                detail=row.degraded_detail,
                intentional=True,
            )
    if rpc is not None:
        _adopt_streaks(rpc, rows)
    return rows


def sources_observe(
    *,
    chain: Chain,
    rpc: CometRpc,
    ws_connected: bool | None,
    ws_source: str | None = None,
    ws_head: int | None = None,
    probe: bool = True,
    lag_blocks: int = LAGGING_HEAD_BLOCKS,
    latency_threshold: float = LATENCY_THRESHOLD_SECONDS,
    error_rate_threshold: float = ERROR_RATE_THRESHOLD,
) -> list[SyncSource]:
    """Persist `rpc`'s in-memory health to the chain's SyncSource rows and move their statuses.

    Call after every runner step, outside any transaction (with `probe`, each source not backed off
    gets one `/status` at most every PROBE_INTERVAL seconds, which is how standby sources are seen
    to come and go, and how their heads are compared). `ws_connected` is the head watcher's socket
    state (None: no watcher); when False the WebSocket source (`ws_source`, default the one
    `indexer.watch` picks) notes that heads are polled. `ws_head` joins the best head.

    One SELECT ... FOR UPDATE and one bulk UPDATE per call; status changes (rare) add a
    compare-and-set each. The row lock keeps an operator's clear from being overwritten."""
    if probe:
        rpc.probe_heads()
    healths = rpc.health()
    range_failures = rpc.take_range_failures()
    mono = rpc.clock()
    heads = list(rpc.fresh_heads().values())
    if ws_head is not None and ws_connected:
        heads.append(ws_head)
    best_head = max(heads) if heads else None
    with transaction.atomic():
        rows = list(chain.sources.select_for_update().order_by("pk"))
        _adopt_streaks(rpc, rows)
        if ws_source is None:
            listened = websocket_source(rows)
            ws_source = listened.name if listened is not None else None
        now = clock.now()
        verdicts: list[tuple[SyncSource, _Verdict]] = []
        attempts: list[tuple[SyncSource, int, int, SourceHealth | None]] = []
        for row in rows:
            health = healths.get(row.name) if row.enabled else None
            attempts.append((row, row.connection_status, row.consecutive_failures, health))
            if health is not None and (health.active or health.rate_limited_until > 0):
                _apply_health(row, health, now=now, mono=mono)
            verdict = _judge(
                row,
                health,
                now=now,
                mono=mono,
                range_failure=range_failures.get(row.name) if row.enabled else None,
                best_head=best_head,
                lag_blocks=lag_blocks,
                latency_threshold=latency_threshold,
                error_rate_threshold=error_rate_threshold,
                ws_down=ws_connected is False and row.name == ws_source,
            )
            row.degraded_reasons, row.degraded_detail = verdict.reasons, verdict.detail[:2000]
            verdicts.append((row, verdict))
        SyncSource.objects.bulk_update(rows, HEALTH_FIELDS)
        for (row, verdict), (_, before, failures_before, health) in zip(verdicts, attempts, strict=True):
            _attempt(chain, row, before, failures_before, verdict, health)
            _walk(row, verdict)
    return rows


def source_range_failed(
    *, chain: Chain, source_name: str, first: int, last: int, error: str
) -> SyncSource | None:
    """`source_name` could not serve blocks first..last (pruned or missing): it is
    connected_degraded with reason historic_range_failed and a detail such as
    "blocks 1\u2013199 unavailable (pruned below 200)". A source that is syncing keeps syncing and turns
    connected_degraded when the catch-up ends (seed 002: the failure shows when its sync completes).
    `sources_observe` does the same for the ranges the client recorded, so the runner needs this only
    for failures it learns of itself (HeightUnavailable.sources)."""
    if _ABOVE_HEAD.search(error) and not _BELOW_HISTORY.search(error):
        # "must be less than or equal to the current blockchain height": not there yet, which is
        # no gap in the source's history.
        return None
    with transaction.atomic():
        row = chain.sources.select_for_update().filter(name=source_name).first()
        if row is None or row.connection_status == S.REFUSED:
            return None
        merged = _merged_range(row.degraded_detail, first, last, error)
        reasons = [*(row.degraded_reasons or []), DegradedReason.HISTORIC_RANGE_FAILED]
        kept = [p for p in (row.degraded_detail or "").split("; ") if p and not RANGE_FRAGMENT.search(p)]
        detail = "; ".join([_range_fragment(*merged), *kept])
        status = row.connection_status
        to = status if status in KEEPS_STATUS_ON_RANGE_FAILURE else S.CONNECTED_DEGRADED
        log.warning("source %s/%s: %s", chain.slug, source_name, _range_fragment(*merged))
        _await_status[row.pk] = None
        source_transition(source=row, to=to, reasons=reasons, detail=detail)
        return row


def _best(rows: list[SyncSource], source_name: str | None) -> SyncSource | None:
    if source_name is not None:
        return next((r for r in rows if r.name == source_name), None)
    live = [r for r in rows if r.connection_status in LIVE | {S.CONNECTING}]
    live.sort(key=lambda r: (r.consecutive_failures > 0, r.priority, r.name))
    return live[0] if live else None


def sources_mark_syncing(
    *, chain: Chain, catching_up: bool, source_name: str | None = None
) -> SyncSource | None:
    """While the indexer catches up, the source it catches up from is `syncing`; once caught up (or
    when another source takes over) it is connected, or connected_degraded if a reason holds (such as
    a range it failed to serve). `source_name` is that source (CometRpc.last_source); without it the
    preferred live source is taken. Cheap to call every step: it writes only on a change. Returns
    the syncing source, if any."""
    with transaction.atomic():
        rows = list(chain.sources.select_for_update().filter(enabled=True).order_by("pk"))
        best = _best(rows, source_name) if catching_up else None
        if best is not None and best.connection_status in (S.DISCONNECTING, S.REFUSED):
            best = None
        for row in rows:
            if row is best:
                _sync_settling.pop(row.pk, None)
                if row.connection_status != S.SYNCING:
                    source_transition(
                        source=row, to=S.SYNCING, reasons=row.degraded_reasons, detail=row.degraded_detail
                    )
            elif row.connection_status == S.SYNCING:
                if not catching_up and _sync_settling.get(row.pk, 0) + 1 < SETTLE_CHECKS:
                    # The settle re-check: caught up once is not yet caught up.
                    _sync_settling[row.pk] = _sync_settling.get(row.pk, 0) + 1
                    continue
                _sync_settling.pop(row.pk, None)
                partial = DegradedReason.HISTORIC_RANGE_FAILED in (row.degraded_reasons or [])
                to = S.CONNECTED_DEGRADED if partial else S.CONNECTED
                source_transition(source=row, to=to, reasons=row.degraded_reasons, detail=row.degraded_detail)
        if best is not None and best.connection_status == S.SYNCING:
            return best
        return next((r for r in rows if r.connection_status == S.SYNCING), None)


def sources_release(*, chain: Chain) -> int:
    """The process stops: every source it was connected to goes disconnecting -> disconnected (an
    intentional disconnect; a refused source stays refused). Reasons stay (a pruned source is still
    pruned). Returns how many moved."""
    moved = 0
    rows = list(chain.sources.exclude(connection_status__in=(S.DISCONNECTED, S.REFUSED)))
    for row in rows:
        _settling.pop(row.pk, None)
        _sync_settling.pop(row.pk, None)
        moved += source_transition(
            source=row,
            to=S.DISCONNECTED,
            reasons=row.degraded_reasons,
            detail=row.degraded_detail,
            intentional=True,
        )
    return moved
