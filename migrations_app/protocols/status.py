"""Every write of a protocol's three status columns, through the transition kernel.

One named step per edge group, each a compare-and-set (`fleetops.lib.transition.transition`) with
its audit row in the same transaction, the allowed from-states read from the machines declared in
`migrations_app.models.protocols`:

- classification (`CLASSIFICATION_MACHINE`): `classification_start` (not_started | success | failed,
  or an in_progress left stale -> in_progress), `classification_succeed` and `classification_fail`
  (in_progress -> success | failed);
- the history and current-state migrations (`HISTORY_MACHINE`, `CURRENT_STATE_MACHINE`, described
  by one `MigrationKind` each): `migration_start` (not_started | failed | in_progress -> in_progress;
  in_progress is a run killed mid-way, resumed by the run that now holds its advisory lock),
  `migration_complete` and `migration_fail` (in_progress -> success | failed).

Roles. Starting is an admin's edge; the outcome edges are engine edges taken by the run an admin
started. A run is authorized once, before its first transaction: `classification_start` checks its
edge itself (the kernel's check, audited `access.denied` on refusal), a migration run calls
`migration_authorize` before the transaction that creates its cursors and calls `migration_start`
(a denial inside that transaction would roll back with it). The later steps of the run pass
`check_role=False`: the run is the engine, acting (and audited) as whoever started it.

A lost compare-and-set raises `RaceLost`, counted once by the kernel
(`fleetops_platform_race_lost_total{operation="<machine>><to>"}`); callers decide what it means.
Every step also bumps `updated_at` (`.update()` skips `auto_now`), which the stale-classification
rule reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db.models import Q

from fleetops.audit.actors import Actor
from fleetops.lib import clock
from fleetops.lib.machine import Machine
from fleetops.lib.transition import Moved, authorize, transition
from migrations_app.models import (
    CLASSIFICATION_MACHINE,
    CURRENT_STATE_MACHINE,
    HISTORY_MACHINE,
    MigrationStatus,
    Protocol,
)

ERROR_CAP = 2000  # stored on the protocol
ERROR_AUDIT_CAP = 500  # in the audit row's metadata
# A classification is a few queries over the stored events, minutes at worst: one left `in_progress`
# (row untouched) this long had its process die mid-way, and may be started again.
CLASSIFICATION_STALE_AFTER = timedelta(minutes=30)
# Startable at any time from these (every way into in_progress but the stale self-loop).
CLASSIFICATION_STARTABLE = tuple(
    s
    for s in CLASSIFICATION_MACHINE.allowed_from(MigrationStatus.IN_PROGRESS)
    if s != MigrationStatus.IN_PROGRESS
)


@dataclass(frozen=True)
class MigrationKind:
    """One of the two migrations: its machine (and so its status column), its error column, and the
    name in its audit actions (`protocol.<name>_started | _completed | _failed`)."""

    name: str
    machine: Machine
    error_field: str

    @property
    def status_field(self) -> str:
        return self.machine.field


HISTORY_KIND = MigrationKind("history", HISTORY_MACHINE, "history_error")
CURRENT_STATE_KIND = MigrationKind("current_state", CURRENT_STATE_MACHINE, "current_state_error")


# --- classification ---------------------------------------------------------------------------------


def classification_startable_q() -> Q:
    """Protocols whose classification may start now (for a request's early refusal)."""
    stale = clock.now() - CLASSIFICATION_STALE_AFTER
    return Q(classification_status__in=CLASSIFICATION_STARTABLE) | Q(
        classification_status=MigrationStatus.IN_PROGRESS, updated_at__lt=stale
    )


def classification_start(*, protocol: Protocol, actor: Actor) -> Moved:
    """-> in_progress, from the state the caller read: any startable one, or in_progress once it is
    stale (`CLASSIFICATION_STALE_AFTER`). `RaceLost` when another process runs it (or moved it)."""
    now = clock.now()
    current = protocol.classification_status
    if current in CLASSIFICATION_STARTABLE:
        # The state the caller read first: a refusal names the edge the actor asked for.
        expect: Sequence[str] = (current, *(s for s in CLASSIFICATION_STARTABLE if s != current))
        where: dict[str, Any] = {}
    else:
        # Taking over a run whose process died: only if nobody touched the row since the threshold.
        expect = (current,)
        where = {"updated_at__lt": now - CLASSIFICATION_STALE_AFTER}
    return transition(
        protocol,
        machine=CLASSIFICATION_MACHINE,
        to=MigrationStatus.IN_PROGRESS,
        actor=actor,
        org=protocol.chain.org,
        action="protocol.classification_started",
        expect=expect,
        where=where,
        updates={"updated_at": now},
    )


def classification_succeed(
    *, protocol: Protocol, actor: Actor, accepted: int, rejected: Sequence[str]
) -> Moved:
    """in_progress -> success (engine step of an authorized run). Run it in the transaction that
    stores the accepted contracts, so a lost race rolls them back."""
    now = clock.now()
    return transition(
        protocol,
        machine=CLASSIFICATION_MACHINE,
        to=MigrationStatus.SUCCESS,
        actor=actor,
        org=protocol.chain.org,
        action="protocol.classified",
        expect=CLASSIFICATION_MACHINE.allowed_from(MigrationStatus.SUCCESS),
        updates={"classified_at": now, "classification_error": "", "updated_at": now},
        metadata={"accepted": accepted, "rejected": list(rejected[:50])},
        check_role=False,
    )


def classification_fail(*, protocol: Protocol, actor: Actor, error: str) -> Moved:
    """in_progress -> failed with the error (engine step of an authorized run)."""
    return transition(
        protocol,
        machine=CLASSIFICATION_MACHINE,
        to=MigrationStatus.FAILED,
        actor=actor,
        org=protocol.chain.org,
        action="protocol.classification_failed",
        expect=CLASSIFICATION_MACHINE.allowed_from(MigrationStatus.FAILED),
        updates={"classification_error": error[:ERROR_CAP], "updated_at": clock.now()},
        metadata={"error": error[:ERROR_AUDIT_CAP]},
        check_role=False,
    )


# --- migrations -------------------------------------------------------------------------------------


def migration_authorize(*, protocols: Sequence[Protocol], kind: MigrationKind, actor: Actor) -> None:
    """Check (audited) that `actor` may start or resume `kind` on every protocol: every edge into
    in_progress that `migration_start` may take. Call it before the transaction of the start."""
    for protocol in protocols:
        # The state the caller read first: a refusal names the edge the actor asked for.
        current = getattr(protocol, kind.status_field)
        sources = kind.machine.allowed_from(MigrationStatus.IN_PROGRESS)
        for source in sorted(sources, key=lambda s: s != current):
            authorize(
                machine=kind.machine,
                source=source,
                to=MigrationStatus.IN_PROGRESS,
                actor=actor,
                org=protocol.chain.org,
                target=protocol,
            )


def migration_start(
    *,
    protocol: Protocol,
    kind: MigrationKind,
    actor: Actor,
    updates: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Moved:
    """not_started | failed | in_progress -> in_progress, clearing the error. The caller holds the
    migration's advisory lock (so an in_progress row is a dead run's) and called
    `migration_authorize` before its transaction; `RaceLost` when it was completed meanwhile."""
    return transition(
        protocol,
        machine=kind.machine,
        to=MigrationStatus.IN_PROGRESS,
        actor=actor,
        org=protocol.chain.org,
        action=f"protocol.{kind.name}_started",
        expect=kind.machine.allowed_from(MigrationStatus.IN_PROGRESS),
        updates={kind.error_field: "", "updated_at": clock.now(), **dict(updates or {})},
        metadata=metadata,
        check_role=False,
    )


def migration_complete(
    *,
    protocol: Protocol,
    kind: MigrationKind,
    actor: Actor,
    updates: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Moved:
    """in_progress -> success once live ingestion took the protocol over (engine step of the run)."""
    return transition(
        protocol,
        machine=kind.machine,
        to=MigrationStatus.SUCCESS,
        actor=actor,
        org=protocol.chain.org,
        action=f"protocol.{kind.name}_completed",
        expect=kind.machine.allowed_from(MigrationStatus.SUCCESS),
        updates={kind.error_field: "", "updated_at": clock.now(), **dict(updates or {})},
        metadata=metadata,
        check_role=False,
    )


def migration_fail(
    *,
    protocol: Protocol,
    kind: MigrationKind,
    actor: Actor,
    error: str,
    metadata: Mapping[str, Any] | None = None,
) -> Moved:
    """in_progress -> failed with the error (engine step of the run); a re-run resumes."""
    return transition(
        protocol,
        machine=kind.machine,
        to=MigrationStatus.FAILED,
        actor=actor,
        org=protocol.chain.org,
        action=f"protocol.{kind.name}_failed",
        expect=kind.machine.allowed_from(MigrationStatus.FAILED),
        updates={kind.error_field: error[:ERROR_CAP], "updated_at": clock.now()},
        metadata={**dict(metadata or {}), "error": error[:ERROR_AUDIT_CAP]},
        check_role=False,
    )
