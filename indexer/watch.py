"""Which source the WebSocket head watcher listens to, following the live source settings.

The watcher subscribes on the best usable source with a WebSocket URL: enabled, not refused, lowest
priority number first (then by name). After every runner step the writer re-reads the source rows
(`indexer.sources.sources_observe`) and `follow` moves the watcher when that choice changed: an
operator disabled its source, the source was refused, a preferred one was enabled or its URL
changed. The old socket is closed and a new watcher subscribes on the new source; with no such
source left the watcher stops and the runner polls `/status` (as while a socket is down). Only the
settings move it, never the health: a socket that drops reconnects to the same source with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from indexer.models import Chain, ConnectionStatus, SyncSource
from indexer.rpc.ws import HeadWatcher

log = logging.getLogger(__name__)


def websocket_source(rows: Iterable[SyncSource]) -> SyncSource | None:
    """The source the head watcher belongs on, if any."""
    usable = [
        r for r in rows if r.enabled and r.websocket_url and r.connection_status != ConnectionStatus.REFUSED
    ]
    return min(usable, key=lambda r: (r.priority, r.name), default=None)


def head_watcher_for(chain: Chain) -> HeadWatcher | None:
    """A watcher (not started) on the chain's best usable source with a WebSocket URL."""
    source = websocket_source(chain.sources.all())
    return HeadWatcher(source.websocket_url, source=source.name) if source is not None else None


def follow(watcher: HeadWatcher, rows: Iterable[SyncSource]) -> HeadWatcher:
    """`watcher`, or its replacement on the source the rows now name. A replacement is started when
    `watcher` had been started; one that was never started (a single `--once` step) stays so. A
    watcher not chosen from the rows (no `source`: pointed somewhere by hand) is left alone."""
    if not watcher.source:
        return watcher
    source = websocket_source(rows)
    if source is None:
        if watcher.thread_alive():
            log.warning("head watcher %s: no usable WebSocket source; polling /status", watcher.name)
            watcher.stop(timeout=1.0)
        return watcher
    if source.websocket_url == watcher.url and source.name == watcher.source:
        if watcher.started and not watcher.thread_alive():
            watcher.start()  # its source is usable again
        return watcher
    moved = HeadWatcher(
        source.websocket_url,
        on_head=watcher.on_head,
        reconnect_base=watcher.reconnect_base,
        reconnect_cap=watcher.reconnect_cap,
        open_timeout=watcher.open_timeout,
        query=watcher.query,
        source=source.name,
        clock=watcher.clock,
    )
    log.info("head watcher: moving from %s to %s (source %s)", watcher.url, moved.url, source.name)
    if watcher.started:
        watcher.stop(timeout=1.0)
        moved.start()
    return moved
