"""The catch-up's fetch pipeline: `/block` + `/block_results` of the heights being committed and of
the next batch, `max_in_flight` at a time on one long-lived pool of threads.

The runner asks for the batch it commits next together with the batch after it. Both are queued at
once, so while the current batch is committed the workers already fetch and parse the next one, and
they never sit idle between two batches (a batch's last heights overlap the next batch's first). At
most those two batches are held. A worker also builds the rows of the block it fetched (`prepare`,
see `indexer.ingest.prepare_rows`) while the runner's thread waits on PostgreSQL, so that thread only
writes them.

What is fetched ahead is only source data: a batch that no longer fits (a rollback, a reorg, a lost
lease, a changed source list moved the start) is dropped, and `blocks_commit` checks every parent hash
as always. A failed height (HeightUnavailable, every source down) fails the batch it belongs to and
drops everything fetched ahead.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from indexer.blocks import IndexedBlock
from indexer.rpc.client import CometRpc


class ReadAhead:
    def __init__(self, rpc: CometRpc, *, prepare: Callable[[IndexedBlock], IndexedBlock] | None = None):
        self.rpc = rpc
        self.prepare = prepare
        self._pool: ThreadPoolExecutor | None = None
        self._workers = 0
        self._futures: dict[int, Future[IndexedBlock]] = {}

    def fetch(self, heights: range, *, max_in_flight: int, ahead: range | None = None) -> list[IndexedBlock]:
        """The blocks of `heights` in height order; `ahead` (the next batch) is queued behind them."""
        if self._futures and min(self._futures) != heights[0]:
            self.drop()  # fetched for another start: the chain moved under it
        if len(heights) == 1 and not ahead and heights[0] not in self._futures:
            return [self._one(heights[0])]  # at the tip: one height, no thread hop
        self._submit(heights, max_in_flight)
        if ahead:
            self._submit(ahead, max_in_flight)
        try:
            return [self._futures.pop(height).result() for height in heights]
        except BaseException:
            self.drop()
            raise

    def drop(self) -> None:
        """Forget whatever is fetched ahead (running fetches finish, unread)."""
        futures, self._futures = self._futures, {}
        for future in futures.values():
            future.cancel()

    def close(self) -> None:
        self.drop()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _one(self, height: int) -> IndexedBlock:
        item = IndexedBlock(*self.rpc.block_with_results(height))
        return item if self.prepare is None else self.prepare(item)

    def _submit(self, heights: range, workers: int) -> None:
        workers = max(1, workers)
        if self._pool is None or self._workers != workers:  # max_in_flight is a live setting
            if self._pool is not None:
                self.drop()
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="indexer-fetch")
            self._workers = workers
        for height in heights:
            if height not in self._futures:
                self._futures[height] = self._pool.submit(self._one, height)
