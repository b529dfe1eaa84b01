"""The curtailment reconciler: one tick drives every live event of every organization.

Rules this module keeps (see DESIGN.md):
1. One tick at a time across processes: a PostgreSQL advisory lock; a tick that cannot take it skips.
2. DISPATCHING is written and committed before any gateway call; a DISPATCHING row seen by a later
   tick is an orphan of a crashed one and is redispatched with the command id it was first sent
   with (stored on the target), so the gateway deduplicates it.
3. Every target write is one set-based compare-and-set statement that also locks the parent event
   row in its expected state; rows that did not change lost a race and are counted, and the tick
   does not act on them.
4. Commands go out in chunks (CURTAIL_CHUNK_SIZE devices) with bounded concurrency; database round
   trips per tick grow with chunks, not with targets.
5. Each event is processed in isolation: one event's failure is counted and logged, and the tick
   goes on with the next. The heartbeat is written at the end of every tick, even a failed one.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from curtailment.gateway import CommandResult, FleetGateway, GatewayError, Sample, chunked
from curtailment.metrics import COMMANDS, TARGET_WRITE_FAILURES, TICK_DURATION, TICK_FAILURES
from curtailment.models import (
    EVENT_NON_TERMINAL,
    TARGET_TERMINAL,
    CurtailmentEvent,
    CurtailmentTarget,
    DesiredState,
    Device,
    EventState,
    OrgCurtailmentConfig,
    TargetState,
)
from curtailment.selector import STALE_AFTER
from curtailment.services import curtailment_config_get, event_begin_restore
from curtailment.telemetry import is_curtailed, is_restored
from fleetops.audit.actors import Actor
from fleetops.audit.services import record
from fleetops.lib import clock
from fleetops.lib.cas import note_race_lost
from fleetops.observability.heartbeats import heartbeat_beat

log = logging.getLogger(__name__)

HEARTBEAT = "curtailment.reconciler"
ACTOR = Actor.scheduler(HEARTBEAT)
LOCK_KEY = 0x6375_7274_6169_6C  # "curtail"
MAX_RETRIES = 3
RESTORE_TIMEOUT = timedelta(seconds=300)
TICK_BUDGET_SECONDS = 60

T = TargetState
TARGETS = CurtailmentTarget._meta.db_table
EVENTS = CurtailmentEvent._meta.db_table


GatewayFactory = Callable[[OrgCurtailmentConfig], FleetGateway]
Reading = tuple[float | None, float | None, datetime | None]  # power W, hash rate H/s, taken at


def default_gateway(config: OrgCurtailmentConfig) -> FleetGateway:
    return FleetGateway(config.gateway_url)


@dataclass
class TickResult:
    ran: bool
    live_events: int = 0
    failures: int = 0
    duration: float = 0.0
    skipped_events: int = 0
    races_lost: int = 0


@dataclass
class Row:
    """Per-target values for one set-based write."""

    id: int
    n: int = 0
    power: float | None = None
    at: datetime | None = None
    text: str = ""


# --- the tick ---------------------------------------------------------------------------------


def reconcile_tick(*, gateway_for: GatewayFactory = default_gateway) -> TickResult:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [LOCK_KEY])
        (locked,) = cursor.fetchone()
    if not locked:
        log.info("another reconciler tick is running; skipping")
        return TickResult(ran=False)
    try:
        return _tick(gateway_for)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [LOCK_KEY])


def _tick(gateway_for: GatewayFactory) -> TickResult:
    started = time.monotonic()
    result = TickResult(ran=True)
    tick_id = uuid.uuid4().hex
    gateways: dict[int, FleetGateway] = {}
    try:
        try:
            events = list(CurtailmentEvent.objects.filter(state__in=EVENT_NON_TERMINAL).select_related("org"))
        except Exception:
            log.exception("listing live curtailment events failed")
            TICK_FAILURES.inc()
            result.failures += 1
            events = []
        result.live_events = len(events)
        for event in events:
            if time.monotonic() - started > TICK_BUDGET_SECONDS:
                result.skipped_events += 1
                continue
            try:
                config = curtailment_config_get(org=event.org)
                if event.org_id not in gateways:
                    gateways[event.org_id] = gateway_for(config)
                EventRun(event=event, config=config, gateway=gateways[event.org_id], result=result).run()
            except Exception:
                log.exception("reconciling curtailment event %s failed", event.uuid)
                TICK_FAILURES.inc()
                result.failures += 1
    finally:
        for gateway in gateways.values():
            gateway.close()
        result.duration = time.monotonic() - started
        TICK_DURATION.observe(result.duration)
        heartbeat_beat(
            name=HEARTBEAT,
            ok=result.failures == 0,
            duration=result.duration,
            error=f"{result.failures} failure(s) in tick {tick_id}" if result.failures else "",
            details={
                "tick_id": tick_id,
                "live_events": result.live_events,
                "skipped_for_budget": result.skipped_events,
                "races_lost": result.races_lost,
            },
        )
    return result


# --- one event ------------------------------------------------------------------------------------


@dataclass
class EventRun:
    event: CurtailmentEvent
    config: OrgCurtailmentConfig
    gateway: FleetGateway
    result: TickResult
    now: datetime = field(default_factory=clock.now)

    def run(self) -> None:
        state = self.event.state
        if state == EventState.PENDING:
            self.pending()
        elif state == EventState.ACTIVE:
            self.active()
        elif state == EventState.RESTORING:
            self.restoring()

    # The phase's targets, fresh from the database.
    def targets(self, *states: str) -> list[CurtailmentTarget]:
        qs = CurtailmentTarget.objects.filter(event=self.event)
        if states:
            qs = qs.filter(state__in=states)
        return list(qs.order_by("id"))

    @property
    def desired(self) -> str:
        return DesiredState.ACTIVE if self.event.state == EventState.RESTORING else DesiredState.CURTAILED

    # --- states ----------------------------------------------------------------------------------

    def pending(self) -> None:
        # Confirm first: a confirmation timeout frees its target for redispatch in this same tick.
        self.confirm_curtailed(self.targets(T.DISPATCHED))
        sent = self.dispatch(self.targets(T.PENDING, T.DISPATCHING), kind="curtail", fail_state=T.PENDING)
        self.confirm_curtailed([t for t in self.targets(T.DISPATCHED) if t.id in sent])
        self.maybe_activate()

    def active(self) -> None:
        if self.enforce_max_duration():
            return
        targets = self.targets(T.CONFIRMED, T.DISPATCHED, T.DISPATCHING, T.DRIFTED)
        confirmed = [t for t in targets if t.state == T.CONFIRMED]
        dispatched = [t for t in targets if t.state == T.DISPATCHED]
        drifted = self.check_drift(confirmed)
        self.confirm_curtailed(dispatched)
        redo = [t for t in targets if t.state in (T.DISPATCHING, T.DRIFTED)] + drifted
        exhausted = [t for t in redo if t.retry_count >= MAX_RETRIES]
        self.fail(
            exhausted, "retry budget exhausted", fail_state=T.DRIFTED, from_states=(T.DISPATCHING, T.DRIFTED)
        )
        self.dispatch([t for t in redo if t.retry_count < MAX_RETRIES], kind="curtail", fail_state=T.DRIFTED)

    def restoring(self) -> None:
        self.confirm_restored(self.targets(T.DISPATCHED))
        if self.maybe_complete():
            return
        self.maybe_claim_restore_batch()

    # --- curtail phase ---------------------------------------------------------------------------

    def confirm_curtailed(self, dispatched: list[CurtailmentTarget]) -> None:
        if not dispatched:
            return
        readings = self.readings(dispatched)
        confirm, timed_out = [], []
        timeout = timedelta(seconds=self.config.curtail_confirm_timeout_sec)
        for t in dispatched:
            power, hashrate, at = readings.get(t.device_id, (None, None, None))
            if is_curtailed(power, t.baseline_power_w, hashrate, require_evidence=True):
                confirm.append(Row(t.id, power=power, at=at))
            elif t.last_dispatched_at is not None and self.now - t.last_dispatched_at > timeout:
                timed_out.append(t)
        self.write(
            confirm,
            from_states=(T.DISPATCHED,),
            sets="state = 'confirmed', confirmed_at = %s, observed_power_w = v.power, "
            "observed_at = v.at, retry_count = 0",
            set_params=[self.now],
        )
        self.fail(
            timed_out, "curtail confirmation timeout", fail_state=T.PENDING, from_states=(T.DISPATCHED,)
        )

    def check_drift(self, confirmed: list[CurtailmentTarget]) -> list[CurtailmentTarget]:
        if not confirmed:
            return []
        readings = self.readings(confirmed)
        still: list[tuple[Row, CurtailmentTarget]] = []
        drifted: list[tuple[Row, CurtailmentTarget]] = []
        for t in confirmed:
            power, hashrate, at = readings.get(t.device_id, (None, None, None))
            row = Row(t.id, power=power, at=at)
            (
                still
                if is_curtailed(power, t.baseline_power_w, hashrate, require_evidence=False)
                else drifted
            ).append((row, t))
        self.write(
            [r for r, _ in still],
            from_states=(T.CONFIRMED,),
            sets="observed_power_w = COALESCE(v.power, t.observed_power_w), "
            "observed_at = COALESCE(v.at, t.observed_at)",
        )
        written = self.write(
            [r for r, _ in drifted],
            from_states=(T.CONFIRMED,),
            sets="state = 'drifted', observed_power_w = v.power, observed_at = v.at",
        )
        out = []
        for _, t in drifted:
            if t.id in written:
                t.state = T.DRIFTED
                out.append(t)
        return out

    def maybe_activate(self) -> None:
        counts = self.counts()
        if any(counts.get(s, 0) for s in (T.PENDING, T.DISPATCHING, T.DISPATCHED, T.DRIFTED, T.RESOLVED)):
            return
        if counts.get(T.CONFIRMED, 0) == 0 and counts.get(T.RESTORE_FAILED, 0) > 0:
            self.finish(EventState.COMPLETED_WITH_FAILURES, from_state=EventState.PENDING)
            return
        if counts.get(T.CONFIRMED, 0) == 0:
            log.error("pending curtailment event %s has no targets", self.event.uuid)
            return
        changed = CurtailmentEvent.objects.filter(pk=self.event.pk, state=EventState.PENDING).update(
            state=EventState.ACTIVE, started_at=self.now, updated_at=self.now
        )
        if changed != 1:
            self.race_lost("curtailment_activate")
            return
        record(
            action="curtailment.activated",
            actor=ACTOR,
            org=self.event.org,
            target=self.event,
            changes={"state": [EventState.PENDING, EventState.ACTIVE]},
            metadata={
                "event_uuid": str(self.event.uuid),
                "confirmed": counts.get(T.CONFIRMED, 0),
                "restore_failed": counts.get(T.RESTORE_FAILED, 0),
            },
        )

    def enforce_max_duration(self) -> bool:
        event = self.event
        if event.allow_unbounded or not event.max_duration_seconds or event.started_at is None:
            return False
        if (self.now - event.started_at).total_seconds() < event.max_duration_seconds:
            return False
        began = event_begin_restore(
            event=event,
            actor=ACTOR,
            reason="max duration reached",
            action="curtailment.max_duration_reached",
            max_duration_seconds=event.max_duration_seconds,
        )
        if not began:
            self.result.races_lost += 1
        return True

    # --- restore phase ---------------------------------------------------------------------------

    def confirm_restored(self, dispatched: list[CurtailmentTarget]) -> None:
        if not dispatched:
            return
        readings = self.readings(dispatched)
        resolved, timed_out = [], []
        for t in dispatched:
            power, hashrate, at = readings.get(t.device_id, (None, None, None))
            if is_restored(power, t.baseline_power_w, hashrate):
                resolved.append(Row(t.id, power=power, at=at))
            elif t.last_dispatched_at is not None and self.now - t.last_dispatched_at > RESTORE_TIMEOUT:
                timed_out.append(t)
        self.write(
            resolved,
            from_states=(T.DISPATCHED,),
            sets="state = 'resolved', confirmed_at = %s, observed_power_w = v.power, observed_at = v.at",
            set_params=[self.now],
        )
        self.fail(timed_out, "restore telemetry timeout", fail_state=T.PENDING, from_states=(T.DISPATCHED,))

    def maybe_complete(self) -> bool:
        counts = self.counts()
        live = sum(n for state, n in counts.items() if state not in TARGET_TERMINAL)
        if live:
            return False
        final = EventState.COMPLETED_WITH_FAILURES if counts.get(T.RESTORE_FAILED) else EventState.COMPLETED
        return self.finish(final, from_state=EventState.RESTORING)

    def maybe_claim_restore_batch(self) -> None:
        phase = CurtailmentTarget.objects.filter(event=self.event, desired_state=DesiredState.ACTIVE)
        # Gate 1: one batch in flight at a time.
        if phase.filter(state__in=(T.DISPATCHED, T.DRIFTED)).exists():
            return
        # Gate 2: the interval since the last batch went out (stop cleared it, so the first is at once).
        interval = self.event.restore_batch_interval_sec
        if interval > 0:
            from django.db.models import Max

            last = phase.aggregate(last=Max("last_dispatched_at"))["last"]
            if last is not None and (self.now - last).total_seconds() < interval:
                return
        size = self.event.effective_batch_size or 1
        orphans = list(phase.filter(state=T.DISPATCHING).order_by("id")[:size])
        batch = orphans or list(phase.filter(state=T.PENDING).order_by("id")[:size])
        self.dispatch(batch, kind="uncurtail", fail_state=T.PENDING, chunk_size=size)

    # --- shared machinery --------------------------------------------------------------------------

    def dispatch(
        self, targets: list[CurtailmentTarget], *, kind: str, fail_state: str, chunk_size: int | None = None
    ) -> set[int]:
        """Pre-write DISPATCHING (committed), then send the commands outside any transaction, then
        record what the gateway said. Orphans keep the command id they were first sent with.
        Returns the ids of the targets now DISPATCHED."""
        if not targets:
            return set()
        size = chunk_size or settings.FLEETOPS_CURTAIL_CHUNK_SIZE
        phase = "restore" if kind == "uncurtail" else "curtail"
        orphans = [t for t in targets if t.state == T.DISPATCHING and t.last_command_id]
        fresh = [t for t in targets if t not in orphans]
        plan: dict[str, list[tuple[CurtailmentTarget, int]]] = defaultdict(list)
        for t in orphans:
            plan[t.last_command_id].append((t, t.dispatch_attempt))
        for chunk in chunked(fresh, size):
            attempts = [(t, t.dispatch_attempt + 1) for t in chunk]
            material = ",".join(f"{t.id}:{n}" for t, n in attempts)
            digest = hashlib.sha256(f"{self.event.uuid}|{phase}|{material}".encode()).hexdigest()[:24]
            plan[f"{self.event.uuid.hex[:8]}-{phase}-{digest}"] = attempts

        rows = [Row(t.id, n=n, text=command_id) for command_id, members in plan.items() for t, n in members]
        written = self.write(
            rows,
            from_states=(T.PENDING, T.DRIFTED, T.DISPATCHING),
            sets="state = 'dispatching', dispatch_attempt = v.n, last_command_id = v.text",
        )
        commands = [(cid, [t for t, _ in members if t.id in written]) for cid, members in plan.items()]
        commands = [(cid, members) for cid, members in commands if members]
        if not commands:
            return set()

        def send(item: tuple[str, list[CurtailmentTarget]]) -> CommandResult | GatewayError:
            command_id, members = item
            try:
                return self.gateway.command(kind, command_id, [t.device_identifier for t in members])
            except GatewayError as exc:
                return exc

        outcomes = self.gateway.map_bounded(send, commands)
        ok_rows: list[Row] = []
        failures: list[tuple[CurtailmentTarget, str]] = []
        for (_, members), outcome in zip(commands, outcomes, strict=True):
            if isinstance(outcome, GatewayError):
                COMMANDS.labels(kind=kind, result="error").inc(len(members))
                failures += [(t, str(outcome)[:500]) for t in members]
                continue
            if not outcome.batch_id:
                COMMANDS.labels(kind=kind, result="no_batch").inc(len(members))
                failures += [(t, "command produced no batch (no live devices to dispatch)") for t in members]
                continue
            for t in members:
                if t.device_identifier in outcome.skipped:
                    COMMANDS.labels(kind=kind, result="skipped").inc()
                    failures.append((t, f"skipped by gateway: {outcome.skipped[t.device_identifier]}"))
                elif t.device_identifier in outcome.dispatched:
                    COMMANDS.labels(kind=kind, result="dispatched").inc()
                    ok_rows.append(Row(t.id, text=outcome.batch_id))
                else:
                    COMMANDS.labels(kind=kind, result="not_enqueued").inc()
                    failures.append((t, f"{kind} command did not enqueue device"))
        sent = self.write(
            ok_rows,
            from_states=(T.DISPATCHING,),
            sets="state = 'dispatched', last_dispatched_at = %s, last_batch_id = v.text, last_error = ''",
            set_params=[self.now],
        )
        by_message: dict[str, list[CurtailmentTarget]] = defaultdict(list)
        for t, message in failures:
            by_message[message].append(t)
        for message, members in by_message.items():
            self.fail(members, message, fail_state=fail_state, from_states=(T.DISPATCHING,))
        return sent

    def fail(
        self,
        targets: Sequence[CurtailmentTarget],
        message: str,
        *,
        fail_state: str,
        from_states: Sequence[str],
    ) -> None:
        """Burn one retry; the third strike is terminal (restore_failed)."""
        self.write(
            [Row(t.id, text=message) for t in targets],
            from_states=from_states,
            sets="retry_count = t.retry_count + 1, last_error = v.text, "
            "state = CASE WHEN t.retry_count + 1 >= %s THEN 'restore_failed' ELSE %s END",
            set_params=[MAX_RETRIES, fail_state],
        )

    def write(
        self,
        rows: Iterable[Row],
        *,
        from_states: Sequence[str],
        sets: str,
        set_params: Sequence[Any] = (),
    ) -> set[int]:
        """One compare-and-set statement per 10,000 rows: lock the event in its expected state, then
        update only targets still in `from_states` and in this phase. Returns the ids written.

        `sets` is SQL over `t` (the target) and `v` (the row's n, power, at, text) with positional
        placeholders filled from `set_params`."""
        rows = list(rows)
        written: set[int] = set()
        for chunk in chunked(rows, 10_000):
            # Five arrays through unnest(): five parameters per statement, whatever the row count.
            # Table names come from the models; every value is a parameter.
            sql = (
                f"WITH ev AS (SELECT id FROM {EVENTS} WHERE id = %s AND state = %s FOR UPDATE) "  # noqa: S608
                f"UPDATE {TARGETS} AS t SET {sets} "
                "FROM ev, unnest(%s::bigint[], %s::int[], %s::float8[], %s::timestamptz[], %s::text[]) "
                "AS v(id, n, power, at, text) "
                "WHERE t.event_id = ev.id AND t.id = v.id AND t.state = ANY(%s) AND t.desired_state = %s "
                "RETURNING t.id"
            )
            columns: list[list[Any]] = [
                [r.id for r in chunk],
                [r.n for r in chunk],
                [r.power for r in chunk],
                [r.at for r in chunk],
                [r.text for r in chunk],
            ]
            try:
                with transaction.atomic(), connection.cursor() as cursor:
                    cursor.execute(
                        sql,
                        [
                            self.event.pk,
                            self.event.state,
                            *set_params,
                            *columns,
                            list(from_states),
                            self.desired,
                        ],
                    )
                    ids = {row[0] for row in cursor.fetchall()}
            except Exception:
                TARGET_WRITE_FAILURES.inc()
                log.exception("target write failed for event %s", self.event.uuid)
                raise
            written |= ids
            lost = len(chunk) - len(ids)
            if lost:
                self.race_lost("curtailment_target_write", lost)
        return written

    def readings(
        self, targets: Sequence[CurtailmentTarget]
    ) -> dict[int, tuple[float | None, float | None, datetime | None]]:
        """Fresh telemetry for the targets' devices: from the gateway (stored as samples), falling
        back to the latest stored sample when the gateway cannot answer. Older than 15 min = none."""
        from curtailment.fleet import telemetry_store

        identifiers = [t.device_identifier for t in targets]
        try:
            samples: list[Sample] = self.gateway.telemetry(identifiers)
            # The poller keeps the sample history; here only the latest reading per device moves.
            telemetry_store(org=self.event.org, samples=samples, keep_history=False)
        except GatewayError as exc:
            log.warning("telemetry refresh failed for event %s: %s", self.event.uuid, exc)
        fresh_after = self.now - STALE_AFTER
        rows = Device.objects.filter(pk__in=[t.device_id for t in targets]).values_list(
            "id", "last_power_w", "last_hash_rate_hs", "last_sample_at"
        )
        return {
            device_id: (power, hashrate, at) if at is not None and at >= fresh_after else (None, None, None)
            for device_id, power, hashrate, at in rows
        }

    def counts(self) -> dict[str, int]:
        from django.db.models import Count

        return dict(
            CurtailmentTarget.objects.filter(event=self.event)
            .values_list("state")
            .annotate(n=Count("id"))
            .values_list("state", "n")
        )

    def finish(self, final: str, *, from_state: str) -> bool:
        changed = CurtailmentEvent.objects.filter(pk=self.event.pk, state=from_state).update(
            state=final, ended_at=self.now, updated_at=self.now
        )
        if changed != 1:
            self.race_lost("curtailment_finish")
            return False
        record(
            action="curtailment.completed",
            actor=ACTOR,
            org=self.event.org,
            target=self.event,
            changes={"state": [from_state, final]},
            metadata={"event_uuid": str(self.event.uuid), "targets": self.counts()},
        )
        return True

    def race_lost(self, operation: str, n: int = 1) -> None:
        self.result.races_lost += n
        for _ in range(n):
            note_race_lost(operation)
