"""The backfill engine and the history migration (`manage.py protocol_migrate history`).

1. Validate, changing nothing on error: every id has a classifier and a row, is classified
   `success`, and all are on one chain the indexer has started; ids already `success` are skipped.
   Then take a session advisory lock per protocol (a second run is refused; a killed run's lock dies
   with its connection), check the actor may take the start edge (audited refusal), and in one
   transaction create the cursor at oldest - 1 unless it exists (a re-run resumes at cursor + 1)
   and move the status to `in_progress` (`status.migration_start`).
2. Process to the tip, window by window: read the stored events of [low, min(low + window - 1,
   latest)] once, and per protocol commit ONE transaction: `CAS(cursor: start - 1 -> end)`, check
   the block at `end` is still the one we read (a rollback in between would leave stale rows), then
   write the rows in bulk and extend the writer span. A lost CAS means live ingestion took over:
   that protocol is handed off.
3. Tip flush: a window never extends past the indexed height, so at the tip every window is
   committed before we wait for the next block. The cursor then sits at the tip, live ingestion's
   CAS(tip -> tip + 1) matches, and our next CAS loses: the handoff happens by itself. If live
   ingestion is down we keep winning and keep going, which is the right degraded behaviour.
4. Complete: a handed-off protocol becomes `success` once its cursor is at or past the last height
   we attempted. On an error the handed-off ones are `success`, the rest `failed` (logged, audited).
   Every status change goes through `migrations_app.protocols.status` (the transition kernel); a
   lost compare-and-set there means somebody else settled the protocol: not ours to report.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import connection, transaction

from fleetops.audit.actors import Actor
from fleetops.lib import clock
from fleetops.lib.errors import Conflict, DomainError, RaceLost, ValidationFailed
from fleetops.observability.heartbeats import heartbeat_beat
from indexer import selectors as indexer_selectors
from indexer.selectors import ChainModel as Chain
from migrations_app.models import MigrationStatus, Protocol, Writer
from migrations_app.protocols import registry, status, store
from migrations_app.protocols.cursor import CasResult, cursor_cas, cursor_create, cursor_get
from migrations_app.protocols.metrics import HANDOFFS, HEIGHTS, STATE_CHANGES, WINDOW_RETRIES, WINDOW_SECONDS
from migrations_app.protocols.progress import Progress
from migrations_app.protocols.registry import ProtocolSpec
from migrations_app.protocols.status import HISTORY_KIND, MigrationKind
from migrations_app.protocols.store import Row

log = logging.getLogger(__name__)

DEFAULT_WINDOW_SIZE = 100
MAX_WINDOW_SIZE = 100_000
NO_PROTOCOLS = "give at least one --protocol-id"
UNKNOWN_PROTOCOL = "unknown protocol {id}: no classifier is registered under that id (known: {known})"
NOT_SET_UP = "protocol {id} is not set up: run `manage.py protocol_setup --protocol-id {id}` first"
NOT_CLASSIFIED = (
    "protocol {id} is not classified (classification status: {status}); "
    "run `manage.py protocol_setup --protocol-id {id}` first"
)
MIXED_CHAINS = "protocols {ids} are on different chains; migrate each chain's protocols separately"
INDEXER_NOT_STARTED = (
    "the indexer has not started on chain {chain}: nothing is indexed yet, so there is no oldest height "
    "to migrate from; start `manage.py indexer_run --chain {chain}` first"
)
WINDOW_SIZE_INVALID = "window size must be between 1 and {max}"
ALREADY_RUNNING = "a {migration} migration of {id} is already running (another process holds its lock)"
CURSOR_MISSING = "the cursor {name} disappeared during the migration"
INTERRUPTED = "interrupted; a re-run resumes at cursor + 1"
NOTHING_TO_DO = "nothing to do: {ids} already migrated"
STATUS_MOVED = "the {field} of {id} was changed by another process; nothing was started"


class MigrationInterrupted(DomainError):
    code = "interrupted"


class _Reorged(Exception):
    """The block at the window's end changed under us: throw the window away and read it again."""


