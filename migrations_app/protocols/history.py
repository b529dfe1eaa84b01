"""The backfill engine and the history migration (`manage.py protocol_migrate history`).

1. Validate, changing nothing on error: every id has a classifier and a row on the chain (a protocol
   is identified by (chain, protocol id); `--chain` may be left out while the ids are registered on
   one chain only), is classified `success`, and the indexer has started on that chain; ids already
   `success` are skipped.
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

Parallel windows (`workers` > 1, history only; `migrations_app.protocols.parallel`): up to `workers`
threads, each with its own database connection, read consecutive windows at the same time and have
them classified by a pool of `workers` processes (pure functions over the events; the processes
never touch the database); each thread then waits for its turn and commits its window itself,
exactly as above (one transaction per protocol: CAS, block check, rows). One worker classifies in
process, with no pool.
A window that is ready early waits until every window before it is committed, so the cursor only
ever advances in order and each CAS expects the end of the window before; a lost CAS, a rollback
under a window or an error stops the round: windows read but not committed are thrown away (they
changed nothing) and the next round starts again from the cursors. A round covers the windows up to
the indexed height seen when it started, so the tip flush holds as before.
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
from fleetops.observability.heartbeats import heartbeat_beat, heartbeat_finish
from indexer import selectors as indexer_selectors
from indexer.selectors import ChainModel as Chain
from migrations_app.models import MigrationStatus, Protocol, Writer
from migrations_app.protocols import registry, status, store
from migrations_app.protocols.cursor import CasResult, cursor_cas, cursor_create, cursor_get
from migrations_app.protocols.metrics import HANDOFFS, HEIGHTS, STATE_CHANGES, WINDOW_RETRIES, WINDOW_SECONDS
from migrations_app.protocols.parallel import ClassifyPool, Prepared, WindowRound
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
CHAIN_AMBIGUOUS = "protocols {ids} are registered on several chains ({chains}); say which with --chain"
CHAIN_UNKNOWN = "no chain {slug}"
INDEXER_NOT_STARTED = (
    "the indexer has not started on chain {chain}: nothing is indexed yet, so there is no oldest height "
    "to migrate from; start `manage.py indexer_run --chain {chain}` first"
)
WINDOW_SIZE_INVALID = "window size must be between 1 and {max}"
MAX_WORKERS = 16
WORKERS_INVALID = "workers must be between 1 and {max}"
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
    chain: str = ""
    handed_off: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    heights: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    handoff_heights: dict[str, int] = field(default_factory=dict)


def validate_protocols(
    protocol_ids: Sequence[str], *, kind: MigrationKind, chain: str | None = None
) -> tuple[Chain, list[Protocol], list[str]]:
    """(chain, protocols to run, ids skipped as already done); raises ValidationFailed, writes nothing.
    `chain` (a slug) picks the chain; without it the ids must be registered on one chain only."""
    ids = list(dict.fromkeys(i.strip() for i in protocol_ids if i.strip()))
    if not ids:
        raise ValidationFailed(NO_PROTOCOLS)
    known = ", ".join(s.id for s in registry.all_specs())
    for pid in ids:
        if registry.get(pid) is None:
            raise ValidationFailed(
                UNKNOWN_PROTOCOL.format(id=pid, known=known), fields={"protocol_id": [pid]}
            )
    found = Protocol.objects.select_related("chain", "chain__org").filter(protocol_id__in=ids)
    if chain:
        if not indexer_selectors.chains_visible(org_ids=None).filter(slug=chain).exists():
            raise ValidationFailed(CHAIN_UNKNOWN.format(slug=chain), fields={"chain": [chain]})
        found = found.filter(chain__slug=chain)
    candidates = list(found.order_by("chain__slug", "protocol_id"))
    slugs = sorted({p.chain.slug for p in candidates})
    if len(slugs) > 1:
        raise ValidationFailed(
            CHAIN_AMBIGUOUS.format(ids=", ".join(ids), chains=", ".join(slugs)), fields={"chain": [None]}
        )
    rows = {p.protocol_id: p for p in candidates}
    for pid in ids:
        if pid not in rows:
            raise ValidationFailed(NOT_SET_UP.format(id=pid), fields={"protocol_id": [pid]})
        classified = rows[pid].classification_status
        if classified != MigrationStatus.SUCCESS:
            raise ValidationFailed(
                NOT_CLASSIFIED.format(id=pid, status=classified), fields={"protocol_id": [pid]}
            )
    the_chain = rows[ids[0]].chain
    indexed = indexer_selectors.indexed_range(chain_id=the_chain.pk)
    if indexed is None or indexed[0] is None or indexed[1] is None:
        raise ValidationFailed(INDEXER_NOT_STARTED.format(chain=the_chain.slug))
    # Done for good: the migration's terminal state (a re-run skips it).
    skipped = [pid for pid in ids if kind.machine.is_terminal(getattr(rows[pid], kind.status_field))]
    return the_chain, [rows[pid] for pid in ids if pid not in skipped], skipped


def _lock_key(migration: str, protocol: Protocol) -> str:
    return f"fleetops.protocol_migration:{migration}:{protocol.chain_id}:{protocol.protocol_id}"


def try_lock(migration: str, protocol: Protocol) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(hashtext(%s))", [_lock_key(migration, protocol)])
        row = cursor.fetchone()
    return bool(row and row[0])


def unlock(migration: str, protocol: Protocol) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_unlock(hashtext(%s))", [_lock_key(migration, protocol)])


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
                raise RaceLost(STATUS_MOVED.format(field=strategy.status_field, id=p.protocol_id)) from exc
            spec = registry.get(p.protocol_id)
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
        workers: int = 1,
    ) -> None:
        self.strategy, self.chain, self.trackers = strategy, chain, trackers
        self.window_size, self.actor, self.progress = window_size, actor, progress
        self.stop = stop or threading.Event()
        self.poll_seconds = poll_seconds
        self.workers = workers
        self.types = frozenset().union(*(t.spec.event_types for t in trackers))
        self.last_beat = 0.0
        self.pool: ClassifyPool | None = None  # started by the first parallel round

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
                        self._beat(None, finished=True)
                        break
                    self.stop.wait(self.poll_seconds)  # handed off; wait for live to pass our last window
                    continue
                latest = latest_indexed(self.chain)
                low = min(t.cursor for t in active) + 1
                if latest is None or low > latest:
                    self._beat(latest, waiting=True)
                    self._wait_for_block(latest)
                    continue
                if self.workers > 1 and latest - low + 1 > self.window_size:
                    if self.pool is None:
                        self.pool = ClassifyPool(self.workers)
                    WindowRound(self, low, latest).run()
                    continue
                high = min(low + self.window_size - 1, latest)
                self.commit_window(self.prepare_window(low, high, latest))
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            if self.pool is not None:
                self.pool.close()
            if self.progress:
                self.progress.close()
        return self.trackers

    # 2. one window: read once (any thread, no transaction) and classify (in process, or in the
    #    pool once a parallel round started it), then one transaction per protocol (in window
    #    order: the caller makes sure every window below `low` is committed first)
    def prepare_window(self, low: int, high: int, latest: int) -> Prepared:
        started = time.monotonic()
        expected_hash = store.block_hash(chain_id=self.chain.pk, height=high)
        rows: dict[int, list[Row]] = {}
        if expected_hash is not None:
            events = store.read_events(chain_id=self.chain.pk, types=self.types, low=low, high=high)
            active = [i for i, t in enumerate(self.trackers) if not t.handed_off]
            specs = [self.trackers[i].spec for i in active]
            if self.pool is not None:
                classified = self.pool.classify(specs, events)
            else:
                classified = [store.classify_events(spec, events) for spec in specs]
            rows = dict(zip(active, classified, strict=True))
        return Prepared(low, high, latest, expected_hash, rows, started)

    def commit_window(self, window: Prepared) -> bool:
        """Commit a prepared window for every protocol still backfilled; False when the window was
        rolled back under us (nothing of it is written: read it again from the cursors)."""
        high, latest = window.high, window.latest
        if window.expected_hash is None:
            WINDOW_RETRIES.inc()  # rolled back since we read the indexed height
            return False
        for i, t in enumerate(self.trackers):
            if t.handed_off:
                continue
            start = t.cursor + 1
            if start > high:
                continue
            rows = [r for r in window.rows[i] if r.height >= start]
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
                        if store.block_hash(chain_id=self.chain.pk, height=high) != window.expected_hash:
                            raise _Reorged
                        self.strategy.persist(t, self.chain.pk, rows, start, high)
            except _Reorged:
                WINDOW_RETRIES.inc()
                log.info(
                    "window rolled back under the migration; re-reading",
                    extra={"low": window.low, "high": high},
                )
                return False
            if result is CasResult.LOST:
                t.handed_off = True
                HANDOFFS.labels(
                    chain=self.chain.slug, protocol=t.protocol.protocol_id, migration=self.strategy.migration
                ).inc()
                log.info(
                    "handed off to live ingestion",
                    extra={
                        "chain": self.chain.slug,
                        "protocol": t.protocol.protocol_id,
                        "migration": self.strategy.migration,
                        "cursor": t.cursor,
                    },
                )
                continue
            HEIGHTS.inc(high - start + 1)
            t.heights += high - start + 1
            t.rows += len(rows)
            t.cursor = high
        WINDOW_SECONDS.observe(time.monotonic() - window.started)
        self._beat(latest)
        if self.progress:
            first = min(t.start_cursor for t in self.trackers)
            done = min((t.cursor for t in self.trackers if not t.handed_off), default=latest)
            ids = ",".join(t.protocol.protocol_id for t in self.trackers)
            self.progress.update(
                label=f"{self.strategy.migration} {self.chain.slug} {ids}",
                done=done - first,
                total=latest - first,
            )
        return True

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

    def _beat(self, latest: int | None, *, waiting: bool = False, finished: bool = False) -> None:
        now = time.monotonic()
        if now - self.last_beat < 5 and not finished:
            return
        self.last_beat = now
        details = {
            "chain": self.chain.slug,
            "protocols": {t.protocol.protocol_id: t.cursor for t in self.trackers},
            "latest": latest,
            "waiting_for_block": waiting,
        }
        name = f"protocols.{self.strategy.migration}.{self.chain.slug}"  # one per chain: runs may overlap
        if finished:
            # The run's last beat: the loop reads "finished" from here on, not stale.
            heartbeat_finish(name=name, details=details)
        else:
            heartbeat_beat(name=name, details=details)

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
                extra={"protocol": t.protocol.protocol_id, "migration": self.strategy.migration},
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
                log.exception(
                    "could not record the migration outcome", extra={"protocol": t.protocol.protocol_id}
                )
        log.error(
            "protocol migration failed",
            extra={"migration": self.strategy.migration, "error": message[:500]},
        )


# --- history ---------------------------------------------------------------------------------------------


def _persist_history(t: Tracker, chain_id: int, rows: Sequence[Row], start: int, end: int) -> None:
    store.copy_state_changes(protocol_pk=t.protocol.pk, chain_id=chain_id, rows=rows)
    store.span_extend(protocol_pk=t.protocol.pk, writer=Writer.HISTORY, from_height=start, to_height=end)
    store.note_contracts(protocol_pk=t.protocol.pk, rows=rows)
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


def check_workers(workers: int) -> None:
    if not 1 <= workers <= MAX_WORKERS:
        raise ValidationFailed(WORKERS_INVALID.format(max=MAX_WORKERS), fields={"workers": [workers]})


def history_validate(
    *,
    protocol_ids: Sequence[str],
    window_size: int = DEFAULT_WINDOW_SIZE,
    chain: str | None = None,
    workers: int = 1,
) -> tuple[Chain, list[Protocol], list[str]]:
    check_window_size(window_size)
    check_workers(workers)
    return validate_protocols(protocol_ids, kind=HISTORY_KIND, chain=chain)


def history_migrate(
    *,
    protocol_ids: Sequence[str],
    actor: Actor,
    chain: str | None = None,
    window_size: int = DEFAULT_WINDOW_SIZE,
    workers: int = 1,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    poll_seconds: float = 1.0,
) -> RunResult:
    """Backfill the protocols' state changes on `chain` (a slug; may be left out while the ids are
    registered on one chain only) from the oldest indexed height until live ingestion has taken each
    of them over, `workers` windows at a time. Blocks until then (or until `stop` is set)."""
    the_chain, protocols, skipped = history_validate(
        protocol_ids=protocol_ids, window_size=window_size, chain=chain, workers=workers
    )
    result = RunResult(migration="history", chain=the_chain.slug, skipped=skipped)
    if not protocols:
        return result
    locked: list[Protocol] = []
    try:
        for p in protocols:
            if not try_lock("history", p):
                raise Conflict(ALREADY_RUNNING.format(migration="history", id=p.protocol_id))
            locked.append(p)
        trackers = _start(chain=the_chain, protocols=protocols, actor=actor, workers=workers)
        run = MigrationRun(
            strategy=HISTORY,
            chain=the_chain,
            trackers=trackers,
            window_size=window_size,
            actor=actor,
            progress=progress,
            stop=stop,
            poll_seconds=poll_seconds,
            workers=workers,
        )
        try:
            run.run()
        finally:
            _summarize(result, trackers)
    finally:
        for p in locked:
            unlock("history", p)
    return result


def _start(*, chain: Chain, protocols: list[Protocol], actor: Actor, workers: int = 1) -> list[Tracker]:
    indexed = indexer_selectors.indexed_range(chain_id=chain.pk)
    oldest = None if indexed is None else indexed[0]
    assert oldest is not None  # validated
    return start_trackers(
        strategy=HISTORY,
        protocols=protocols,
        cursor_at=oldest - 1,
        actor=actor,
        updates={"history_started_at": clock.now()},
        metadata={"oldest_indexed_height": oldest, "workers": workers},
    )


def _summarize(result: RunResult, trackers: list[Tracker]) -> None:
    for t in trackers:
        pid = t.protocol.protocol_id
        (result.handed_off if t.done else result.failed).append(pid)
        result.heights[pid] = t.heights
        result.rows[pid] = t.rows
        if t.handed_off:
            result.handoff_heights[pid] = t.cursor + 1
