"""Checking the audit trail of an indexer mode (`indexer.models.MODE_MACHINE`).

Only the edges into and out of `degraded` and `halted` are audited; the quiet modes (catching_up,
normal, idle) flap unaudited by design. So the trail replays when the gaps between its moves (from
the initial state to the first, between two moves, after the last to the current mode) are filled
with the one quiet edge that joins two quiet modes. A gap with a loud end is left open, and the
replay fails on it: that is a move into or out of degraded / halted without its audit row.
"""

from __future__ import annotations

from fleetops.audit.models import AuditEvent
from fleetops.lib.machine import State
from indexer.models import MODE_MACHINE, MODE_QUIET, IndexerState, mode_edge_audited
from tests.transitions import audit_moves


def mode_walk(moves: list[tuple[State, State]], current: State) -> list[tuple[State, State]]:
    """The audited moves with the unaudited quiet steps between them filled in (one quiet edge
    joins any two quiet modes); a gap that is not quiet on both ends is left open, so the replay
    fails on it."""
    walk: list[tuple[State, State]] = []
    at = MODE_MACHINE.initial
    for source, target in [*moves, (current, None)]:
        if source != at and at in MODE_QUIET and source in MODE_QUIET:
            assert not mode_edge_audited(at, source)
            walk.append((at, source))
        if target is not None:
            walk.append((source, target))
            at = target
    return walk


def assert_mode_trail_replays(state: IndexerState) -> None:
    current = IndexerState.objects.values_list("mode", flat=True).get(pk=state.pk)
    moves = audit_moves(state, MODE_MACHINE)
    assert MODE_MACHINE.replay(mode_walk(moves, current)) == current
    assert all(mode_edge_audited(a, b) for a, b in moves), "a quiet mode change was audited"


def assert_paused_trail_replays(state: IndexerState) -> None:
    """The `paused` flag's audit rows replay from False (the default) to its current value."""
    paused = False
    rows = AuditEvent.objects.filter(target_type="indexer.indexerstate", target_id=str(state.pk))
    for changes in rows.order_by("id").values_list("changes", flat=True):
        if "paused" in changes:
            before, after = changes["paused"]
            assert before == paused
            paused = after
    assert IndexerState.objects.values_list("paused", flat=True).get(pk=state.pk) == paused
