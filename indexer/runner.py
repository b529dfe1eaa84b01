"""The ingest loop of one chain. `IndexerRunner.step()` is one iteration; `run()` loops it.

1. Lease: only the holder writes (standbys return at once and try again next step). A paused chain
   gives its lease up, so `indexer_reindex` / `indexer_rollback` can take it.
2. An operator's rollback request (admin action, API) is carried out first, under the lease.
3. Identity: the source's chain id, and the stored fingerprint (hash of the first indexed block),
   must match before any write; a mismatch halts.
4. Target = head - head lag (or --stop-at). The head is agreed among the sources: the highest head
   any source reports that answers (no failure streak) with a `/status` younger than 60 s, and the
   WebSocket's newest header while it is connected. A source more than `LAGGING_HEAD_BLOCKS` (10)
   below that head is lagging: it does not set the head, it is ranked last for ingest (the client
   fails over from it) and it is not trusted to show a reorg. A source far *ahead* is believed: every
   block it serves is linked by parent hash before it is committed. `/status` of the best source is
   asked when the socket is down and at least every `STATUS_EVERY` seconds (identity), together with
   the other sources' heads (each at most every PROBE_INTERVAL); while catching up more than two
   batches below the head it last reported, the socket being down does not make every step ask it
   again (the head it knows is ahead of anything the step commits). Heights are fetched with bounded
   concurrency and committed strictly in order: catch-up batches of `catchup_batch_size` per
   transaction (the heights a catch-up leaves below the target in one), one block per transaction
   at the tip.
5. A parent mismatch is put to the trusted sources (`indexer.forks`: answering, not lagging, not
   catching up themselves, not ranked down for a fork). When at least as many of them still show
   the stored block, the mismatch was a fork of the others: nothing is rolled back, the sources
   showing it are ranked last for a backoff (health reason `forked`) and ingest goes on from a
   trusted one. When more of them show it, the runner walks back to the fork point on one of them;
   within the finality depth, with rollback automation on, the rows above it are rolled back and
   re-ingested; otherwise (or with no trusted source: the false-reorg guard) the indexer halts and
   writes nothing.
6. A height whose commit fails for another reason `POISON_LIMIT` times is recorded as the poison
   height and the indexer waits there (degraded) instead of looping.
7. Halt vs stall: the agreed head flat for more than `IDLE_AFTER_BLOCK_TIMES` block times is `idle`
   (every answering, non-lagging source is flat: the chain halted; nothing is wrong here). One
   stuck source never makes the chain idle while another one moves on. `STALLED_AFTER_FAILED_STEPS`
   failed steps in a row is `degraded` (the indexer is stalled).
8. Settings are live: every step reads the chain's row with its state (one query: batch size, max
   in flight, head lag, ...), and after every step the source rows `sources_observe` reads anyway
   (enabled, priority, URL, refused) reconfigure the client and move the head watcher
   (`indexer.watch`), so an operator's change takes effect within one step, without a restart.

The runner keeps the state the steps share (lease, identity, agreed head, prefetched batch, failure
count); step 5's reorg handling is `indexer.reorg_step`, the fetching of a range `indexer.fetching`
and the catch-up's continuous fetching `indexer.readahead`.

Every mode change is a step of `indexer.modes` (compare-and-set through the transition kernel,
fenced by the lease, audited into and out of `degraded` and `halted`); only the lease holder makes
them. A step that loses its race (an operator resumed meanwhile) is re-read on the next iteration.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from django.db import DatabaseError, connection, transaction

from fleetops.lib import clock
from fleetops.lib.errors import RaceLost
from fleetops.observability.heartbeats import heartbeat_beat
from fleetops.observability.leases import (
    LeaseGrant,
    LeaseLost,
    lease_acquire,
    lease_assert_held,
    lease_release,
    lease_renew,
)
from indexer import reorg_step, sources, watch
from indexer.blocks import WRITER, IndexedBlock, lease_name
from indexer.fetching import fetch_blocks as fetch_blocks  # used by the range commands
from indexer.fetching import rpc_for as rpc_for
from indexer.forks import trusted_sources as trusted_sources
from indexer.ingest import ReorgDetected, blocks_commit, blocks_rollback, prepare_rows
from indexer.metrics import BLOCK_COMMIT, BLOCKS, ROLLED_BACK, STEP_FAILURES
from indexer.models import (
    MODE_LOUD,
    MODE_MACHINE,
    Chain,
    ChainLagSample,
    IndexerState,
    Mode,
    beside_state,
)
from indexer.modes import (
    ERROR_LIMIT,
    indexer_degrade,
    indexer_halt,
    indexer_mode_follow,
    indexer_rollback_done,
)
from indexer.partitions import partitions_ahead
from indexer.readahead import ReadAhead
from indexer.reorg_step import StepResult as StepResult
from indexer.rpc.client import CometRpc, HeightUnavailable, RpcError
from indexer.rpc.ws import HeadWatcher
from indexer.watch import head_watcher_for as head_watcher_for

log = logging.getLogger(__name__)
POISON_LIMIT = 3
STALLED_AFTER_FAILED_STEPS = 3
LEASE_TTL = timedelta(seconds=30)
IDLE_AFTER_BLOCK_TIMES = 5
STATUS_EVERY = 10.0
LAG_SAMPLE_EVERY = 60.0
LAG_SAMPLE_RETENTION = timedelta(days=7)


# Chain columns an operator may change while `indexer_run` runs; re-read with the state every step.
LIVE_SETTINGS = (
    "expected_block_time_seconds",
    "head_lag",
    "finality_depth",
    "catchup_batch_size",
    "max_in_flight",
    "decode_concurrency",
    "enrichment_batch_size",
    "rollback_automation",
    "enrichment_enabled",
)
NO_SOURCE = "no enabled source that is not refused: nothing to ingest from"


class IndexerRunner:
    def __init__(
        self,
        chain: Chain,
        rpc: CometRpc,
        *,
        holder: str,
        stop_at: int | None = None,
        watcher: HeadWatcher | None = None,
        lease_ttl: timedelta = LEASE_TTL,
    ):
        self.chain = chain
        self.rpc = rpc
        self.holder = holder
        self.stop_at = stop_at
        self.watcher = watcher
        self.lease_ttl = lease_ttl
        self.grant: LeaseGrant | None = None
        self.identity_checked = False
        self.failed_steps = 0
        self._status_at = 0.0
        self._status_head = 0
        self._no_source = False
        self._earliest = 1
        self._fresh_start = 1
        self._in_catchup = False  # the last commit was a full catch-up batch below the target
        self._status_chain_id = ""
        self._lag_sampled_at = 0.0
        # Catch-up: the next batch is fetched (RPC + parse) while this one is committed.
        self._ahead = ReadAhead(rpc, prepare=self._prepare_rows)

    # --- one iteration ---------------------------------------------------------------------------------

    def step(self) -> StepResult:
        started = time.monotonic()
        try:
            result = self._step()
        except Exception as exc:
            self.failed_steps += 1
            STEP_FAILURES.labels(chain=self.chain.slug, error=exc.__class__.__name__).inc()
            # A session PostgreSQL terminated (a frozen writer past idle_in_transaction_session_timeout,
            # a restart) is dropped here so the next step reconnects instead of failing forever.
            connection.close_if_unusable_or_obsolete()
            try:
                self._note_stall(exc)
                heartbeat_beat(
                    name=f"indexer.{self.chain.slug}",
                    ok=False,
                    duration=time.monotonic() - started,
                    error=f"{exc.__class__.__name__}: {exc}"[:500],
                )
            except DatabaseError:
                connection.close_if_unusable_or_obsolete()
            raise
        finally:
            self._observe_sources()
        self.failed_steps = 0
        bad = result.mode in MODE_LOUD
        heartbeat_beat(
            name=f"indexer.{self.chain.slug}",
            ok=not bad,
            duration=time.monotonic() - started,
            error=result.note if bad else "",
            details={
                "leader": result.leader,
                "head": result.head,
                "indexed": result.indexed,
                "committed": result.committed,
                "mode": result.mode,
            },
        )
        return result

    def _step(self) -> StepResult:
        state = IndexerState.objects.select_related("chain").get(chain=self.chain)
        self._take_settings(state.chain)
        if state.paused and state.rollback_requested_to is None:
            self.release()  # so the reindex / rollback commands can take the lease
            return StepResult(False, head=state.head_height, indexed=state.last_indexed_height, note="paused")
        if not self._hold_lease():
            return StepResult(leader=False, note="standby: another process holds the writer lease")
        if state.rollback_requested_to is not None:
            return self._operator_rollback(state)
        if state.mode == Mode.HALTED:
            return StepResult(
                True, head=state.head_height, indexed=state.last_indexed_height, mode=state.mode,
                note=state.last_error or "halted",
            )  # fmt: skip
        if self._no_source:
            return StepResult(
                True, head=state.head_height, indexed=state.last_indexed_height, mode=state.mode,
                note=NO_SOURCE,
            )  # fmt: skip
        head = self._head(state.last_indexed_height)
        if not self._identity_ok(state):
            return StepResult(True, mode=Mode.HALTED, note="chain identity mismatch")
        self._note_head(state, head)
        self._sample_lag(head, state.last_indexed_height)
        target = head - self.chain.head_lag
        if self.stop_at is not None:
            target = min(target, self.stop_at)
        # A fresh index starts at height 1 and fails over to an archive source when the preferred one
        # is pruned; only when every source lacks the history does it start at the lowest they have.
        start = (state.last_indexed_height or self._fresh_start - 1) + 1
        if start > target:
            sources.sources_mark_syncing(
                chain=self.chain, catching_up=False, source_name=self.rpc.last_source
            )
            mode = self._idle_or_normal(state)
            return StepResult(True, head=head, indexed=state.last_indexed_height, mode=mode)
        if (
            state.poison_height is not None
            and state.poison_height == start
            and state.poison_attempts >= POISON_LIMIT
        ):
            return StepResult(
                True, head=head, indexed=state.last_indexed_height, mode=Mode.DEGRADED,
                note=f"poison height {start}: {state.last_error}",
            )  # fmt: skip
        behind = target - start + 1
        # Catch-up batches; at the tip one block per transaction, except that a catch-up ends with
        # the heights left below the target in one transaction, not in one each.
        batch = self.chain.catchup_batch_size
        size = batch if behind > batch else behind if self._in_catchup else 1
        end = start + size - 1
        sources.sources_mark_syncing(
            chain=self.chain, catching_up=behind > 1, source_name=self.rpc.last_source
        )
        # The next step's batch (up to the target) is fetched while this one is committed.
        ahead = range(end + 1, min(end + size, target) + 1) if size > 1 and end < target else None
        try:
            blocks = self._fetch(range(start, end + 1), ahead=ahead)
        except HeightUnavailable as exc:
            return self._unavailable(state, head, start, end, exc)
        mode = Mode.CATCHING_UP if end < target else Mode.NORMAL
        partitions_ahead(self.chain, end)  # height ranges ahead of the commit (no query while ahead)
        try:
            with BLOCK_COMMIT.labels(chain=self.chain.slug).time():
                last = blocks_commit(chain=self.chain, blocks=blocks, lease=self._lease())
        except ReorgDetected as reorg:
            self._drop_prefetched()
            return self._handle_reorg(reorg, head)
        except LeaseLost:
            self._drop_prefetched()
            self.grant = None
            return StepResult(False, note="lost the writer lease")
        except RaceLost:
            self._drop_prefetched()
            raise  # someone else moved the state row (a rollback): re-read next step
        except Exception as exc:
            self._drop_prefetched()
            self._poison(start, exc)
            raise
        BLOCKS.labels(chain=self.chain.slug).inc(len(blocks))
        self._in_catchup = size == batch and end < target
        self._follow(state, mode)
        return StepResult(True, committed=len(blocks), head=head, indexed=last, mode=mode)

    # --- mode steps (indexer.modes) ---------------------------------------------------------------------

    def _mode_step(self, step: Callable[..., object], state: IndexerState, **kwargs: object) -> bool:
        """Run one mode step under the lease. Without the lease (lost meanwhile) nothing is written
        and the runner drops to standby; a lost race is re-read on the next step."""
        if self.grant is None:
            return False
        try:
            step(chain=self.chain, state=state, lease=self.grant, actor=WRITER, **kwargs)
        except LeaseLost:
            self.grant = None
            return False
        except RaceLost:
            log.info("indexer %s: the state moved under this step; re-read next step", self.chain.slug)
            return False
        return True

    def _follow(self, state: IndexerState, mode: str) -> None:
        if state.mode != mode or state.last_error:
            self._mode_step(indexer_mode_follow, state, to=mode)

    # --- pieces ----------------------------------------------------------------------------------------

    def _lease(self) -> LeaseGrant:
        assert self.grant is not None
        return self.grant

    def _hold_lease(self) -> bool:
        if self.grant is not None:
            self.grant = lease_renew(grant=self.grant, ttl=self.lease_ttl)
        if self.grant is None:
            self.grant = lease_acquire(name=lease_name(self.chain), holder=self.holder, ttl=self.lease_ttl)
            self.identity_checked = False  # someone else may have written meanwhile
        return self.grant is not None

    def release(self) -> None:
        self._drop_prefetched()
        if self.grant is not None:
            lease_release(grant=self.grant)
            self.grant = None

    def _take_settings(self, fresh: Chain) -> None:
        """An operator's change of the chain's settings, read with the state: from this step on."""
        for name in LIVE_SETTINGS:
            setattr(self.chain, name, getattr(fresh, name))

    def _head(self, indexed: int | None) -> int:
        """The agreed head (see the module docstring): the highest fresh head of the sources that
        answer, and the WebSocket's while it is live. `/status` of the best source at least every
        STATUS_EVERY seconds, with the other sources' heads; when the socket is down, every step
        that is not far below the head the last answer reported."""
        now = time.monotonic()
        ws = self.watcher.latest() if self.watcher is not None and self.watcher.connected else None
        ask = not self.identity_checked or now - self._status_at >= STATUS_EVERY
        if ws is None and not ask:
            # Catching up far below it, a head a few seconds old still leaves the step the same batch.
            ask = indexed is None or self._status_head - indexed <= 2 * self.chain.catchup_batch_size
        if ask:
            status = self.rpc.status()
            self.rpc.probe_heads()  # the other sources' heads (each at most every PROBE_INTERVAL)
            self._status_at = now
            self._status_head = status.latest_height
            self._earliest = status.earliest_height or 1
            self._status_chain_id = status.chain_id
        agreed = max(self.rpc.fresh_heads().values(), default=self._status_head)
        return max(agreed, ws[0] if ws is not None else 0)

    def _identity_ok(self, state: IndexerState) -> bool:
        if self.identity_checked:
            return True
        problem = ""
        chain_id = self._status_chain_id
        self.chain.refresh_from_db(fields=["fingerprint"])
        if chain_id != self.chain.chain_id:
            problem = f"source reports chain {chain_id!r}, expected {self.chain.chain_id!r}"
        elif self.chain.fingerprint and state.oldest_indexed_height is not None:
            first = self.rpc.block(state.oldest_indexed_height)
            if first.hash != self.chain.fingerprint:
                problem = (
                    f"block {state.oldest_indexed_height} is {first.hash[:16]}…, but the stored "
                    f"fingerprint is {self.chain.fingerprint[:16]}…"
                )
        if problem:
            self._mode_step(indexer_halt, state, error=problem)
            log.critical("indexer %s halted: %s", self.chain.slug, problem)
            return False
        self.identity_checked = True
        return True

    def _note_head(self, state: IndexerState, head: int) -> None:
        if state.head_height != head:
            now = clock.now()
            IndexerState.objects.filter(chain=self.chain).update(head_height=head, head_moved_at=now)
            state.head_height, state.head_moved_at = head, now

    def _sample_lag(self, head: int, indexed: int | None) -> None:
        now = time.monotonic()
        if self._lag_sampled_at and now - self._lag_sampled_at < LAG_SAMPLE_EVERY:
            return
        self._lag_sampled_at = now
        at = clock.now()
        ChainLagSample.objects.create(chain=self.chain, at=at, head_height=head, indexed_height=indexed)
        ChainLagSample.objects.filter(chain=self.chain, at__lt=at - LAG_SAMPLE_RETENTION).delete()

    def _idle_or_normal(self, state: IndexerState) -> str:
        quiet_for = (clock.now() - state.head_moved_at).total_seconds() if state.head_moved_at else 0.0
        mode = (
            Mode.IDLE
            if quiet_for > IDLE_AFTER_BLOCK_TIMES * self.chain.expected_block_time_seconds
            else Mode.NORMAL
        )
        self._follow(state, mode)
        return mode

    def _fetch(self, heights: range, *, ahead: range | None = None) -> list[IndexedBlock]:
        return self._ahead.fetch(heights, max_in_flight=self.chain.max_in_flight, ahead=ahead)

    def _prepare_rows(self, item: IndexedBlock) -> IndexedBlock:
        return prepare_rows(item, chain_id=self.chain.pk, enrichment=self.chain.enrichment_enabled)

    def _drop_prefetched(self) -> None:
        self._ahead.drop()

    def _unavailable(
        self, state: IndexerState, head: int, first: int, last: int, exc: HeightUnavailable
    ) -> StepResult:
        """No source can serve the range (pruned everywhere): wait here, degraded, and say why. A
        fresh index moves its start up to the lowest height a source still has instead."""
        if state.last_indexed_height is None and exc.lowest is not None and exc.lowest > first:
            self._fresh_start = exc.lowest
            note = f"history below {exc.lowest} is pruned on every source: indexing from {exc.lowest}"
            log.warning("indexer %s: %s", self.chain.slug, note)
            return StepResult(True, head=head, indexed=None, mode=Mode.CATCHING_UP, note=note)
        for name in getattr(exc, "sources", None) or [s.config.name for s in self.rpc.ranked_sources()]:
            sources.source_range_failed(
                chain=self.chain, source_name=name, first=first, last=last, error=str(exc)
            )
        note = f"heights {first}-{last} are unavailable on every source: {exc}"
        self._mode_step(indexer_degrade, state, error=note)
        return StepResult(True, head=head, indexed=state.last_indexed_height, mode=Mode.DEGRADED, note=note)

    def _handle_reorg(self, reorg: ReorgDetected, head: int) -> StepResult:
        return reorg_step.handle_reorg(self, reorg, head)

    def _operator_rollback(self, state: IndexerState) -> StepResult:
        to = state.rollback_requested_to
        assert to is not None
        self._drop_prefetched()  # fetched before the rollback: the operator may know better
        removed = blocks_rollback(
            chain=self.chain,
            to_height=to,
            lease=self._lease(),
            actor=WRITER,
            reason=f"requested by {state.rollback_requested_by}: {state.rollback_requested_reason}",
        )
        ROLLED_BACK.labels(chain=self.chain.slug).inc(removed)
        # Clear only the request we carried out (a newer one stays for the next step), fenced by the
        # lease. An operator's rollback is also the way out of `halted` (a reorg deeper than
        # finality): then the request is cleared in the same compare-and-set that leaves `halted`,
        # so a crash or a lost lease in between cannot leave the chain halted without its request
        # (the next step re-runs the request; the rollback is then a no-op). Ingest resumes from the
        # chosen height, and the identity is checked again first.
        was_halted = state.mode == Mode.HALTED
        self._mode_step(indexer_rollback_done, state, to_height=to)
        if was_halted and state.mode != Mode.HALTED:
            self.identity_checked = False
        mode = state.mode
        return StepResult(
            True, head=state.head_height, indexed=min(to, state.last_indexed_height or to),
            mode=mode, note=f"operator rollback to {to}: removed {removed} blocks",
        )  # fmt: skip

    def _poison(self, height: int, exc: Exception) -> None:
        state = IndexerState.objects.get(chain=self.chain)
        attempts = state.poison_attempts + 1 if state.poison_height == height else 1
        error = f"height {height}: {exc.__class__.__name__}: {exc}"
        counters = {"poison_height": height, "poison_attempts": attempts}
        if attempts >= POISON_LIMIT and MODE_MACHINE.can(state.mode, Mode.DEGRADED):
            self._mode_step(indexer_degrade, state, error=error, updates=counters)
        elif self.grant is not None:
            # Not (yet) degraded: the counters and the error, fenced like every write here.
            try:
                with transaction.atomic():
                    lease_assert_held(name=self.grant.name, token=self.grant.token)
                    IndexerState.objects.filter(chain=self.chain).update(
                        last_error=error[:ERROR_LIMIT], **beside_state(MODE_MACHINE, counters)
                    )
            except LeaseLost:
                self.grant = None

    def _note_stall(self, exc: Exception) -> None:
        """Steps keep failing (sources unreachable, database errors): the indexer is stalled. A
        halted indexer stays halted (the machine has no edge from there)."""
        if self.failed_steps < STALLED_AFTER_FAILED_STEPS or self.grant is None:
            return
        state = IndexerState.objects.get(chain=self.chain)
        if state.mode == Mode.DEGRADED or MODE_MACHINE.can(state.mode, Mode.DEGRADED):
            self._mode_step(indexer_degrade, state, error=f"{exc.__class__.__name__}: {exc}")

    def _observe_sources(self) -> None:
        if self.grant is None:
            return  # the writer records source health; a standby would race it
        latest = self.watcher.latest() if self.watcher is not None else None
        try:
            rows = sources.sources_observe(
                chain=self.chain,
                rpc=self.rpc,
                ws_connected=self.watcher.connected if self.watcher is not None else None,
                ws_head=latest[0] if latest is not None else None,
            )
        except Exception:
            log.exception("indexer %s: recording source health failed", self.chain.slug)
            return
        # The rows just read carry the operator's source settings (enabled, priority, URL) and the
        # refusals: the client follows them from the next step on.
        configs = sources.usable_configs(rows)
        if self.watcher is not None:
            self.watcher = watch.follow(self.watcher, rows)
        self._no_source = not configs
        if configs and self.rpc.set_sources(configs):
            self._drop_prefetched()
            log.info("indexer %s: sources now %s", self.chain.slug, ", ".join(c.name for c in configs))

    # --- the loop --------------------------------------------------------------------------------------

    def run(
        self,
        stop: threading.Event,
        *,
        poll: float = 1.0,
        on_step: Callable[[StepResult], None] | None = None,
    ) -> None:
        """Step until `stop` is set (or `stop_at` is indexed). Errors never end the loop: they are
        logged, counted, and the next step waits a little longer (capped)."""
        if self.watcher is not None:
            self.watcher.start()
        sources.sources_ensure_rows(chain=self.chain, rpc=self.rpc)
        try:
            while not stop.is_set():
                try:
                    result = self.step()
                except RpcError as exc:
                    log.warning("indexer %s: %s", self.chain.slug, exc)
                    result = StepResult(self.grant is not None, note=f"error: {exc}")
                except Exception as exc:
                    log.exception("indexer %s: step failed", self.chain.slug)
                    result = StepResult(
                        self.grant is not None, note=f"error: {exc.__class__.__name__}: {exc}"
                    )
                if on_step:
                    on_step(result)
                if self.stop_at is not None and (result.indexed or 0) >= self.stop_at:
                    return
                if result.committed == 0:
                    self._wait(stop, poll * min(2**self.failed_steps, 30), result.indexed)
        finally:
            self._ahead.close()
            if self.grant is not None:
                sources.sources_release(chain=self.chain)
            self.release()
            if self.watcher is not None:
                self.watcher.stop()

    def _wait(self, stop: threading.Event, seconds: float, indexed: int | None) -> None:
        """Sleep until the next step; a new head on the WebSocket ends the wait early."""
        deadline = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < deadline:
            latest = self.watcher.latest() if self.watcher is not None and self.watcher.connected else None
            if latest is not None and indexed is not None and latest[0] - self.chain.head_lag > indexed:
                return
            stop.wait(min(0.05 if latest is not None else 0.2, max(deadline - time.monotonic(), 0)))