# --- the engine ------------------------------------------------------------------------------------------


@dataclass
class Tracker:
    protocol: Protocol
    spec: ProtocolSpec
    cursor: int
    start_cursor: int
    handed_off: bool = False
    done: bool = False
    # The status CAS at the end lost (somebody else moved the status): not ours to report any more.
    lost: bool = False
    last_attempted: int | None = None
    heights: int = 0
    rows: int = 0


@dataclass(frozen=True)
class Strategy:
    kind: MigrationKind  # the status machine, error column and audit names
    writer: str
    cursor_name: Callable[[Protocol], str]
    persist: Callable[[Tracker, int, Sequence[Row], int, int], None]
    handed_off_fields: Callable[[Tracker], dict[str, Any]]

    @property
    def migration(self) -> str:  # "history" | "current_state"
        return self.kind.name

    @property
    def status_field(self) -> str:
        return self.kind.status_field


@dataclass
class RunResult:
    migration: str
    handed_off: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    heights: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    handoff_heights: dict[str, int] = field(default_factory=dict)


def validate_protocols(
    protocol_ids: Sequence[str], *, kind: MigrationKind
) -> tuple[Chain, list[Protocol], list[str]]:
    """(chain, protocols to run, ids skipped as already done); raises ValidationFailed, writes nothing."""
    ids = list(dict.fromkeys(i.strip() for i in protocol_ids if i.strip()))
    if not ids:
        raise ValidationFailed(NO_PROTOCOLS)
    known = ", ".join(s.id for s in registry.all_specs())
    for pid in ids:
        if registry.get(pid) is None:
            raise ValidationFailed(
                UNKNOWN_PROTOCOL.format(id=pid, known=known), fields={"protocol_id": [pid]}
            )
    rows = {p.id: p for p in Protocol.objects.select_related("chain", "chain__org").filter(id__in=ids)}
    for pid in ids:
        if pid not in rows:
            raise ValidationFailed(NOT_SET_UP.format(id=pid), fields={"protocol_id": [pid]})
        classified = rows[pid].classification_status
        if classified != MigrationStatus.SUCCESS:
            raise ValidationFailed(
                NOT_CLASSIFIED.format(id=pid, status=classified), fields={"protocol_id": [pid]}
            )
    chains = {rows[pid].chain_id for pid in ids}
    if len(chains) > 1:
        raise ValidationFailed(MIXED_CHAINS.format(ids=", ".join(ids)))
    chain = rows[ids[0]].chain
    indexed = indexer_selectors.indexed_range(chain_id=chain.pk)
    if indexed is None or indexed[0] is None or indexed[1] is None:
        raise ValidationFailed(INDEXER_NOT_STARTED.format(chain=chain.slug))
    # Done for good: the migration's terminal state (a re-run skips it).
    skipped = [pid for pid in ids if kind.machine.is_terminal(getattr(rows[pid], kind.status_field))]
    return chain, [rows[pid] for pid in ids if pid not in skipped], skipped


def _lock_key(migration: str, protocol_id: str) -> str:
    return f"fleetops.protocol_migration:{migration}:{protocol_id}"


