"""Parallel history windows (`protocol_migrate history --workers N`): the windows of one round are
read by N threads at once, each on its own database connection, classified in a pool of N worker
processes (`ClassifyPool`: classification is pure Python and CPU-bound, so threads alone would
serialize on the interpreter lock), and committed in window order by the thread that read them,
through the run's own commit (`MigrationRun.commit_window`: the cursor CAS, the block check and the
rows in one transaction). A window that is ready early waits until every window before it is
committed, so the cursor only ever advances in order. The worker processes never touch the
database: they get the events as plain tuples and hand the rows back.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from django.db import connections

from migrations_app.protocols import classify
from migrations_app.protocols.classify import EventTuple, Row
from migrations_app.protocols.registry import ProtocolSpec

log = logging.getLogger(__name__)


class _Tracked(Protocol):
    handed_off: bool


class RoundOwner(Protocol):
    """What a round needs of the run (`migrations_app.protocols.history.MigrationRun`)."""

    window_size: int
    workers: int
    stop: threading.Event

    @property
    def trackers(self) -> Sequence[_Tracked]: ...

    def prepare_window(self, low: int, high: int, latest: int) -> Prepared: ...

    def commit_window(self, window: Prepared) -> bool: ...


class ClassifyPool:
    """`workers` processes that classify windows of events (`classify.classify_window`). They are
    started with `spawn`: a fresh interpreter that imports the classifiers and nothing of Django,
    inheriting no database connection and no lock of this threaded process. A worker exits on its
    own when this process dies (even by SIGKILL). Inside a daemonic process (which may not have
    children) the pool classifies in the calling thread instead. `spawn` imports the entry script
    in each worker (as `__mp_main__`): an entry script must keep its work under
    `if __name__ == "__main__"`, as `manage.py` does."""

    def __init__(self, workers: int) -> None:
        self._pool: ProcessPoolExecutor | None = None
        if multiprocessing.current_process().daemon:
            log.warning("classifying in process: a daemonic process cannot start worker processes")
            return
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=classify.worker_init,
            initargs=(os.getpid(),),
        )

    def classify(self, specs: Sequence[ProtocolSpec], events: Sequence[EventTuple]) -> list[list[Row]]:
        """Per spec, its rows among `events` (blocks the calling thread, not the interpreter)."""
        if self._pool is None:
            return [classify.classify_events(spec, events) for spec in specs]
        tuples = self._pool.submit(classify.classify_window, list(specs), events).result()
        return [classify.rows_from_tuples(part) for part in tuples]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


@dataclass
class Prepared:
    """One window read and classified, not yet committed. `expected_hash` is None when the block at
    `high` was rolled back between reading the indexed height and reading the window."""

    low: int
    high: int
    latest: int
    expected_hash: str | None
    rows: dict[int, list[Row]]  # per tracker (its index in the run): the window's rows, in chain order
    started: float


class WindowRound:
    """The windows [low, latest] of a parallel run: `run.workers` threads (each with its own
    database connection) take the next window, read it, have the run's pool classify it, wait for
    their turn and commit it through `MigrationRun.commit_window`, in window order. The round stops
    early, throwing away what is read but not committed, when a window was rolled back under us,
    every protocol was handed off, the run is stopped, or a worker failed (its error is raised
    here)."""

    def __init__(self, run: RoundOwner, low: int, latest: int) -> None:
        self.owner, self.latest = run, latest
        self.cond = threading.Condition()
        self.next_low = low
        self.next_seq = 0  # the next window handed out
        self.turn = 0  # the window whose commit is next
        self.stopped = False
        self.error: BaseException | None = None

    def run(self) -> None:
        count = -(-(self.latest - self.next_low + 1) // self.owner.window_size)
        threads = [
            threading.Thread(target=self._work, name=f"protocol-window-{i}", daemon=True)
            for i in range(min(self.owner.workers, count))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.error is not None:
            raise self.error

    def _take(self) -> tuple[int, int, int] | None:
        with self.cond:
            if self.stopped or self.owner.stop.is_set() or self.next_low > self.latest:
                return None
            seq, low = self.next_seq, self.next_low
            high = min(low + self.owner.window_size - 1, self.latest)
            self.next_seq, self.next_low = seq + 1, high + 1
            return seq, low, high

    def _work(self) -> None:
        try:
            while (taken := self._take()) is not None:
                seq, low, high = taken
                window = self.owner.prepare_window(low, high, self.latest)
                with self.cond:
                    while self.turn != seq and not self.stopped:
                        self.cond.wait()
                    if self.stopped:
                        return
                # Our turn: every window before this one is committed, none after it can be.
                committed = self.owner.commit_window(window)
                with self.cond:
                    done = all(t.handed_off for t in self.owner.trackers)
                    if not committed or done or self.owner.stop.is_set():
                        self.stopped = True
                    self.turn += 1
                    self.cond.notify_all()
        except BaseException as exc:
            with self.cond:
                self.error = self.error or exc
                self.stopped = True
                self.cond.notify_all()
        finally:
            connections.close_all()  # this thread's connections
