"""Test helpers generated from the state machines (`fleetops.lib.machine`).

Each domain's transition tests parametrize over `pair_params(machine)`: a legal pair is taken
through a named service, an illegal one must be refused by the kernel without a write.
"""

from __future__ import annotations

from typing import Any, TypeVar

import pytest
from django.db import models

from fleetops.access.models import Organization
from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib.machine import Machine, State
from fleetops.lib.transition import IllegalTransition, transition


def pair_params(machine: Machine) -> list[Any]:
    """Every (from, to) pair of the machine's states, with readable ids."""
    return [pytest.param(a, b, id=f"{a}->{b}") for a, b in machine.pairs()]


def edge_keys(machine: Machine) -> set[tuple[State, State]]:
    return {(e.source, e.target) for e in machine.edges}


M = TypeVar("M", bound=models.Model)


def set_state(obj: M, machine: Machine, state: State, **fields: Any) -> M:
    """Arrange a test object in `state` (a plain update: test set-up only, never product code)."""
    type(obj)._default_manager.filter(pk=obj.pk).update(**{machine.field: state}, **fields)
    obj.refresh_from_db()
    return obj


def _trail(obj: models.Model) -> models.QuerySet[AuditEvent]:
    meta = obj._meta
    return AuditEvent.objects.filter(target_type=f"{meta.app_label}.{meta.model_name}", target_id=str(obj.pk))


def assert_refused_without_write(
    obj: models.Model, *, machine: Machine, to: State, actor: Actor, org: Organization | None
) -> None:
    """The kernel refuses an illegal move: `IllegalTransition`, the row unchanged, no audit row."""
    model = type(obj)
    before = model._default_manager.filter(pk=obj.pk).values().get()
    audit_before = AuditEvent.objects.count()
    with pytest.raises(IllegalTransition):
        transition(obj, machine=machine, to=to, actor=actor, org=org, action="test.illegal", check_role=False)
    assert model._default_manager.filter(pk=obj.pk).values().get() == before
    assert AuditEvent.objects.count() == audit_before


def audit_moves(obj: models.Model, machine: Machine) -> list[tuple[State, State]]:
    """The (before, after) state moves recorded in the object's audit rows, oldest first."""
    moves = []
    for changes in _trail(obj).order_by("id").values_list("changes", flat=True):
        move = (changes or {}).get(machine.field)
        if move is not None:
            moves.append((move[0], move[1]))
    return moves


def assert_trail_replays(obj: models.Model, machine: Machine) -> None:
    """Replaying the object's audit trail from the machine's initial state reaches its current state."""
    current = type(obj)._default_manager.filter(pk=obj.pk).values_list(machine.field, flat=True).get()
    assert machine.replay(audit_moves(obj, machine)) == current
