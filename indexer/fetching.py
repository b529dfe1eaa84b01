"""Where the runner and the commands that read a range of blocks (`indexer_reindex`,
`indexer_verify`) get them: a client over the chain's usable sources, and a bounded-concurrency fetch
of a list of heights. The catch-up loop's continuous fetching on top of this is `indexer.readahead`."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from indexer import sources
from indexer.blocks import IndexedBlock
from indexer.models import Chain, SyncSource
from indexer.rpc.client import CometRpc


def rpc_for(chain: Chain) -> CometRpc:
    """A client over the chain's enabled sources that are not refused (all enabled ones when every
    one is refused, so the process starts and shows why)."""
    rows = list(chain.sources.filter(enabled=True))
    configs = sources.usable_configs(rows) or sources.usable_configs(
        [SyncSource(name=r.name, rpc_url=r.rpc_url, priority=r.priority) for r in rows]
    )
    return CometRpc(configs)


def fetch_blocks(rpc: CometRpc, heights: Sequence[int], *, max_in_flight: int) -> list[IndexedBlock]:
    """`/block` + `/block_results` for each height (both from one source, checked against each
    other), at most `max_in_flight` heights at once, returned in height order whatever order they
    arrive in."""

    def one(height: int) -> IndexedBlock:
        return IndexedBlock(*rpc.block_with_results(height))

    if len(heights) == 1:
        return [one(heights[0])]
    with ThreadPoolExecutor(max_workers=max(1, min(max_in_flight, len(heights)))) as pool:
        return list(pool.map(one, heights))  # map keeps height order
