"""Whom to believe about a reorg when several sources serve one chain.

A parent-hash mismatch (`indexer.ingest.ReorgDetected` at height H) says only that the source which
served block H is on another branch than the stored rows. Whether the chain reorganised is decided
by the trusted sources: those that answer with a fresh head, are not lagging, do not say they are
catching up themselves and are not ranked down for an earlier fork (`trusted_sources`).

`reorg_vote` asks every answering source for its block at H - 1, the last height indexed below the
mismatch (one `/block` each; reorgs are rare, so a normal step costs nothing here):

- the reorg is trusted when more trusted sources show it (their block differs from the stored one)
  than do not; the first of them in ranking order is the witness the runner walks back on;
- it is ignored when at least as many trusted sources still show the stored block: every source that
  showed the other branch is ranked last for a backoff (`CometRpc.demote_forked`, 60 s doubling to
  1 h) with the health reason `forked`, so ingest fails over to a trusted source at once instead of
  meeting the same fork on every step. A real reorg that one source saw first is taken as soon as
  the trusted sources show it too;
- with no trusted source answering, nothing is known: the runner halts (the false-reorg guard).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from indexer.rpc import parse
from indexer.rpc.client import CometRpc, RpcError, RpcUnavailable

log = logging.getLogger(__name__)


def trusted_sources(rpc: CometRpc) -> list[str]:
    """Sources that may show the chain (a reorg): answering with a fresh head, not lagging, not
    catching up themselves and not ranked down for a fork, in ranking order."""
    heads, lagging, healths = rpc.fresh_heads(), rpc.lagging(), rpc.health()  # fresh: not forked
    return [
        s.config.name
        for s in rpc.ranked_sources()
        if s.config.name in heads and s.config.name not in lagging and not healths[s.config.name].catching_up
    ]


@dataclass
class ReorgVote:
    height: int  # the height compared: the last one indexed below the mismatch
    trusted: list[str]
    shown_by: list[str] = field(default_factory=list)  # their block there differs from the stored one
    not_shown_by: list[str] = field(default_factory=list)
    forked: list[str] = field(default_factory=list)  # ranked down for showing an untrusted fork

    @property
    def witness(self) -> str | None:
        """The trusted source to walk back on, when the trusted sources show the reorg."""
        shown = [n for n in self.trusted if n in self.shown_by]
        denied = [n for n in self.trusted if n in self.not_shown_by]
        return shown[0] if shown and len(shown) > len(denied) else None

    @property
    def ignored(self) -> bool:
        """The trusted sources show the stored block: the mismatch was one source's fork."""
        return self.witness is None and any(n in self.trusted for n in self.not_shown_by)

    def describe(self) -> str:
        shown = ", ".join(self.shown_by) or "none"
        kept = ", ".join(self.not_shown_by) or "none"
        return f"block {self.height} differs on {shown}; the stored one is on {kept}"


def reorg_vote(rpc: CometRpc, *, height: int, stored_hash: str | None) -> ReorgVote:
    """Ask the answering sources for their block at `height` (the stored `stored_hash`) and decide
    whether the trusted ones show a reorg; demote the sources that show a fork they do not."""
    rpc.probe_heads(min_interval=0.0)  # who is lagging, as of now
    vote = ReorgVote(height=height, trusted=trusted_sources(rpc))
    if stored_hash is None:  # nothing stored to compare with: the best trusted source decides
        vote.shown_by = vote.trusted[:1]
        return vote
    for name in rpc.fresh_heads():
        try:
            block = rpc.block_from(name, height)
        except (RpcError, parse.MalformedResponse):
            continue  # no answer is no vote
        (vote.not_shown_by if block.hash == stored_hash else vote.shown_by).append(name)
    if vote.trusted and not set(vote.trusted) & {*vote.shown_by, *vote.not_shown_by}:
        raise RpcUnavailable(f"no trusted source answered for block {height}: the reorg waits a step")
    if vote.ignored:
        detail = f"served a fork at {height} the trusted sources do not show"
        for name in vote.shown_by:
            seconds = rpc.demote_forked(name, detail=detail)
            vote.forked.append(name)
            log.warning("source %s: %s; ranked last for %.0f s", name, detail, seconds)
    return vote