def try_lock(migration: str, protocol_id: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(hashtext(%s))", [_lock_key(migration, protocol_id)])
        row = cursor.fetchone()
    return bool(row and row[0])


def unlock(migration: str, protocol_id: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_unlock(hashtext(%s))", [_lock_key(migration, protocol_id)])


def latest_indexed(chain: Chain) -> int | None:
    indexed = indexer_selectors.indexed_range(chain_id=chain.pk)
    return None if indexed is None else indexed[1]


def start_trackers(
    *,
    strategy: Strategy,
    protocols: Sequence[Protocol],
    cursor_at: int,
    actor: Actor,
    updates: Mapping[str, Any],
    metadata: Mapping[str, Any],
) -> list[Tracker]:
    """Check the actor may start (or resume) the migration of every protocol (audited refusal,
    before the transaction so the denial row commits), then in ONE transaction create each cursor
    at `cursor_at` unless it exists and move each status to in_progress. A status moved since the
    validation (e.g. completed by another process) raises `RaceLost` and rolls back every cursor."""
    status.migration_authorize(protocols=protocols, kind=strategy.kind, actor=actor)
    trackers: list[Tracker] = []
    with transaction.atomic():
        for p in protocols:
            name = strategy.cursor_name(p)
            created = cursor_create(name=name, height=cursor_at)
            cursor = cursor_get(name)
            assert cursor is not None
            try:
                status.migration_start(
                    protocol=p,
                    kind=strategy.kind,
                    actor=actor,
                    updates=updates,
                    metadata={"cursor": cursor, "resumed": not created, **metadata},
                )
            except RaceLost as exc:
                raise RaceLost(STATUS_MOVED.format(field=strategy.status_field, id=p.id)) from exc
            spec = registry.get(p.id)
            assert spec is not None
            trackers.append(Tracker(protocol=p, spec=spec, cursor=cursor, start_cursor=cursor))
    return trackers


class MigrationRun:
    """Runs one strategy for some protocols of one chain to the handoff."""

    def __init__(
        self,
        *,
        strategy: Strategy,
        chain: Chain,
        trackers: list[Tracker],
        window_size: int,
        actor: Actor,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
        poll_seconds: float = 1.0,
    ) -> None:
        self.strategy, self.chain, self.trackers = strategy, chain, trackers
        self.window_size, self.actor, self.progress = window_size, actor, progress
        self.stop = stop or threading.Event()
        self.poll_seconds = poll_seconds
        self.types = frozenset().union(*(t.spec.event_types for t in trackers))
        self.last_beat = 0.0

    def run(self) -> list[Tracker]:
        try:
            while True:
                if self.stop.is_set():
                    raise MigrationInterrupted(INTERRUPTED)
                active = [t for t in self.trackers if not t.handed_off]
                for t in self.trackers:
                    if t.handed_off and not t.done and not t.lost:
                        self._complete(t)
                if not active:
                    if all(t.done or t.lost for t in self.trackers):
                        break
                    self.stop.wait(self.poll_seconds)  # handed off; wait for live to pass our last window
                    continue
                latest = latest_indexed(self.chain)
                low = min(t.cursor for t in active) + 1
                if latest is None or low > latest:
                    self._beat(latest, waiting=True)
                    self._wait_for_block(latest)
                    continue
                high = min(low + self.window_size - 1, latest)
                self._window(active, low, high, latest)
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            if self.progress:
                self.progress.close()
        return self.trackers

    # 2. one window: read once, one transaction per protocol
    def _window(self, active: list[Tracker], low: int, high: int, latest: int) -> None:
        started = time.monotonic()
        expected_hash = store.block_hash(chain_id=self.chain.pk, height=high)
        if expected_hash is None:
            WINDOW_RETRIES.inc()  # rolled back since we read the indexed height
            return
        events = store.read_events(chain_id=self.chain.pk, types=self.types, low=low, high=high)
        for t in active:
            start = t.cursor + 1
            if start > high:
                continue
            rows = [r for r in store.classify_events(t.spec, events) if r.height >= start]
            t.last_attempted = high
            name = self.strategy.cursor_name(t.protocol)
            try:
                with transaction.atomic():
                    with connection.cursor() as cursor:
                        # Safe: a lost commit loses cursor and rows together, and they are re-derivable.
                        cursor.execute("SET LOCAL synchronous_commit = off")
                    result = cursor_cas(name=name, expected=t.cursor, new=high, writer=self.strategy.writer)
                    if result is CasResult.MISSING:
                        raise Conflict(CURSOR_MISSING.format(name=name))
                    if result is CasResult.SWAPPED:
                        if store.block_hash(chain_id=self.chain.pk, height=high) != expected_hash:
                            raise _Reorged
                        self.strategy.persist(t, self.chain.pk, rows, start, high)
            except _Reorged:
                WINDOW_RETRIES.inc()
                log.info(
                    "window rolled back under the migration; re-reading", extra={"low": low, "high": high}
                )
                return
            if result is CasResult.LOST:
                t.handed_off = True
                HANDOFFS.labels(protocol=t.protocol.id, migration=self.strategy.migration).inc()
                log.info(
                    "handed off to live ingestion",
                    extra={
                        "protocol": t.protocol.id,
                        "migration": self.strategy.migration,
                        "cursor": t.cursor,
                    },
                )
                continue
            HEIGHTS.inc(high - start + 1)
            t.heights += high - start + 1
            t.rows += len(rows)
            t.cursor = high
        WINDOW_SECONDS.observe(time.monotonic() - started)
        self._beat(latest)
        if self.progress:
            first = min(t.start_cursor for t in self.trackers)
            done = min((t.cursor for t in self.trackers if not t.handed_off), default=latest)
            ids = ",".join(t.protocol.id for t in self.trackers)
            self.progress.update(
                label=f"{self.strategy.migration} {ids}", done=done - first, total=latest - first
            )

    def _wait_for_block(self, latest: int | None) -> None:
        while not self.stop.is_set():
            if latest_indexed(self.chain) != latest:
                return
            if any(
                cursor_get(self.strategy.cursor_name(t.protocol)) != t.cursor
                for t in self.trackers
                if not t.handed_off
            ):
                return  # live moved (or a rollback rewound) our cursor: the next CAS settles it
            self.stop.wait(self.poll_seconds)

    def _beat(self, latest: int | None, *, waiting: bool = False) -> None:
        now = time.monotonic()
        if now - self.last_beat < 5:
            return
        self.last_beat = now
        heartbeat_beat(
            name=f"protocols.{self.strategy.migration}",
            details={
                "protocols": {t.protocol.id: t.cursor for t in self.trackers},
                "latest": latest,
                "waiting_for_block": waiting,
            },
        )

    # 4. complete / fail
    def _complete(self, t: Tracker) -> None:
        current = cursor_get(self.strategy.cursor_name(t.protocol))
        if current is None or t.last_attempted is None or current < t.last_attempted:
            return  # live has not yet passed the heights we tried (e.g. it is re-indexing a rollback)
        t.done = self._settle(
            t,
            status.migration_complete,
            updates=self.strategy.handed_off_fields(t),
            metadata={
                "start_cursor": t.start_cursor,
                "handoff_height": t.cursor + 1,
                "heights_written": t.heights,
                "rows_written": t.rows,
            },
        )

    def _settle(self, t: Tracker, step: Callable[..., Any], **kwargs: Any) -> bool:
        """Take an outcome edge (`status.migration_complete` or `_fail`). A lost compare-and-set
        (counted by the kernel) means somebody else moved the status: not ours to report."""
        try:
            step(protocol=t.protocol, kind=self.strategy.kind, actor=self.actor, **kwargs)
        except RaceLost:
            log.warning(
                "protocol status moved under the migration",
                extra={"protocol": t.protocol.id, "migration": self.strategy.migration},
            )
            t.lost = True
            return False
        return True

    def _fail(self, exc: BaseException) -> None:
        message = exc.message if isinstance(exc, DomainError) else f"{type(exc).__name__}: {exc}"
        for t in self.trackers:
            try:
                if t.done or t.lost:
                    continue
                if t.handed_off:  # handed off is success, whatever the cursor says now
                    t.done = self._settle(
                        t, status.migration_complete, updates=self.strategy.handed_off_fields(t)
                    )
                    continue
                self._settle(t, status.migration_fail, error=message, metadata={"cursor": t.cursor})
            except Exception:
                log.exception("could not record the migration outcome", extra={"protocol": t.protocol.id})
        log.error(
            "protocol migration failed",
            extra={"migration": self.strategy.migration, "error": message[:500]},
        )


# --- history ---------------------------------------------------------------------------------------------


def _persist_history(t: Tracker, chain_id: int, rows: Sequence[Row], start: int, end: int) -> None:
    store.copy_state_changes(protocol_id=t.protocol.id, chain_id=chain_id, rows=rows)
    store.span_extend(protocol_id=t.protocol.id, writer=Writer.HISTORY, from_height=start, to_height=end)
    store.note_contracts(protocol_id=t.protocol.id, rows=rows)
    STATE_CHANGES.labels(writer="history").inc(len(rows))


HISTORY = Strategy(
    kind=HISTORY_KIND,
    writer="history",
    cursor_name=lambda p: p.history_cursor_name,
    persist=_persist_history,
    handed_off_fields=lambda t: {
        "history_handed_off_at": clock.now(),
        "history_handoff_height": t.cursor + 1,
    },
)


def check_window_size(window_size: int) -> None:
    if not 1 <= window_size <= MAX_WINDOW_SIZE:
        raise ValidationFailed(
            WINDOW_SIZE_INVALID.format(max=MAX_WINDOW_SIZE), fields={"window_size": [window_size]}
        )


def history_validate(
    *, protocol_ids: Sequence[str], window_size: int = DEFAULT_WINDOW_SIZE
) -> tuple[Chain, list[Protocol], list[str]]:
    check_window_size(window_size)
    return validate_protocols(protocol_ids, kind=HISTORY_KIND)


def history_migrate(
    *,
    protocol_ids: Sequence[str],
    actor: Actor,
    window_size: int = DEFAULT_WINDOW_SIZE,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    poll_seconds: float = 1.0,
) -> RunResult:
    """Backfill the protocols' state changes from the oldest indexed height until live ingestion has
    taken each of them over. Blocks until then (or until `stop` is set)."""
    chain, protocols, skipped = history_validate(protocol_ids=protocol_ids, window_size=window_size)
    result = RunResult(migration="history", skipped=skipped)
    if not protocols:
        return result
    locked: list[str] = []
    try:
        for p in protocols:
            if not try_lock("history", p.id):
                raise Conflict(ALREADY_RUNNING.format(migration="history", id=p.id))
            locked.append(p.id)
        trackers = _start(chain=chain, protocols=protocols, actor=actor)
        run = MigrationRun(
            strategy=HISTORY,
            chain=chain,
            trackers=trackers,
            window_size=window_size,
            actor=actor,
            progress=progress,
            stop=stop,
            poll_seconds=poll_seconds,
        )
        try:
            run.run()
        finally:
            _summarize(result, trackers)
    finally:
        for pid in locked:
            unlock("history", pid)
    return result


def _start(*, chain: Chain, protocols: list[Protocol], actor: Actor) -> list[Tracker]:
    indexed = indexer_selectors.indexed_range(chain_id=chain.pk)
    oldest = None if indexed is None else indexed[0]
    assert oldest is not None  # validated
    return start_trackers(
        strategy=HISTORY,
        protocols=protocols,
        cursor_at=oldest - 1,
        actor=actor,
        updates={"history_started_at": clock.now()},
        metadata={"oldest_indexed_height": oldest},
    )


def _summarize(result: RunResult, trackers: list[Tracker]) -> None:
    for t in trackers:
        (result.handed_off if t.done else result.failed).append(t.protocol.id)
        result.heights[t.protocol.id] = t.heights
        result.rows[t.protocol.id] = t.rows
        if t.handed_off:
            result.handoff_heights[t.protocol.id] = t.cursor + 1
