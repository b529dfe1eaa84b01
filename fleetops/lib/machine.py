"""State machines declared once, as data.

A `Machine` names its states (in display order, taken from the model's choices), its legal edges,
its terminal states, and for every edge the lowest role a person needs to take it. Everything else
reads the declaration: the model's check constraint (`Machine.constraint`), the transition kernel
(`fleetops.lib.transition`, which derives the allowed from-states of a move from here), the tests
generated for every (from, to) pair, and the diagrams in `docs/state-machines.md` and on each admin
detail page. No call site retypes a state list.

An edge's `role` is what a *person* needs (viewer, operator or admin in the object's
organization). `role=None` marks an engine edge: only the portal's own processes (the scheduler and
system actors, see `fleetops.access.roles`) take it, e.g. the reconciler activating an event.

Declaring::

    EVENT_MACHINE = Machine.declare(
        "curtailment.event",
        EventState,
        field="state",
        initial=EventState.PENDING,
        edges={
            EventState.PENDING: {EventState.ACTIVE: None, EventState.CANCELLED: "operator"},
            ...
        },
    )

Importing a module that declares a machine registers it (`machines()` lists them all), so an app's
`models.py` is the one place its machines live.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from django.db.models import Q

State = Any  # a str (TextChoices) or an int (IntegerChoices) value

_REGISTRY: dict[str, Machine] = {}


@dataclass(frozen=True)
class Edge:
    source: State
    target: State
    # The lowest role a person needs to take this edge; None: only the portal's own processes.
    role: str | None = None
    # A person's edge that the portal's own processes take too (e.g. the indexer writer leaving
    # `halted` to carry out a rollback an admin already requested).
    engine_too: bool = False

    @property
    def engine_only(self) -> bool:
        return self.role is None

    @property
    def engine_may(self) -> bool:
        return self.role is None or self.engine_too


@dataclass(frozen=True)
class Gate:
    """An edge's rule when it is more than a role: `Gate(Role.ADMIN, engine_too=True)`."""

    role: str | None
    engine_too: bool = False


def engine_too(role: str) -> Gate:
    """A person needs `role`; the scheduler and system actors may take the edge as well."""
    return Gate(role=str(role), engine_too=True)


