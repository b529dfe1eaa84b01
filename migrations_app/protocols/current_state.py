"""The current-state migration (`manage.py protocol_migrate current-state --protocol-id X
--start-height H`): balances (SEP41) or owners (SEP50) from height H on, with its own cursor
(`protocol_<ID>_current_state_cursor`, created at H - 1) and status, handed off to live ingestion
the same way as the history. State is additive (a balance at N depends on N - 1), so windows are
committed strictly in height order — which the engine's single sequential loop guarantees.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from fleetops.audit.actors import Actor
from fleetops.lib import clock
from fleetops.lib.errors import Conflict, ValidationFailed
from indexer import selectors as indexer_selectors
from indexer.selectors import ChainModel as Chain
from migrations_app.models import Protocol
from migrations_app.protocols import store
from migrations_app.protocols.cursor import cursor_get
from migrations_app.protocols.history import (
    ALREADY_RUNNING,
    DEFAULT_WINDOW_SIZE,
    MigrationRun,
    Progress,
    RunResult,
    Strategy,
    Tracker,
    _summarize,
    check_window_size,
    start_trackers,
    try_lock,
    unlock,
    validate_protocols,
)
from migrations_app.protocols.status import CURRENT_STATE_KIND
from migrations_app.protocols.store import Row

ONE_PROTOCOL = "the current-state migration runs one protocol at a time"
START_HEIGHT_RANGE = (
    "start height must be between the oldest indexed height {oldest} and {latest} (the next height)"
)
START_HEIGHT_CHANGED = (
    "the current-state migration of {id} already started at height {started}; it resumes from its cursor "
    "and cannot restart at {asked}"
)


def _persist_current_state(t: Tracker, chain_id: int, rows: Sequence[Row], start: int, end: int) -> None:
    store.apply_current_state(spec=t.spec, protocol_pk=t.protocol.pk, rows=rows)


CURRENT_STATE = Strategy(
    kind=CURRENT_STATE_KIND,
    writer="current_state",
    cursor_name=lambda p: p.current_state_cursor_name,
    persist=_persist_current_state,
    handed_off_fields=lambda t: {"current_state_handed_off_at": clock.now()},
)


def current_state_validate(
    *,
    protocol_id: str,
    start_height: int,
    window_size: int = DEFAULT_WINDOW_SIZE,
    chain: str | None = None,
) -> tuple[Chain, Protocol | None, list[str]]:
    """(chain, the protocol to run or None when it already succeeded, ids skipped); raises
    ValidationFailed and writes nothing. Run by the admin's request (so a bad request is refused
    before anything is audited or queued) and again by the run itself."""
    check_window_size(window_size)
    the_chain, protocols, skipped = validate_protocols([protocol_id], kind=CURRENT_STATE_KIND, chain=chain)
    if not protocols:
        return the_chain, None, skipped
    if len(protocols) != 1:
        raise ValidationFailed(ONE_PROTOCOL)
    protocol = protocols[0]
    indexed = indexer_selectors.indexed_range(chain_id=the_chain.pk)
    assert indexed is not None  # validated
    oldest, latest = indexed
    assert oldest is not None
    assert latest is not None
    existing = cursor_get(protocol.current_state_cursor_name)
    started = protocol.current_state_start_height
    if existing is not None and started is not None and started != start_height:
        raise ValidationFailed(
            START_HEIGHT_CHANGED.format(id=protocol.protocol_id, started=started, asked=start_height),
            fields={"start_height": [start_height]},
        )
    if existing is None and not oldest <= start_height <= latest + 1:
        raise ValidationFailed(
            START_HEIGHT_RANGE.format(oldest=oldest, latest=latest + 1),
            fields={"start_height": [start_height]},
        )
    return the_chain, protocol, skipped


def current_state_migrate(
    *,
    protocol_id: str,
    start_height: int,
    actor: Actor,
    chain: str | None = None,
    window_size: int = DEFAULT_WINDOW_SIZE,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    poll_seconds: float = 1.0,
) -> RunResult:
    the_chain, protocol, skipped = current_state_validate(
        protocol_id=protocol_id, start_height=start_height, window_size=window_size, chain=chain
    )
    result = RunResult(migration="current_state", chain=the_chain.slug, skipped=skipped)
    if protocol is None:
        return result
    if not try_lock("current_state", protocol):
        raise Conflict(ALREADY_RUNNING.format(migration="current-state", id=protocol.protocol_id))
    try:
        trackers = start_trackers(
            strategy=CURRENT_STATE,
            protocols=[protocol],
            cursor_at=start_height - 1,
            actor=actor,
            updates={"current_state_start_height": start_height},
            metadata={"start_height": start_height},
        )
        run = MigrationRun(
            strategy=CURRENT_STATE,
            chain=the_chain,
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
        unlock("current_state", protocol)
    return result
