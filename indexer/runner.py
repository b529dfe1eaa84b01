"""The ingest loop of one chain. `IndexerRunner.step()` is one iteration; `run()` loops it.

1. Lease: only the holder writes (standbys return at once and try again next step).
2. Identity: the source's chain id, and the stored fingerprint (hash of the first indexed block),
   must match before any write; a mismatch halts.
3. Target = head - head lag (or --stop-at). Heights are fetched with bounded concurrency and
   committed strictly in order: catch-up batches of `catchup_batch_size` per transaction, one block
   per transaction at the tip.
4. A parent mismatch walks back to the fork point. Within the finality depth, with rollback
   automation on and a source that is not itself catching up (false-reorg guard), the rows above
   the fork point are rolled back and re-ingested; otherwise the indexer halts and writes nothing.
5. A height whose commit fails for another reason `POISON_LIMIT` times is recorded as the poison
   height and the indexer waits there (degraded) instead of looping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

from fleetops.audit.actors import Actor
from fleetops.lib import clock
from fleetops.observability.heartbeats import heartbeat_beat
from fleetops.observability.leases import LeaseGrant, LeaseLost, lease_acquire, lease_release, lease_renew
from indexer.ingest import IndexedBlock, ReorgDetected, blocks_commit, blocks_rollback, lease_name
from indexer.metrics import BLOCK_COMMIT, BLOCKS, REORGS, ROLLED_BACK
from indexer.models import Block, Chain, IndexerState, Mode
from indexer.rpc.client import CometRpc, RpcError, SourceConfig

log = logging.getLogger(__name__)
ACTOR = Actor.system("indexer")
POISON_LIMIT = 3
LEASE_TTL = timedelta(seconds=30)
IDLE_AFTER_BLOCK_TIMES = 5


@dataclass
class StepResult:
    leader: bool
    committed: int = 0
    head: int | None = None
    indexed: int | None = None
    mode: str = ""
    note: str = ""


def rpc_for(chain: Chain) -> CometRpc:
    sources = [
        SourceConfig(s.name, s.rpc_url, s.priority)
        for s in chain.sources.filter(enabled=True).order_by("priority")
    ]
    return CometRpc(sources)


class IndexerRunner:
    def __init__(self, chain: Chain, rpc: CometRpc, *, holder: str, stop_at: int | None = None):
        self.chain = chain
        self.rpc = rpc
        self.holder = holder
        self.stop_at = stop_at
        self.grant: LeaseGrant | None = None
        self.identity_checked = False

    # --- one iteration ---------------------------------------------------------------------------------

    def step(self) -> StepResult:
        started = time.monotonic()
        result = self._step()
        heartbeat_beat(
            name=f"indexer.{self.chain.slug}",
            ok=result.mode not in (Mode.HALTED, Mode.DEGRADED),
            duration=time.monotonic() - started,
            error=result.note if result.mode in (Mode.HALTED, Mode.DEGRADED) else "",
            details={
                "leader": result.leader,
                "head": result.head,
                "indexed": result.indexed,
                "committed": result.committed,
            },
        )
        return result

    def _step(self) -> StepResult:
        if not self._hold_lease():
            return StepResult(leader=False, note="standby: another process holds the writer lease")
        state = IndexerState.objects.get(chain=self.chain)
        if state.paused or state.mode == Mode.HALTED:
            return StepResult(
                True,
                head=state.head_height,
                indexed=state.last_indexed_height,
                mode=state.mode,
                note=state.last_error or "paused",
            )
        status = self.rpc.status()
        if not self._identity_ok(status.chain_id, state):
            return StepResult(True, mode=Mode.HALTED, note="chain identity mismatch")
        self._note_head(state, status.latest_height)
        target = status.latest_height - self.chain.head_lag
        if self.stop_at is not None:
            target = min(target, self.stop_at)
        start = (state.last_indexed_height or max(status.earliest_height or 1, 1) - 1) + 1
        if start > target:
            mode = self._idle_or_normal(state)
            return StepResult(True, head=status.latest_height, indexed=state.last_indexed_height, mode=mode)
        if (
            state.poison_height is not None
            and state.poison_height == start
            and state.poison_attempts >= POISON_LIMIT
        ):
            return StepResult(
                True,
                head=status.latest_height,
                indexed=state.last_indexed_height,
                mode=Mode.DEGRADED,
                note=f"poison height {start}",
            )
        size = self.chain.catchup_batch_size if target - start + 1 > self.chain.catchup_batch_size else 1
        end = min(start + size - 1, target)
        blocks = self._fetch(range(start, end + 1))
        mode = Mode.CATCHING_UP if end < target else Mode.NORMAL
        try:
            with BLOCK_COMMIT.labels(chain=self.chain.slug).time():
                last = blocks_commit(chain=self.chain, blocks=blocks, lease=self._lease())
        except ReorgDetected as reorg:
            return self._handle_reorg(reorg, status.catching_up, status.latest_height)
        except LeaseLost:
            self.grant = None
            return StepResult(False, note="lost the writer lease")
        except Exception as exc:
            self._poison(start, exc)
            raise
        BLOCKS.labels(chain=self.chain.slug).inc(len(blocks))
        IndexerState.objects.filter(chain=self.chain).update(mode=mode, last_error="")
        return StepResult(True, committed=len(blocks), head=status.latest_height, indexed=last, mode=mode)

    # --- pieces ----------------------------------------------------------------------------------------

    def _lease(self) -> LeaseGrant:
        assert self.grant is not None
        return self.grant

    def _hold_lease(self) -> bool:
        if self.grant is not None:
            self.grant = lease_renew(grant=self.grant, ttl=LEASE_TTL)
        if self.grant is None:
            self.grant = lease_acquire(name=lease_name(self.chain), holder=self.holder, ttl=LEASE_TTL)
        return self.grant is not None

    def release(self) -> None:
        if self.grant is not None:
            lease_release(grant=self.grant)
            self.grant = None

    def _identity_ok(self, chain_id: str, state: IndexerState) -> bool:
        if self.identity_checked:
            return True
        problem = ""
        if chain_id != self.chain.chain_id:
            problem = f"source reports chain {chain_id!r}, expected {self.chain.chain_id!r}"
        elif self.chain.fingerprint and state.oldest_indexed_height is not None:
            first = self.rpc.block(state.oldest_indexed_height)
            if first.hash != self.chain.fingerprint:
                problem = f"block {state.oldest_indexed_height} is {first.hash[:16]}…, fingerprint differs"
        if problem:
            IndexerState.objects.filter(chain=self.chain).update(mode=Mode.HALTED, last_error=problem)
            log.critical("indexer %s halted: %s", self.chain.slug, problem)
            return False
        self.identity_checked = True
        return True

    def _note_head(self, state: IndexerState, head: int) -> None:
        if state.head_height != head:
            IndexerState.objects.filter(chain=self.chain).update(head_height=head, head_moved_at=clock.now())
            state.head_height, state.head_moved_at = head, clock.now()

    def _idle_or_normal(self, state: IndexerState) -> str:
        quiet_for = (clock.now() - state.head_moved_at).total_seconds() if state.head_moved_at else 0.0
        mode = (
            Mode.IDLE
            if quiet_for > IDLE_AFTER_BLOCK_TIMES * self.chain.expected_block_time_seconds
            else Mode.NORMAL
        )
        IndexerState.objects.filter(chain=self.chain).update(mode=mode)
        return mode

    def _fetch(self, heights: range) -> list[IndexedBlock]:
        def one(height: int) -> IndexedBlock:
            return IndexedBlock(self.rpc.block(height), self.rpc.block_results(height))

        if len(heights) == 1:
            return [one(heights[0])]
        with ThreadPoolExecutor(max_workers=max(1, min(self.chain.max_in_flight, len(heights)))) as pool:
            return list(pool.map(one, heights))  # map keeps height order

    def _handle_reorg(self, reorg: ReorgDetected, source_catching_up: bool, head: int) -> StepResult:
        state = IndexerState.objects.get(chain=self.chain)
        last = state.last_indexed_height or 0
        floor = max(last - self.chain.finality_depth, (state.oldest_indexed_height or 1) - 1)
        fork = None
        for height in range(last, floor, -1):
            stored = (
                Block.objects.filter(chain=self.chain, height=height).values_list("hash", flat=True).first()
            )
            if stored is not None and stored == self.rpc.block(height).hash:
                fork = height
                break
        reason = ""
        if fork is None:
            reason = f"reorg deeper than the finality depth {self.chain.finality_depth}"
        elif not self.chain.rollback_automation:
            reason = "reorg found but rollback automation is off"
        elif source_catching_up:
            reason = "the source is catching up itself: not trusted for a rollback (false-reorg guard)"
        if reason:
            REORGS.labels(chain=self.chain.slug, outcome="halted").inc()
            IndexerState.objects.filter(chain=self.chain).update(
                mode=Mode.HALTED, last_error=f"{reorg}; {reason}"
            )
            log.critical("indexer %s halted: %s", self.chain.slug, reason)
            return StepResult(True, head=head, indexed=last, mode=Mode.HALTED, note=reason)
        assert fork is not None
        removed = blocks_rollback(
            chain=self.chain,
            to_height=fork,
            lease=self._lease(),
            actor=ACTOR,
            reason=f"reorg at {reorg.height}: rolled back to the fork point {fork}",
        )
        REORGS.labels(chain=self.chain.slug, outcome="rolled_back").inc()
        ROLLED_BACK.labels(chain=self.chain.slug).inc(removed)
        return StepResult(
            True, head=head, indexed=fork, mode=Mode.NORMAL, note=f"rolled back {removed} blocks"
        )

    def _poison(self, height: int, exc: Exception) -> None:
        state = IndexerState.objects.get(chain=self.chain)
        attempts = state.poison_attempts + 1 if state.poison_height == height else 1
        IndexerState.objects.filter(chain=self.chain).update(
            poison_height=height,
            poison_attempts=attempts,
            mode=Mode.DEGRADED if attempts >= POISON_LIMIT else state.mode,
            last_error=f"height {height}: {exc.__class__.__name__}: {exc}"[:2000],
        )

    # --- the loop --------------------------------------------------------------------------------------

    def run(
        self, stop: threading.Event, *, poll: float = 1.0, on_step: Callable[[StepResult], None] | None = None
    ) -> None:
        try:
            while not stop.is_set():
                try:
                    result = self.step()
                except RpcError as exc:
                    log.warning("indexer %s: %s", self.chain.slug, exc)
                    result = StepResult(self.grant is not None, note=str(exc))
                if on_step:
                    on_step(result)
                if self.stop_at is not None and (result.indexed or 0) >= self.stop_at:
                    return
                if result.committed == 0:
                    stop.wait(poll)
        finally:
            self.release()
