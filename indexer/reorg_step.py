"""Step 5 of the ingest loop (`indexer.runner`): a parent mismatch found while committing. The
trusted sources vote (`indexer.forks`); the stored block still shown means a fork of the other sources
(ignored, they are ranked down); otherwise the runner walks back to the fork point on a witness and
rolls back within the finality depth with rollback automation on, and halts in every other case
(deeper than finality, automation off, no trusted witness: the false-reorg guard)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from indexer import forks
from indexer.blocks import WRITER
from indexer.ingest import ReorgDetected, blocks_rollback
from indexer.metrics import REORGS, ROLLED_BACK
from indexer.models import Block, IndexerState, Mode
from indexer.modes import indexer_halt

if TYPE_CHECKING:
    from indexer.runner import IndexerRunner

log = logging.getLogger("indexer.runner")


@dataclass
class StepResult:
    """What one step of the runner did (`IndexerRunner.step`)."""

    leader: bool
    committed: int = 0
    head: int | None = None
    indexed: int | None = None
    mode: str = ""
    note: str = ""


def handle_reorg(runner: IndexerRunner, reorg: ReorgDetected, head: int) -> StepResult:
    state = IndexerState.objects.get(chain=runner.chain)
    last = state.last_indexed_height or 0
    stored = (
        Block.objects.filter(chain=runner.chain, height=reorg.height - 1)
        .values_list("hash", flat=True)
        .first()
    )
    vote = forks.reorg_vote(runner.rpc, height=reorg.height - 1, stored_hash=stored)
    if vote.ignored:
        # The trusted sources show the stored block: the mismatch was a fork of the sources
        # now ranked down. Nothing to roll back; the next step reads from a trusted source.
        REORGS.labels(chain=runner.chain.slug, outcome="ignored").inc()
        note = f"reorg at {reorg.height} not shown by the trusted sources, ignored: {vote.describe()}"
        log.warning("indexer %s: %s", runner.chain.slug, note)
        return StepResult(True, head=head, indexed=last, mode=state.mode, note=note)
    witness = vote.witness
    if witness is None:
        reason = (
            "no source that answers, is not lagging and is not catching up itself shows the "
            "reorg: not trusted for a rollback (false-reorg guard)"
        )
        return _reorg_halt(runner, state, reorg, head, last, reason)
    floor = max(last - runner.chain.finality_depth, (state.oldest_indexed_height or 1) - 1)
    fork = None
    for height in range(last, floor, -1):
        stored = (
            Block.objects.filter(chain=runner.chain, height=height).values_list("hash", flat=True).first()
        )
        if stored is not None and stored == runner.rpc.block_from(witness, height).hash:
            fork = height
            break
    reason = ""
    if fork is None:
        reason = f"reorg deeper than the finality depth {runner.chain.finality_depth}"
    elif not runner.chain.rollback_automation:
        reason = "reorg found but rollback automation is off"
    if reason:
        return _reorg_halt(runner, state, reorg, head, last, reason)
    assert fork is not None
    removed = blocks_rollback(
        chain=runner.chain,
        to_height=fork,
        lease=runner._lease(),
        actor=WRITER,
        reason=f"reorg at {reorg.height}: rolled back to the fork point {fork}",
    )
    REORGS.labels(chain=runner.chain.slug, outcome="rolled_back").inc()
    ROLLED_BACK.labels(chain=runner.chain.slug).inc(removed)
    return StepResult(
        True, head=head, indexed=fork, mode=Mode.NORMAL, note=f"reorg: rolled back {removed} blocks"
    )


def _reorg_halt(
    runner: IndexerRunner, state: IndexerState, reorg: ReorgDetected, head: int, last: int, reason: str
) -> StepResult:
    REORGS.labels(chain=runner.chain.slug, outcome="halted").inc()
    runner._mode_step(indexer_halt, state, error=f"{reorg}; {reason}")
    log.critical("indexer %s halted: %s", runner.chain.slug, reason)
    return StepResult(True, head=head, indexed=last, mode=Mode.HALTED, note=reason)
