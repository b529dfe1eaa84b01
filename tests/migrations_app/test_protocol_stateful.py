"""A Hypothesis stateful test of the protocol statuses: random service calls on two protocols —
classify (also two at once on separate connections, and with a classifier that crashes), a
viewer's refused classification, the history and current-state runs (interrupted at once: start,
then fail; the history run also twice at once on separate connections), a run killed right after
its start (left in_progress, resumed by the next one) and the handoff step. After every step, every
status is one of its machine's states and the audit trail of each protocol replays, machine by
machine, to its current state.

Every example registers two fresh classifiers (copies of SEP41 / SEP50 under new ids), so each
example's protocols start at `not_started` with an empty audit trail (audit rows are never deleted).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connection
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from fleetops.audit.actors import Actor
from fleetops.lib.errors import DomainError, Forbidden
from migrations_app.models import (
    CLASSIFICATION_MACHINE,
    CURRENT_STATE_MACHINE,
    HISTORY_MACHINE,
    MigrationStatus,
    Protocol,
)
from migrations_app.protocols import registry, services, status
from migrations_app.protocols.current_state import (
    CURRENT_STATE,
    current_state_migrate,
    current_state_validate,
)
from migrations_app.protocols.history import (
    HISTORY,
    Strategy,
    history_migrate,
    history_validate,
    start_trackers,
)
from migrations_app.protocols.status import CURRENT_STATE_KIND, HISTORY_KIND, MigrationKind
from tests.factories import make_indexed_chain
from tests.transitions import assert_trail_replays

pytestmark = pytest.mark.django_db(transaction=True)
SYSTEM = Actor.system("test:protocol_stateful")
MACHINES = (CLASSIFICATION_MACHINE, HISTORY_MACHINE, CURRENT_STATE_MACHINE)
_ids = itertools.count(1)


def _interrupted() -> threading.Event:
    """A stop signal already set: the run starts (in_progress), stops at its first check and records
    `failed` — the whole start and failure path of the real service, without waiting for a handoff."""
    stop = threading.Event()
    stop.set()
    return stop


def _run_history(protocol_id: str) -> None:
    history_migrate(protocol_ids=[protocol_id], actor=SYSTEM, stop=_interrupted(), poll_seconds=0.01)


def _run_current_state(protocol_id: str) -> None:
    current_state_migrate(
        protocol_id=protocol_id, start_height=1, actor=SYSTEM, stop=_interrupted(), poll_seconds=0.01
    )


def _classify(protocol_id: str) -> None:
    protocol = Protocol.objects.select_related("chain__org").get(protocol_id=protocol_id)
    services.protocol_classify(protocol=protocol, actor=SYSTEM)


def _start_then_die(strategy: Strategy, protocol_id: str) -> None:
    """What a worker killed right after the start of its run leaves behind: in_progress."""
    if strategy is HISTORY:
        _, protocols, _ = history_validate(protocol_ids=[protocol_id])
    else:
        _, protocol, _ = current_state_validate(protocol_id=protocol_id, start_height=1)
        protocols = [] if protocol is None else [protocol]
    if protocols:
        updates = {} if strategy is HISTORY else {"current_state_start_height": 1}
        start_trackers(
            strategy=strategy, protocols=protocols, cursor_at=0, actor=SYSTEM, updates=updates, metadata={}
        )


def _tolerating_refusals(call: Callable[[str], Any], protocol_id: str) -> None:
    # Refused (not classified, already done, another run holds the lock, lost the race) or
    # interrupted: each is a legal outcome; the invariants check what was written.
    try:
        call(protocol_id)
    except DomainError:
        pass


def _at_once(call: Callable[[str], Any], protocol_id: str) -> None:
    """Run `call` in a thread (its own database connection) while this thread runs it too."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            _tolerating_refusals(call, protocol_id)
        except BaseException as exc:  # handed to the test
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    _tolerating_refusals(call, protocol_id)
    thread.join(30)
    assert not thread.is_alive(), "the concurrent call did not finish"
    assert not errors, errors


