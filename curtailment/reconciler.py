"""The curtailment reconciler: one tick drives every live event of every organization.

Rules this module keeps (see DESIGN.md):
1. One tick at a time across processes: a PostgreSQL advisory lock; a tick that cannot take it skips.
2. DISPATCHING is written and committed before any gateway call; a DISPATCHING row seen by a later
   tick is an orphan of a crashed one and is redispatched with the command id it was first sent
   with (stored on the target), so the gateway deduplicates it.
3. Every target write is a named, set-based move through the transition kernel
   (`curtailment.targets`, one `UPDATE … FROM unnest(…)` per chunk) that also locks the parent event
   row in its expected state; rows that did not change lost a race and are counted, and the tick
   does not act on them. Event moves are the named services of `curtailment.lifecycle`
   (activate, complete, expire), each audited in the transaction of its state change, acting as
   the scheduler actor `ACTOR`.
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
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection
from django.db.models import Count, Max, QuerySet
from django.db.models.base import ModelState

from curtailment.fleet import telemetry_store
from curtailment.gateway import CommandResult, FleetGateway, GatewayError, Sample, chunked
from curtailment.lifecycle import (
    curtailment_activate,
    curtailment_complete,
    curtailment_expire,
    max_duration_reached,
)
from curtailment.metrics import COMMANDS, TARGET_WRITE_FAILURES, TICK_DURATION, TICK_FAILURES
from curtailment.models import (
    EVENT_NON_TERMINAL,
    TARGET_MACHINE,
    TARGET_NON_TERMINAL,
    CurtailmentEvent,
    CurtailmentTarget,
    DesiredState,
    Device,
    EventState,
    OrgCurtailmentConfig,
    TargetState,
)
from curtailment.planning import curtailment_config_get
from curtailment.selector import STALE_AFTER
from curtailment.targets import (
    MAX_RETRIES,
    Phase,
    Reading,
    is_orphan,
    target_confirm,
    target_fail,
    target_mark_dispatched,
    target_mark_dispatching,
    target_mark_drifted,
    target_observe,
    target_resolve,
)
from curtailment.telemetry import is_curtailed, is_restored
from fleetops.audit.actors import Actor
from fleetops.lib import clock
from fleetops.lib.errors import RaceLost
from fleetops.lib.transition import bound_cursor
from fleetops.observability.heartbeats import heartbeat_beat

log = logging.getLogger(__name__)

HEARTBEAT = "curtailment.reconciler"
ACTOR = Actor.scheduler(HEARTBEAT)
LOCK_KEY = 0x6375_7274_6169_6C  # "curtail"
RESTORE_TIMEOUT = timedelta(seconds=300)
TICK_BUDGET_SECONDS = 60

T = TargetState
# The targets a tick may (re)dispatch: every state with an edge into DISPATCHING.
DISPATCHABLE = TARGET_MACHINE.allowed_from(T.DISPATCHING)

# The target columns a tick reads; every other field is deferred (loaded on first access).
TICK_FIELDS = (
    "id",
    "event_id",
    "device_id",
    "device_identifier",
    "state",
    "desired_state",
    "baseline_power_w",
    "last_dispatched_at",
    "last_command_id",
    "last_batch_id",
    "dispatch_attempt",
    "retry_count",
    "observed_power_w",
    "observed_at",
)

GatewayFactory = Callable[[OrgCurtailmentConfig], FleetGateway]
Telemetry = tuple[float | None, float | None, datetime | None]  # power W, hash rate H/s, taken at
TargetMove = Callable[..., set[int]]


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
        return load_targets(qs.order_by("id"))

    @property
    def desired(self) -> str:
        return DesiredState.ACTIVE if self.event.state == EventState.RESTORING else DesiredState.CURTAILED

    @property
    def phase(self) -> Phase:
        return Phase(event_id=self.event.pk, event_state=self.event.state, desired=self.desired)

    # --- states ----------------------------------------------------------------------------------

    def pending(self) -> None:
        # Confirm first: a confirmation timeout frees its target for redispatch in this same tick.
        self.confirm_curtailed(self.targets(T.DISPATCHED))
        dispatchable = self.targets(*DISPATCHABLE)
        sent = self.dispatch(dispatchable, kind="curtail", fail_state=T.PENDING)
        # The writes advanced the in-memory targets they moved: no second read of the event's targets.
        self.confirm_curtailed([t for t in dispatchable if t.id in sent and t.state == T.DISPATCHED])
        self.maybe_activate()

    def active(self) -> None:
        if self.enforce_max_duration():
            return
        targets = self.targets(*TARGET_NON_TERMINAL)
        # Both steps advance the in-memory targets they move (drifted, confirmed, timed out).
        self.check_drift([t for t in targets if t.state == T.CONFIRMED])
        self.confirm_curtailed([t for t in targets if t.state == T.DISPATCHED])
        redo = [t for t in targets if t.state in DISPATCHABLE]
        exhausted = [t for t in redo if t.retry_count >= MAX_RETRIES]
        self.fail(exhausted, "retry budget exhausted", fail_state=T.DRIFTED)
        self.dispatch([t for t in redo if t.retry_count < MAX_RETRIES], kind="curtail", fail_state=T.DRIFTED)

    def restoring(self) -> None:
        dispatched = self.targets(T.DISPATCHED)
        self.confirm_restored(dispatched)
        # Gate 1 of the claim: one batch in flight at a time. Only ticks (one at a time) write
        # DISPATCHED, so the batch just read, as the writes advanced it, answers without a query.
        if any(t.state == T.DISPATCHED for t in dispatched):
            return
        # A batch to send means targets are still live: the completion check waits for a tick
        # with nothing to claim (or one held back by the interval).
        if not self.maybe_claim_restore_batch():
            self.maybe_complete()

    # --- curtail phase ---------------------------------------------------------------------------

    def confirm_curtailed(self, dispatched: list[CurtailmentTarget]) -> None:
        if not dispatched:
            return
        readings = self.readings(dispatched)
        confirm: list[Reading] = []
        timed_out: list[CurtailmentTarget] = []
        timeout = timedelta(seconds=self.config.curtail_confirm_timeout_sec)
        for t in dispatched:
            power, hashrate, at = readings.get(t.device_id, (None, None, None))
            if is_curtailed(power, t.baseline_power_w, hashrate, require_evidence=True):
                confirm.append((t, power, at))
            elif t.last_dispatched_at is not None and self.now - t.last_dispatched_at > timeout:
                timed_out.append(t)
        self.write(target_confirm, confirm, now=self.now)
        self.fail(timed_out, "curtail confirmation timeout", fail_state=T.PENDING)

    def check_drift(self, confirmed: list[CurtailmentTarget]) -> None:
        if not confirmed:
            return
        readings = self.readings(confirmed)
        still: list[Reading] = []
        drifted: list[Reading] = []
        for t in confirmed:
            power, hashrate, at = readings.get(t.device_id, (None, None, None))
            curtailed = is_curtailed(power, t.baseline_power_w, hashrate, require_evidence=False)
            (still if curtailed else drifted).append((t, power, at))
        self.write(target_observe, still)
        self.write(target_mark_drifted, drifted)

    def maybe_activate(self) -> None:
        counts = self.counts()
        # Activation waits until every target is confirmed or has failed for good.
        if any(n for state, n in counts.items() if state not in (T.CONFIRMED, T.RESTORE_FAILED)):
            return
        if counts.get(T.CONFIRMED, 0) == 0 and counts.get(T.RESTORE_FAILED, 0) > 0:
            self.complete(EventState.COMPLETED_WITH_FAILURES, counts)
            return
        if counts.get(T.CONFIRMED, 0) == 0:
            log.error("pending curtailment event %s has no targets", self.event.uuid)
            return
        try:
            curtailment_activate(event=self.event, actor=ACTOR, counts=counts)
        except RaceLost:
            self.result.races_lost += 1

    def enforce_max_duration(self) -> bool:
        if not max_duration_reached(self.event, now=self.now):
            return False
        try:
            curtailment_expire(event=self.event, actor=ACTOR)
        except RaceLost:
            self.result.races_lost += 1
        return True

    # --- restore phase ---------------------------------------------------------------------------

    def confirm_restored(self, dispatched: list[CurtailmentTarget]) -> None:
        if not dispatched:
            return
        readings = self.readings(dispatched)
        resolved: list[Reading] = []
        timed_out: list[CurtailmentTarget] = []
        for t in dispatched:
            power, hashrate, at = readings.get(t.device_id, (None, None, None))
            if is_restored(power, t.baseline_power_w, hashrate):
                resolved.append((t, power, at))
            elif t.last_dispatched_at is not None and self.now - t.last_dispatched_at > RESTORE_TIMEOUT:
                timed_out.append(t)
        self.write(target_resolve, resolved, now=self.now)
        self.fail(timed_out, "restore telemetry timeout", fail_state=T.PENDING)

    def maybe_complete(self) -> bool:
        # While targets are live, one index probe answers; the full count per state is only for
        # the completing tick's audit row.
        if CurtailmentTarget.objects.filter(event=self.event, state__in=TARGET_NON_TERMINAL).exists():
            return False
        counts = self.counts()
        if any(n for state, n in counts.items() if not TARGET_MACHINE.is_terminal(state)):
            return False
        final = EventState.COMPLETED_WITH_FAILURES if counts.get(T.RESTORE_FAILED) else EventState.COMPLETED
        return self.complete(final, counts)

    def maybe_claim_restore_batch(self) -> bool:
        """The next batch, once none is in flight (`restoring` checked): the orphans of a crashed
        tick first, else the lowest pending ids, read in id order off the (event, state, id) index.
        Returns whether there was a batch to send."""
        phase = CurtailmentTarget.objects.filter(event=self.event, desired_state=DesiredState.ACTIVE)
        # Gate 2: the interval since the last batch went out (stop cleared it, so the first is at once).
        interval = self.event.restore_batch_interval_sec
        if interval > 0:
            last = phase.aggregate(last=Max("last_dispatched_at"))["last"]
            if last is not None and (self.now - last).total_seconds() < interval:
                return False
        size = self.event.effective_batch_size or 1
        orphans = load_targets(phase.filter(state=T.DISPATCHING).order_by("id")[:size])
        batch = orphans or load_targets(phase.filter(state=T.PENDING).order_by("id")[:size])
        self.dispatch(batch, kind="uncurtail", fail_state=T.PENDING, chunk_size=size)
        return bool(batch)

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
        plan: dict[str, list[CurtailmentTarget]] = defaultdict(list)
        fresh: list[CurtailmentTarget] = []
        for t in targets:
            if is_orphan(t):
                plan[t.last_command_id].append(t)
            else:
                fresh.append(t)
        for chunk in chunked(fresh, size):
            # The command id names the attempt each target is about to make.
            material = ",".join(f"{t.id}:{t.dispatch_attempt + 1}" for t in chunk)
            digest = hashlib.sha256(f"{self.event.uuid}|{phase}|{material}".encode()).hexdigest()[:24]
            plan[f"{self.event.uuid.hex[:8]}-{phase}-{digest}"] = list(chunk)

        claims = [(t, command_id) for command_id, members in plan.items() for t in members]
        written = self.write(target_mark_dispatching, claims)
        commands = [(cid, [t for t in members if t.id in written]) for cid, members in plan.items()]
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
        ok: list[tuple[CurtailmentTarget, str]] = []
        failures: list[tuple[CurtailmentTarget, str]] = []
        # Counted per call, not per target: a labelled increment costs as much as a target's write.
        results: Counter[str] = Counter()
        for (_, members), outcome in zip(commands, outcomes, strict=True):
            if isinstance(outcome, GatewayError):
                results["error"] += len(members)
                failures += [(t, str(outcome)[:500]) for t in members]
                continue
            if not outcome.batch_id:
                results["no_batch"] += len(members)
                failures += [(t, "command produced no batch (no live devices to dispatch)") for t in members]
                continue
            for t in members:
                if t.device_identifier in outcome.skipped:
                    results["skipped"] += 1
                    failures.append((t, f"skipped by gateway: {outcome.skipped[t.device_identifier]}"))
                elif t.device_identifier in outcome.dispatched:
                    results["dispatched"] += 1
                    ok.append((t, outcome.batch_id))
                else:
                    results["not_enqueued"] += 1
                    failures.append((t, f"{kind} command did not enqueue device"))
        for result, count in results.items():
            COMMANDS.labels(kind=kind, result=result).inc(count)
        sent = self.write(target_mark_dispatched, ok, now=self.now)
        by_message: dict[str, list[CurtailmentTarget]] = defaultdict(list)
        for t, message in failures:
            by_message[message].append(t)
        for message, members in by_message.items():
            self.fail(members, message, fail_state=fail_state)
        return sent

    def fail(self, targets: Sequence[CurtailmentTarget], message: str, *, fail_state: str) -> None:
        """Burn one retry; the third strike is terminal (restore_failed)."""
        self.write(target_fail, targets, message=message, fail_state=fail_state)

    def write(self, move: TargetMove, rows: Sequence[Any], **kwargs: Any) -> set[int]:
        """Every target write of the tick goes through here: one named move of `curtailment.targets`
        for this event's phase (event state and desired state). Returns the ids written; the
        rest lost a race (the kernel counted them) and are added to the tick's count."""
        if not rows:
            return set()
        try:
            written = move(self.phase, rows, **kwargs)
        except Exception:
            TARGET_WRITE_FAILURES.inc()
            log.exception("target write failed for event %s", self.event.uuid)
            raise
        self.result.races_lost += len(rows) - len(written)
        return written

    def readings(self, targets: Sequence[CurtailmentTarget]) -> dict[int, Telemetry]:
        """Fresh telemetry for the targets' devices: from the gateway (stored as samples), falling
        back to the latest stored sample when the gateway cannot answer. Older than 15 min = none."""
        identifiers = [t.device_identifier for t in targets]
        try:
            samples: list[Sample] = self.gateway.telemetry(identifiers)
            # The poller keeps the sample history; here only the latest reading per device moves.
            device_ids = {t.device_identifier: t.device_id for t in targets}
            telemetry_store(org=self.event.org, samples=samples, keep_history=False, device_ids=device_ids)
        except GatewayError as exc:
            log.warning("telemetry refresh failed for event %s: %s", self.event.uuid, exc)
        fresh_after = self.now - STALE_AFTER
        # One binary array parameter, not one placeholder per device: a small statement at any size.
        table = Device._meta.db_table
        sql = f"SELECT id, last_power_w, last_hash_rate_hs, last_sample_at FROM {table}"  # noqa: S608
        with bound_cursor() as cursor:
            cursor.execute(f"{sql} WHERE id = ANY(%b::bigint[])", [[t.device_id for t in targets]])
            rows = cursor.fetchall()
        return {
            device_id: (power, hashrate, at) if at is not None and at >= fresh_after else (None, None, None)
            for device_id, power, hashrate, at in rows
        }

    def counts(self) -> dict[str, int]:
        return dict(
            CurtailmentTarget.objects.filter(event=self.event)
            .values_list("state")
            .annotate(n=Count("id"))
            .values_list("state", "n")
        )

    def complete(self, final: str, counts: dict[str, int]) -> bool:
        try:
            curtailment_complete(event=self.event, actor=ACTOR, to=final, counts=counts)
        except RaceLost:
            self.result.races_lost += 1
            return False
        return True


def load_targets(qs: QuerySet[CurtailmentTarget]) -> list[CurtailmentTarget]:
    """The targets of `qs` with the columns a tick reads (`TICK_FIELDS`), built without
    `Model.__init__`: at 100,000 targets the ORM's per-row construction (field descriptors, every
    timestamp parsed) was most of a tick. The instances are ordinary `CurtailmentTarget`s whose other
    fields are deferred, as with `.only(*TICK_FIELDS)`: reading one loads it from the database."""
    new = CurtailmentTarget.__new__
    loaded: list[CurtailmentTarget] = []
    for values in qs.values_list(*TICK_FIELDS):
        target = new(CurtailmentTarget)
        state = ModelState()
        state.adding, state.db = False, DEFAULT_DB_ALIAS
        target.__dict__.update(zip(TICK_FIELDS, values, strict=True), _state=state)
        loaded.append(target)
    return loaded
