"""Target writes: every target state change, set-based, through the transition kernel.

Each function moves a set of targets along `TARGET_MACHINE` with `transition_rows` (one
`UPDATE … FROM (VALUES …)` per chunk of rows, admitting only the machine's edges) and returns the ids
that moved. The reconciler's writes (`target_mark_dispatching` … `target_fail`) carry a `Phase`:

1. The event row is locked (`SELECT … FOR UPDATE`) in the state the tick read, in the transaction of
   the UPDATE: a stop or terminate that moved the event first makes the write a lost race, and one
   that comes later waits for the write to commit.
2. Each target must still be in the state the tick read (`exact_from`) and in the tick's phase
   (`desired_state`); writes whose next value is derived from a counter also match that counter
   (`dispatch_attempt` is part of the command id, `retry_count` decides the third strike).
3. Rows that did not move lost a race: the kernel counts them once per call, the caller does not act
   on them, and the in-memory targets are advanced only for the rows that moved.

`target_reset_for_restore` (stop, max duration) and `target_sweep` (admin terminate) run inside the
caller's transaction, after it locked the event. Target moves write no audit rows of their own: the
event's audit row of the same transaction carries the counts (see `TARGET_MACHINE`'s description).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import transaction

from curtailment.models import (
    TARGET_MACHINE,
    CurtailmentEvent,
    CurtailmentTarget,
    DesiredState,
    TargetState,
)
from fleetops.lib.cas import note_race_lost
from fleetops.lib.machine import State
from fleetops.lib.transition import transition_rows

T = TargetState
MAX_RETRIES = 3
# (target, power W, reading time) from the latest telemetry; None when there is no fresh reading.
Reading = tuple[CurtailmentTarget, float | None, datetime | None]


@dataclass(frozen=True)
class Phase:
    """What every target write of one event's tick must still find: the event in `event_state` and
    the target in the `desired` phase."""

    event_id: int
    event_state: str
    desired: str


def _move(
    phase: Phase,
    rows: Sequence[Mapping[str, Any]],
    *,
    operation: str,
    to: State | None = None,
    set_fields: Sequence[str] = (),
    match: Sequence[str] = (),
    updates: Mapping[str, Any] | None = None,
    increments: Mapping[str, int] | None = None,
) -> set[int]:
    if not rows:
        return set()
    with transaction.atomic():
        held = (
            CurtailmentEvent.objects.select_for_update()
            .filter(pk=phase.event_id, state=phase.event_state)
            .values_list("pk", flat=True)
            .first()
        )
        if held is None:
            note_race_lost(operation, expected=len(rows), changed=0)
            return set()
        moved = transition_rows(
            model=CurtailmentTarget,
            machine=TARGET_MACHINE,
            rows=rows,
            to=to,
            set_fields=set_fields,
            match=match,
            # The phase is the same for every row: one condition, not a column per row.
            where={"desired_state": phase.desired},
            updates=updates,
            increments=increments,
            operation=operation,
            exact_from=True,
        )
    return set(moved)


def _moved(targets: Iterable[CurtailmentTarget], ids: set[int]) -> list[CurtailmentTarget]:
    return [t for t in targets if t.id in ids]


def is_orphan(target: CurtailmentTarget) -> bool:
    """A DISPATCHING target with a command id: a crashed tick committed it and may have sent it."""
    return target.state == T.DISPATCHING and bool(target.last_command_id)


def target_mark_dispatching(phase: Phase, claims: Sequence[tuple[CurtailmentTarget, str]]) -> set[int]:
    """Pre-write DISPATCHING with each target's command id (committed before the gateway call).

    A fresh target's attempt counter moves on by one and must still hold the value its command id
    was built from; an orphan keeps its attempt and command id (the gateway deduplicates it)."""
    fresh = [(t, command_id) for t, command_id in claims if not is_orphan(t)]
    orphans = [t for t, _ in claims if is_orphan(t)]
    moved = _move(
        phase,
        [
            {"pk": t.id, "from": t.state, "dispatch_attempt": t.dispatch_attempt, "last_command_id": cid}
            for t, cid in fresh
        ],
        to=T.DISPATCHING,
        set_fields=("last_command_id",),
        match=("dispatch_attempt",),
        increments={"dispatch_attempt": 1},
        operation="curtailment.target>dispatching",
    )
    moved |= _move(
        phase,
        [
            {
                "pk": t.id,
                "from": t.state,
                "dispatch_attempt": t.dispatch_attempt,
                "last_command_id": t.last_command_id,
            }
            for t in orphans
        ],
        to=T.DISPATCHING,
        match=("dispatch_attempt", "last_command_id"),
        operation="curtailment.target>dispatching (orphan)",
    )
    for t, command_id in fresh:
        if t.id in moved:
            t.state, t.dispatch_attempt, t.last_command_id = T.DISPATCHING, t.dispatch_attempt + 1, command_id
    return moved


def target_mark_dispatched(
    phase: Phase, sent: Sequence[tuple[CurtailmentTarget, str]], *, now: datetime
) -> set[int]:
    """DISPATCHING -> DISPATCHED with the gateway's batch id, for the attempt that was sent."""
    moved = _move(
        phase,
        [
            {"pk": t.id, "from": t.state, "dispatch_attempt": t.dispatch_attempt, "last_batch_id": batch}
            for t, batch in sent
        ],
        to=T.DISPATCHED,
        set_fields=("last_batch_id",),
        match=("dispatch_attempt",),
        updates={"last_dispatched_at": now, "last_error": ""},
        operation="curtailment.target>dispatched",
    )
    for t, batch in sent:
        if t.id in moved:
            t.state, t.last_batch_id, t.last_dispatched_at, t.last_error = T.DISPATCHED, batch, now, ""
    return moved