class ProtocolStatuses(RuleBasedStateMachine):
    chain: Any = None
    viewer: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        # (protocol id, migration kind) found in_progress after the last step.
        self.running: list[tuple[str, MigrationKind]] = []

    @initialize()
    def register_two_fresh_protocols(self) -> None:
        n = next(_ids)
        for base in ("SEP41", "SEP50"):
            spec = registry.get(base)
            assert spec is not None
            copy = registry.register(dataclasses.replace(spec, id=f"{base}T{n}"))
            self.ids.append(
                services.protocol_register(protocol_id=copy.id, chain=self.chain, actor=SYSTEM).protocol_id
            )
        # Classified through the service, so the migrations are reachable from the first step.
        _classify(self.ids[0])

    protocol = st.sampled_from([0, 1])

    def _id(self, i: int) -> str:
        return self.ids[i]

    @rule(i=protocol)
    def classify(self, i: int) -> None:
        _tolerating_refusals(_classify, self._id(i))

    @rule(i=protocol)
    def classify_twice_at_once(self, i: int) -> None:
        _at_once(_classify, self._id(i))

    @rule(i=protocol)
    def classify_with_a_broken_classifier(self, i: int) -> None:
        real = services._classify_contracts

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("classifier exploded")

        services._classify_contracts = broken
        try:
            _tolerating_refusals(_classify, self._id(i))
        finally:
            services._classify_contracts = real

    @rule(i=protocol)
    def a_viewer_asks_to_classify(self, i: int) -> None:
        protocol = Protocol.objects.select_related("chain__org").get(protocol_id=self._id(i))
        with pytest.raises(Forbidden):
            services.protocol_classify(protocol=protocol, actor=Actor.for_user(self.viewer.user))

    @rule(i=protocol)
    def run_history(self, i: int) -> None:
        _tolerating_refusals(_run_history, self._id(i))

    @rule(i=protocol)
    def run_history_twice_at_once(self, i: int) -> None:
        _at_once(_run_history, self._id(i))

    @rule(i=protocol)
    def run_current_state(self, i: int) -> None:
        _tolerating_refusals(_run_current_state, self._id(i))

    @rule(i=protocol, strategy=st.sampled_from([HISTORY, CURRENT_STATE]))
    def a_run_dies_after_its_start(self, i: int, strategy: Strategy) -> None:
        _tolerating_refusals(lambda pid: _start_then_die(strategy, pid), self._id(i))

    @rule(i=protocol, kind=st.sampled_from([HISTORY_KIND, CURRENT_STATE_KIND]))
    def hand_off(self, i: int, kind: MigrationKind) -> None:
        # The run's last step once live ingestion took over (only from in_progress: a lost race else).
        protocol = Protocol.objects.select_related("chain__org").get(protocol_id=self._id(i))
        _tolerating_refusals(
            lambda _: status.migration_complete(protocol=protocol, kind=kind, actor=SYSTEM),
            protocol.protocol_id,
        )

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data())
    def hand_off_a_running_migration(self, data: st.DataObject) -> None:
        pid, kind = data.draw(st.sampled_from(self.running))
        protocol = Protocol.objects.select_related("chain__org").get(protocol_id=pid)
        status.migration_complete(protocol=protocol, kind=kind, actor=SYSTEM)  # nobody else runs it
        assert getattr(Protocol.objects.get(protocol_id=pid), kind.status_field) == MigrationStatus.SUCCESS

    @invariant()
    def every_status_is_a_state_and_every_trail_replays(self) -> None:
        self.running = []
        for pid in self.ids:
            protocol = Protocol.objects.get(protocol_id=pid)
            for kind in (HISTORY_KIND, CURRENT_STATE_KIND):
                if getattr(protocol, kind.status_field) == MigrationStatus.IN_PROGRESS:
                    self.running.append((pid, kind))
            for machine in MACHINES:
                assert getattr(protocol, machine.field) in machine.states
                assert_trail_replays(protocol, machine)
            # A history or current-state run needs a successful classification first.
            if protocol.classification_status == MigrationStatus.NOT_STARTED:
                assert protocol.history_migration_status == MigrationStatus.NOT_STARTED
                assert protocol.current_state_migration_status == MigrationStatus.NOT_STARTED


@pytest.fixture
def fresh_specs() -> Iterator[None]:
    before = set(registry._specs)
    yield
    for spec_id in set(registry._specs) - before:
        registry._specs.pop(spec_id)


def test_random_service_calls_keep_every_status_legal_and_every_trail_replayable(org, viewer, fresh_specs):
    ProtocolStatuses.chain = make_indexed_chain(org, blocks=12)
    ProtocolStatuses.viewer = viewer
    run_state_machine_as_test(
        ProtocolStatuses,
        settings=settings(
            max_examples=25,
            stateful_step_count=15,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )
