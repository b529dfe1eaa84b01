"""A Hypothesis state machine drives the indexer mode on two chains: the writer's steps the runner
takes (`indexer.modes`: follow a quiet mode, degrade, a poison height, halt, unhalt after a rollback
request, a deposed writer with a stale lease), the operator services (pause, resume, retry poison,
an operator refused), and an admin acting on a separate connection while the writer steps.

After every step it checks, for each chain:
- the mode is a state of `MODE_MACHINE`;
- the audit trail replays: the audited mode moves are edges of the machine, and between two of them
  (from the initial state to the first, after the last to the current mode) the mode only walked
  quiet edges, which are not audited by design (see `MODE_MACHINE`). The gaps are filled with the
  one quiet edge that joins them and the whole walk is replayed by `MODE_MACHINE.replay`, so a
  missing audit row for any move into or out of degraded or halted breaks it;
- every change into or out of degraded / halted that `fleetops_indexer_mode_changes_total`
  counted has its audit row, and no quiet change has one (no flooding);
- the `paused` flag's audit rows replay from False to its current value.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib.errors import Conflict, Forbidden, RaceLost
from fleetops.lib.transition import IllegalTransition
from fleetops.observability.leases import LeaseGrant, LeaseLost, lease_acquire
from indexer import services
from indexer.blocks import WRITER, lease_name
from indexer.metrics import MODE_CHANGES
from indexer.models import MODE_MACHINE, MODE_QUIET, Chain, IndexerState, Mode, mode_edge_audited
from indexer.modes import indexer_degrade, indexer_halt, indexer_mode_follow, indexer_unhalt
from tests.indexer.mode_trail import assert_mode_trail_replays, assert_paused_trail_replays, mode_walk
from tests.transitions import audit_moves

CHAINS = 2
SOME_CHAIN = st.integers(0, CHAINS - 1)
QUIET = st.sampled_from(MODE_QUIET)
_examples = itertools.count()


LOUD_EDGES = {(e.source, e.target) for e in MODE_MACHINE.edges if mode_edge_audited(e.source, e.target)}


def counted_loud_changes(slug: str) -> int:
    # The counter's own samples, not the whole registry's (which every test of the worker grows).
    total = 0.0
    for metric in MODE_CHANGES.collect():
        for sample in metric.samples:
            labels = sample.labels
            if (
                sample.name == "fleetops_indexer_mode_changes_total"
                and labels["chain"] == slug
                and (labels["from_mode"], labels["to_mode"]) in LOUD_EDGES
            ):
                total += sample.value
    return int(total)


def on_another_connection(
    work: Callable[[], Any], outcomes: list[Any], start: threading.Barrier
) -> threading.Thread:
    """Run `work` in a thread (its own database connection, closed at the end)."""

    def run() -> None:
        try:
            start.wait()
            outcomes.append(work())
        except (Conflict, RaceLost) as exc:  # a state conflict or a lost race: nothing written
            outcomes.append(exc)
        except BaseException as exc:
            outcomes.append(exc)
            raise
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.django_db(transaction=True)
def test_the_mode_stays_legal_and_its_audit_trail_replays(org, admin_member, operator):
    admin = Actor.for_user(admin_member.user)
    person = Actor.for_user(operator.user)

    class ModeLifecycle(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            n = next(_examples)
            self.chains = [
                Chain.objects.select_related("org").create(org=org, slug=f"m{n}-{i}", chain_id=f"m{n}-{i}")
                for i in range(CHAINS)
            ]
            self.leases: list[LeaseGrant] = []
            for chain in self.chains:
                IndexerState.objects.create(chain=chain)
                grant = lease_acquire(name=lease_name(chain), holder="writer", ttl=timedelta(minutes=10))
                assert grant is not None
                self.leases.append(grant)

        def state(self, i: int) -> IndexerState:
            return IndexerState.objects.get(chain=self.chains[i])

        def writer(self, i: int, step: Callable[..., Any], **kwargs: Any) -> Any:
            return step(
                chain=self.chains[i], state=self.state(i), lease=self.leases[i], actor=WRITER, **kwargs
            )

        # --- the writer's steps ------------------------------------------------------------------

        @rule(i=SOME_CHAIN, to=QUIET)
        def writer_follows_the_chain(self, i: int, to: str) -> None:
            before = self.state(i).mode
            # A halted chain is left only by the operator or a rollback request, never by a step.
            if before == Mode.HALTED or (before != to and not MODE_MACHINE.can(before, to)):
                with pytest.raises(IllegalTransition):
                    self.writer(i, indexer_mode_follow, to=to)
                assert self.state(i).mode == before
                return
            assert self.writer(i, indexer_mode_follow, to=to) is (before != to)
            assert self.state(i).mode == to

        @rule(i=SOME_CHAIN, poison=st.booleans())
        def writer_degrades(self, i: int, poison: bool) -> None:
            before = self.state(i).mode
            counters = {"poison_height": 7, "poison_attempts": 3} if poison else {}
            if before != Mode.DEGRADED and not MODE_MACHINE.can(before, Mode.DEGRADED):
                with pytest.raises(IllegalTransition):
                    self.writer(i, indexer_degrade, error="stalled", updates=counters)
                return
            assert self.writer(i, indexer_degrade, error="stalled", updates=counters) is (
                before != Mode.DEGRADED
            )
            assert self.state(i).mode == Mode.DEGRADED

        @rule(i=SOME_CHAIN)
        def writer_halts(self, i: int) -> None:
            before = self.state(i).mode
            if not MODE_MACHINE.can(before, Mode.HALTED):
                with pytest.raises(IllegalTransition):
                    self.writer(i, indexer_halt, error="reorg deeper than the finality depth")
                return
            self.writer(i, indexer_halt, error="reorg deeper than the finality depth")
            assert self.state(i).mode == Mode.HALTED

        @rule(i=SOME_CHAIN, requested=st.booleans())
        def writer_carries_out_a_rollback_request(self, i: int, requested: bool) -> None:
            # An admin's request (accepted by `indexer_request_rollback`), or none at all.
            IndexerState.objects.filter(chain=self.chains[i]).update(
                rollback_requested_to=3 if requested else None,
                rollback_requested_by="ada" if requested else "",
            )
            before = self.state(i).mode
            if before != Mode.HALTED:
                with pytest.raises(IllegalTransition):
                    self.writer(i, indexer_unhalt, requested_by="ada", to_height=3)
                assert self.state(i).rollback_requested_to == (3 if requested else None)
                return
            if not requested:
                # No request to carry out: the chain stays halted, nothing is written.
                with pytest.raises(RaceLost):
                    self.writer(i, indexer_unhalt, requested_by="ada", to_height=3)
                assert self.state(i).mode == Mode.HALTED
                return
            self.writer(i, indexer_unhalt, requested_by="ada", to_height=3)
            after = self.state(i)
            # The request is cleared in the compare-and-set that leaves halted.
            assert (after.mode, after.rollback_requested_to) == (Mode.CATCHING_UP, None)

        @rule(i=SOME_CHAIN, to=st.sampled_from(MODE_MACHINE.states))
        def a_deposed_writer_writes_nothing(self, i: int, to: str) -> None:
            before = self.state(i)
            stale = LeaseGrant(
                name=self.leases[i].name,
                holder="old",
                token=self.leases[i].token - 1,
                expires_at=before.updated_at,
            )
            if not MODE_MACHINE.can(before.mode, to):
                return
            audit = AuditEvent.objects.count()
            row_before = (before.mode, before.last_error, before.poison_height, before.poison_attempts)
            with pytest.raises(LeaseLost):
                if to == Mode.HALTED:
                    indexer_halt(chain=self.chains[i], state=before, error="late", lease=stale, actor=WRITER)
                elif to == Mode.DEGRADED:
                    indexer_degrade(
                        chain=self.chains[i], state=before, error="late", lease=stale, actor=WRITER
                    )
                elif before.mode == Mode.HALTED:
                    indexer_unhalt(
                        chain=self.chains[i],
                        state=before,
                        lease=stale,
                        actor=WRITER,
                        requested_by="x",
                        to_height=1,
                    )
                else:
                    indexer_mode_follow(chain=self.chains[i], state=before, to=to, lease=stale, actor=WRITER)
            after = self.state(i)
            assert (after.mode, after.last_error, after.poison_height, after.poison_attempts) == row_before
            assert AuditEvent.objects.count() == audit

        # --- the operator ------------------------------------------------------------------------

        @rule(i=SOME_CHAIN)
        def admin_pauses(self, i: int) -> None:
            was = self.state(i).paused
            assert services.indexer_pause(chain=self.chains[i], actor=admin, reason="maintenance") is (
                not was
            )
            assert self.state(i).paused

        @rule(i=SOME_CHAIN)
        def admin_resumes(self, i: int) -> None:
            before = self.state(i)
            changed = services.indexer_resume(chain=self.chains[i], actor=admin, reason="cause fixed")
            assert changed is (before.paused or before.mode == Mode.HALTED)
            after = self.state(i)
            assert not after.paused
            assert after.mode == (Mode.CATCHING_UP if before.mode == Mode.HALTED else before.mode)

        @rule(i=SOME_CHAIN)
        def admin_retries_the_poison_height(self, i: int) -> None:
            before = self.state(i)
            if before.poison_height is None:
                with pytest.raises(Conflict):
                    services.indexer_retry_poison(chain=self.chains[i], actor=admin, reason="fixed")
                return
            assert services.indexer_retry_poison(chain=self.chains[i], actor=admin, reason="fixed")
            after = self.state(i)
            assert after.poison_attempts == 0
            assert after.mode == (Mode.CATCHING_UP if before.mode == Mode.DEGRADED else before.mode)

        @rule(i=SOME_CHAIN)
        def an_operator_is_refused_the_admin_ways_out(self, i: int) -> None:
            before = self.state(i)
            denied = AuditEvent.objects.filter(action="access.denied").count()
            with pytest.raises(Forbidden):
                services.indexer_resume(chain=self.chains[i], actor=person, reason="let me")
            assert (self.state(i).mode, self.state(i).paused) == (before.mode, before.paused)
            assert AuditEvent.objects.filter(action="access.denied").count() == denied + 1

        @rule(
            i=SOME_CHAIN, retry=st.booleans(), step=st.sampled_from(["halt", "degrade", "follow"]), to=QUIET
        )
        def an_admin_acts_on_another_connection_while_the_writer_steps(
            self, i: int, retry: bool, step: str, to: str
        ) -> None:
            chain = self.chains[i]
            start = threading.Barrier(2)
            theirs: list[Any] = []

            def operator_call() -> Any:
                if retry:
                    return services.indexer_retry_poison(chain=chain, actor=admin, reason="race")
                return services.indexer_resume(chain=chain, actor=admin, reason="race")

            thread = on_another_connection(operator_call, theirs, start)
            state = self.state(i)
            start.wait()
            try:
                if step == "halt":
                    indexer_halt(chain=chain, state=state, error="race", lease=self.leases[i], actor=WRITER)
                elif step == "degrade":
                    indexer_degrade(
                        chain=chain, state=state, error="race", lease=self.leases[i], actor=WRITER
                    )
                else:
                    indexer_mode_follow(chain=chain, state=state, to=to, lease=self.leases[i], actor=WRITER)
            except (IllegalTransition, RaceLost):
                pass  # not an edge from the mode it read, or the operator moved it first: nothing written
            thread.join()
            assert len(theirs) == 1
            assert not isinstance(theirs[0], BaseException) or isinstance(theirs[0], Conflict | RaceLost)

        # --- invariants --------------------------------------------------------------------------

        @invariant()
        def the_mode_is_a_state_of_the_machine(self) -> None:
            for i in range(CHAINS):
                assert self.state(i).mode in MODE_MACHINE.states

        @invariant()
        def every_trail_replays_and_every_loud_change_is_audited_once(self) -> None:
            for i, chain in enumerate(self.chains):
                state = self.state(i)
                assert_mode_trail_replays(state)
                assert len(audit_moves(state, MODE_MACHINE)) == counted_loud_changes(chain.slug)
                assert_paused_trail_replays(state)

    run_state_machine_as_test(
        ModeLifecycle,
        settings=settings(
            max_examples=25,
            stateful_step_count=15,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )


def test_mode_walk_leaves_a_gap_open_unless_both_ends_are_quiet():
    # A halt nobody audited: the trail jumps from normal to halted -> catching_up.
    with pytest.raises(ValueError, match="starts at"):
        MODE_MACHINE.replay(mode_walk([(Mode.HALTED, Mode.CATCHING_UP)], Mode.CATCHING_UP))
    # Quiet flapping between audited moves is fine.
    walk = mode_walk([(Mode.IDLE, Mode.DEGRADED), (Mode.DEGRADED, Mode.NORMAL)], Mode.IDLE)
    assert MODE_MACHINE.replay(walk) == Mode.IDLE