def _observed(readings: Sequence[Reading]) -> list[dict[str, Any]]:
    return [
        {"pk": t.id, "from": t.state, "observed_power_w": power, "observed_at": at}
        for t, power, at in readings
    ]


def _advance(readings: Sequence[Reading], moved: set[int], state: str, **fields: Any) -> None:
    for t, power, at in readings:
        if t.id in moved:
            t.state, t.observed_power_w, t.observed_at = state, power, at
            for key, value in fields.items():
                setattr(t, key, value)


def target_confirm(phase: Phase, readings: Sequence[Reading], *, now: datetime) -> set[int]:
    """DISPATCHED -> CONFIRMED: telemetry shows the device curtailed; the retry budget refills."""
    moved = _move(
        phase,
        _observed(readings),
        to=T.CONFIRMED,
        set_fields=("observed_power_w", "observed_at"),
        updates={"confirmed_at": now, "retry_count": 0},
        operation="curtailment.target>confirmed",
    )
    _advance(readings, moved, T.CONFIRMED, confirmed_at=now, retry_count=0)
    return moved


def target_observe(phase: Phase, readings: Sequence[Reading]) -> set[int]:
    """CONFIRMED -> CONFIRMED: still curtailed; the latest reading is kept (a missing one keeps the
    previous)."""
    kept = [
        (t, t.observed_power_w if power is None else power, t.observed_at if at is None else at)
        for t, power, at in readings
    ]
    moved = _move(
        phase,
        _observed(kept),
        to=T.CONFIRMED,
        set_fields=("observed_power_w", "observed_at"),
        operation="curtailment.target>confirmed (observe)",
    )
    _advance(kept, moved, T.CONFIRMED)
    return moved


def target_mark_drifted(phase: Phase, readings: Sequence[Reading]) -> set[int]:
    """CONFIRMED -> DRIFTED: the device runs again although it should be curtailed."""
    moved = _move(
        phase,
        _observed(readings),
        to=T.DRIFTED,
        set_fields=("observed_power_w", "observed_at"),
        operation="curtailment.target>drifted",
    )
    _advance(readings, moved, T.DRIFTED)
    return moved


def target_resolve(phase: Phase, readings: Sequence[Reading], *, now: datetime) -> set[int]:
    """DISPATCHED -> RESOLVED (restore phase): telemetry shows the device mining again."""
    moved = _move(
        phase,
        _observed(readings),
        to=T.RESOLVED,
        set_fields=("observed_power_w", "observed_at"),
        updates={"confirmed_at": now},
        operation="curtailment.target>resolved",
    )
    _advance(readings, moved, T.RESOLVED, confirmed_at=now)
    return moved


def strike_target(target: CurtailmentTarget, fail_state: str) -> str:
    """Where one more failed attempt puts a target: `fail_state`, or RESTORE_FAILED on the third."""
    return T.RESTORE_FAILED if target.retry_count + 1 >= MAX_RETRIES else fail_state


def target_fail(
    phase: Phase, targets: Sequence[CurtailmentTarget], *, message: str, fail_state: str
) -> set[int]:
    """Burn one retry: -> `fail_state` with `last_error`, or RESTORE_FAILED on the third strike.
    The row must still hold the retry count the verdict was computed from."""
    moved = _move(
        phase,
        [
            {"pk": t.id, "from": t.state, "to": strike_target(t, fail_state), "retry_count": t.retry_count}
            for t in targets
        ],
        match=("retry_count",),
        updates={"last_error": message},
        increments={"retry_count": 1},
        operation="curtailment.target>failed attempt",
    )
    for t in targets:
        if t.id in moved:
            t.state, t.retry_count, t.last_error = strike_target(t, fail_state), t.retry_count + 1, message
    return moved


def target_reset_for_restore(*, event: CurtailmentEvent) -> int:
    """Every live target -> PENDING in the restore phase (desired ACTIVE), its attempt state
    cleared. Runs in the caller's transaction, which holds the event's lock (stop, max duration)."""
    ids = list(
        CurtailmentTarget.objects.filter(
            event=event, state__in=TARGET_MACHINE.allowed_from(T.PENDING)
        ).values_list("pk", flat=True)
    )
    moved = transition_rows(
        model=CurtailmentTarget,
        machine=TARGET_MACHINE,
        rows=[{"pk": pk} for pk in ids],
        to=T.PENDING,
        updates={
            "desired_state": DesiredState.ACTIVE,
            "retry_count": 0,
            "dispatch_attempt": 0,
            "last_dispatched_at": None,
            "last_batch_id": "",
            "last_command_id": "",
            "confirmed_at": None,
            "last_error": "",
        },
        operation="curtailment.target>pending (restore)",
    )
    return len(moved)


# What a terminated target that had been sent a command shows; the admin's reason is in the
# event's audit row (curtailment.admin_terminated), not on every target.
SWEPT_ERROR = "written off by an admin terminate; the device may not be restored"


def target_sweep(*, event: CurtailmentEvent) -> dict[str, int]:
    """Admin terminate: write off every live target the machine lets go; returns the counts (for
    the audit row's metadata).

    1. A curtail-phase target no command was ever sent to (`pending`, no dispatch attempt) -> CANCELLED.
    2. Every other target that may be written off -> RESTORE_FAILED (its device may still be curtailed).

    Runs in the caller's transaction, which holds the event's lock and has checked that no curtail
    command is in flight (a confirmed target has no edge to RESTORE_FAILED: stop it first)."""
    never_sent = list(
        CurtailmentTarget.objects.filter(
            event=event,
            state__in=TARGET_MACHINE.allowed_from(T.CANCELLED),
            desired_state=DesiredState.CURTAILED,
            dispatch_attempt=0,
        ).values_list("pk", flat=True)
    )
    cancelled = transition_rows(
        model=CurtailmentTarget,
        machine=TARGET_MACHINE,
        rows=[{"pk": pk} for pk in never_sent],
        to=T.CANCELLED,
        operation="curtailment.target>cancelled (terminate)",
    )
    written_off = list(
        CurtailmentTarget.objects.filter(
            event=event, state__in=TARGET_MACHINE.allowed_from(T.RESTORE_FAILED)
        ).values_list("pk", flat=True)
    )
    failed = transition_rows(
        model=CurtailmentTarget,
        machine=TARGET_MACHINE,
        rows=[{"pk": pk} for pk in written_off],
        to=T.RESTORE_FAILED,
        updates={"last_error": SWEPT_ERROR},
        operation="curtailment.target>restore_failed (terminate)",
    )
    return {
        "targets_swept": len(cancelled) + len(failed),
        "targets_cancelled": len(cancelled),
        "targets_restore_failed": len(failed),
    }