def _derived() -> Any:
    # Indexes built by `declare` from the edges; not part of equality or repr.
    return dataclasses.field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Machine:
    name: str
    field: str
    states: tuple[State, ...]
    labels: Mapping[State, str]
    initial: State
    edges: tuple[Edge, ...]
    terminal: frozenset[State]
    description: str = ""
    _into: Mapping[State, tuple[State, ...]] = dataclasses.field(
        default_factory=dict, repr=False, compare=False
    )
    _out: Mapping[State, tuple[State, ...]] = dataclasses.field(
        default_factory=dict, repr=False, compare=False
    )
    _edge: Mapping[tuple[State, State], Edge] = dataclasses.field(
        default_factory=dict, repr=False, compare=False
    )

    @classmethod
    def declare(
        cls,
        name: str,
        choices: Iterable[Any],
        *,
        field: str,
        initial: State,
        edges: Mapping[State, Mapping[State, str | Gate | None]],
        terminal: Iterable[State] | None = None,
        description: str = "",
        register: bool = True,
    ) -> Machine:
        """Build a machine from `{from: {to: role | None | Gate}}` and register it under `name`.

        `terminal` defaults to the states with no way out; when given, it must match them exactly,
        so a declaration cannot claim a state is final and still leave an edge out of it.
        """
        members = list(choices)
        states = tuple(_plain(m) for m in members)
        labels = {_plain(m): str(getattr(m, "label", m)) for m in members}
        edge_list: list[Edge] = []
        for source, targets in edges.items():
            for target, rule in targets.items():
                gate = rule if isinstance(rule, Gate) else Gate(None if rule is None else str(rule))
                edge_list.append(
                    Edge(
                        _plain(source),
                        _plain(target),
                        None if gate.role is None else str(gate.role),
                        engine_too=gate.engine_too and gate.role is not None,
                    )
                )
        unknown = {e.source for e in edge_list} | {e.target for e in edge_list} | {_plain(initial)}
        unknown -= set(states)
        if unknown:
            raise ValueError(f"machine {name}: edges name unknown states {sorted(map(str, unknown))}")
        with_exit = {e.source for e in edge_list if e.target != e.source}
        derived_terminal = frozenset(s for s in states if s not in with_exit)
        if terminal is not None and frozenset(_plain(t) for t in terminal) != derived_terminal:
            raise ValueError(
                f"machine {name}: terminal states {sorted(map(str, terminal))} do not match the edges "
                f"(states without a way out: {sorted(map(str, derived_terminal))})"
            )
        into: dict[State, list[State]] = {s: [] for s in states}
        out: dict[State, list[State]] = {s: [] for s in states}
        for e in edge_list:
            into[e.target].append(e.source)
            out[e.source].append(e.target)
        order = {s: i for i, s in enumerate(states)}
        machine = cls(
            name=name,
            field=field,
            states=states,
            labels=labels,
            initial=_plain(initial),
            edges=tuple(edge_list),
            terminal=derived_terminal,
            description=description,
            _into={s: tuple(sorted(v, key=order.__getitem__)) for s, v in into.items()},
            _out={s: tuple(sorted(v, key=order.__getitem__)) for s, v in out.items()},
            _edge={(e.source, e.target): e for e in edge_list},
        )
        if register:
            if name in _REGISTRY and _REGISTRY[name] != machine:
                raise ValueError(f"machine {name} is declared twice")
            _REGISTRY[name] = machine
        return machine

    # --- reading the declaration ---------------------------------------------------------------

    def allowed_from(self, target: State) -> tuple[State, ...]:
        """Every state from which `target` may be entered (empty: it can only be the initial one)."""
        return self._into.get(_plain(target), ())

    def targets(self, source: State) -> tuple[State, ...]:
        return self._out.get(_plain(source), ())

    def can(self, source: State, target: State) -> bool:
        return (_plain(source), _plain(target)) in self._edge

    def edge(self, source: State, target: State) -> Edge | None:
        return self._edge.get((_plain(source), _plain(target)))

    @property
    def non_terminal(self) -> tuple[State, ...]:
        return tuple(s for s in self.states if s not in self.terminal)

    def is_terminal(self, state: State) -> bool:
        return _plain(state) in self.terminal

    def label(self, state: State) -> str:
        return self.labels.get(_plain(state), str(state))

    def pairs(self) -> list[tuple[State, State]]:
        """Every (from, to) pair of states, legal or not: what the generated tests walk."""
        return [(a, b) for a in self.states for b in self.states]

    def constraint_q(self) -> Any:
        """`Q(<field>__in=<states>)`, for the model's CheckConstraint."""
        return Q(**{f"{self.field}__in": list(self.states)})

    def replay(self, moves: Iterable[tuple[State, State]]) -> State:
        """Walk `moves` (from, to) from the initial state; raise if one is not legal or does not
        start where the previous one ended. Returns the state reached (audit trail replays)."""
        at = self.initial
        for source, target in moves:
            source, target = _plain(source), _plain(target)
            if source != at:
                raise ValueError(f"{self.name}: a move starts at {source!r} but the object was at {at!r}")
            if not self.can(source, target):
                raise ValueError(f"{self.name}: {source!r} -> {target!r} is not an edge")
            at = target
        return at


def _plain(value: Any) -> State:
    """The raw value of a choices member (so `"pending"` and `EventState.PENDING` are one key)."""
    if isinstance(value, Enum):
        return value.value
    return value


def machines() -> list[Machine]:
    """Every declared machine, by name."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def machine(name: str) -> Machine:
    return _REGISTRY[name]
