"""A Hypothesis state machine drives random key-lifecycle calls (migrate, retry, cool-down, re-stake
and verification passes against the chain simulator, refused callers, and a retry or migration on a
separate connection while the schedule runs) and checks after every step that each key is in a
state of its machine, that its audit trail replays to that state, and that no key waits forever."""

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
from fleetops.lib import clock
from fleetops.lib.errors import Conflict, Forbidden
from migrations_app.keys.schedule import restake_tick
from migrations_app.keys.selectors import KeyFilter
from migrations_app.keys.services import (
    key_migrate_to_group,
    key_migration_retry,
    keys_cooldown_reset,
    keys_migration_retry,
)
from migrations_app.keys.verification import verify_tick
from migrations_app.models.keys import (
    KEY_MIGRATION_DUE,
    KEY_MIGRATION_MACHINE,
    STAKE_TX_MACHINE,
    STAKE_TX_PENDING,
    Key,
    OrgKeyConfig,
    StakeTransaction,
)
from tests.migrations_app.keys_fixtures import make_group, make_keys
from tests.transitions import assert_trail_replays

KEYS = 3
SOME_KEYS = st.lists(st.integers(0, KEYS - 1), min_size=1, max_size=KEYS, unique=True)


def on_another_connection(work: Callable[[], Any], errors: list[BaseException]) -> threading.Thread:
    """Run `work` in a thread: Django gives it its own database connection, closed at the end."""

    def run() -> None:
        try:
            work()
        except (Conflict, Forbidden):
            pass
        except BaseException as exc:  # re-raised by the test thread
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.django_db(transaction=True)
def test_the_key_lifecycle_stays_legal_and_every_trail_replays(operator, viewer, wired):
    org = operator.org
    OrgKeyConfig.objects.filter(org=org).update(max_attempts=2)
    groups = [make_group(org, "a"), make_group(org, "b", ["base"])]
    person, onlooker = Actor.for_user(operator.user), Actor.for_user(viewer.user)
    batches = itertools.count()

    class KeyLifecycle(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            Key.objects.all().delete()  # the previous example's keys (their history goes with them)
            wired.knobs(broadcast_reject_rate=0.0, broadcast_fail_rate=0.0)
            self.keys = make_keys(org, KEYS, group=groups[0], start=KEYS * next(batches))

        def ids(self, which: list[int]) -> list[int]:
            return [self.keys[i].pk for i in which]

        def migrate(self, which: list[int], group: int) -> None:
            key_migrate_to_group(
                org=org,
                actor=person,
                target_group_id=groups[group].pk,
                flt=KeyFilter(key_ids=tuple(self.ids(which))),
            )

        @rule(which=SOME_KEYS, group=st.integers(0, 1))
        def migrate_keys(self, which: list[int], group: int) -> None:
            self.migrate(which, group)

        @rule(i=st.integers(0, KEYS - 1))
        def retry_one(self, i: int) -> None:
            try:
                key_migration_retry(key=Key.objects.get(pk=self.keys[i].pk), actor=person, reason="retry")
            except Conflict:
                pass  # neither failed nor retrying: refused, nothing written

        @rule(which=SOME_KEYS)
        def retry_many(self, which: list[int]) -> None:
            keys_migration_retry(org=org, actor=person, key_ids=self.ids(which), reason="bulk retry")

        @rule(mood=st.sampled_from(["healthy", "rejects at CheckTx", "fails at DeliverTx"]))
        def chain_mood(self, mood: str) -> None:
            wired.knobs(
                broadcast_reject_rate=1.0 if mood == "rejects at CheckTx" else 0.0,
                broadcast_fail_rate=1.0 if mood == "fails at DeliverTx" else 0.0,
            )

        @rule()
        def restake_pass(self) -> None:
            clock.advance(timedelta(seconds=31))
            restake_tick()

        @rule(blocks=st.integers(1, 3))
        def verify_pass(self, blocks: int) -> None:
            wired.produce(blocks)
            clock.advance(timedelta(seconds=10))
            verify_tick()

        @rule()
        def engine_cycle(self) -> None:
            """A re-stake pass, two blocks, a verification pass: how an attempt usually ends."""
            clock.advance(timedelta(seconds=31))
            restake_tick()
            wired.produce(2)
            clock.advance(timedelta(seconds=10))
            verify_tick()

        @rule()
        def cool_down(self) -> None:
            clock.advance(timedelta(seconds=61))
            keys_cooldown_reset(cooldown_seconds=60)

        @rule(i=st.integers(0, KEYS - 1))
        def a_viewer_is_refused(self, i: int) -> None:
            before = AuditEvent.objects.filter(action="access.denied").count()
            with pytest.raises(Forbidden):
                key_migration_retry(key=Key.objects.get(pk=self.keys[i].pk), actor=onlooker, reason="x")
            assert AuditEvent.objects.filter(action="access.denied").count() == before + 1

        @rule(which=SOME_KEYS, migrate=st.booleans())
        def operator_acts_while_the_schedule_runs(self, which: list[int], migrate: bool) -> None:
            errors: list[BaseException] = []
            work = (
                (lambda: self.migrate(which, 1))
                if migrate
                else (
                    lambda: keys_migration_retry(org=org, actor=person, key_ids=self.ids(which), reason="r")
                )
            )
            clock.advance(timedelta(seconds=31))
            thread = on_another_connection(work, errors)
            restake_tick()
            thread.join(30)
            assert not thread.is_alive() and not errors, errors

        @invariant()
        def states_are_legal_and_trails_replay(self) -> None:
            for key in Key.objects.filter(pk__in=[k.pk for k in self.keys]):
                assert key.migration_status in KEY_MIGRATION_MACHINE.states
                assert key.migration_attempts <= key.migration_max_attempts
                assert_trail_replays(key, KEY_MIGRATION_MACHINE)
                pending = StakeTransaction.objects.filter(key=key, status=STAKE_TX_PENDING).count()
                assert pending <= 1
                if key.migration_status in KEY_MIGRATION_DUE and key.migration_next_attempt_at is None:
                    assert pending == 1, f"{key} waits for an attempt that does not exist"
            statuses = set(StakeTransaction.objects.values_list("status", flat=True))
            assert statuses <= set(STAKE_TX_MACHINE.states)

    with clock.frozen(clock.now()):
        run_state_machine_as_test(
            KeyLifecycle,
            settings=settings(
                max_examples=25,
                stateful_step_count=15,
                deadline=None,
                database=None,  # no example database in the work tree
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
            ),
        )
