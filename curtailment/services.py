"""Curtailment writes operators make: start, update, stop, admin terminate, the org config.

Every function is keyword-only and takes the `actor`; the role comes from the actor
(`fleetops.access.roles`), never from the caller. Gates are checked before the transaction opens,
so a refusal's `access.denied` row commits: the edge's role from `EVENT_MACHINE` (`authorize`), and
an admin gate for each privileged ask (`curtailment.planning.admin_gate`). Then one transaction
locks the event, moves it through the kernel (`fleetops.lib.transition`) with its audit row, and
writes its targets (`curtailment.targets`). Planning and preview live in `curtailment.planning`;
the reconciler's event moves in `curtailment.lifecycle`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction

from curtailment.lifecycle import event_begin_restore, lock_as_read
from curtailment.metrics import (
    CANDIDATES_EXCLUDED,
    EVENTS_STARTED,
    MAINTENANCE_OVERRIDES,
    START_REPLAYS,
    counted,
)
from curtailment.models import (
    EVENT_MACHINE,
    EVENT_NON_TERMINAL,
    TARGET_IN_FLIGHT,
    TERMINATE_STATES,
    CurtailmentEvent,
    CurtailmentTarget,
    DesiredState,
    EventState,
    OrgCurtailmentConfig,
    SourceActorType,
)
from curtailment.overrides import overrides_record, start_overrides, update_overrides
from curtailment.planning import (
    ADMIN_OVERRIDE_FIELDS,
    INTERVAL_CAP,
    MAX_DURATION_CAP,
    WHAT_ALLOW_UNBOUNDED,
    WHAT_DURATION_ABOVE_DEFAULT,
    WHAT_FORCE_MAINTENANCE,
    WHAT_INTERVAL_ABOVE_CAP,
    StartRequest,
    admin_gate,
    curtailment_config_get,
    insufficient,
    make_plan,
    snapshot_of,
    validate_plan,
    validate_start,
    validate_title,
)
from curtailment.selector import Outcome, Plan, effective_batch_size
from curtailment.targets import target_sweep
from fleetops.access.models import Organization, Role
from fleetops.access.roles import require_role
from fleetops.audit.actors import Actor
from fleetops.audit.models import ActorType
from fleetops.audit.services import record
from fleetops.lib import clock
from fleetops.lib.cas import note_race_lost
from fleetops.lib.errors import Conflict, RaceLost, ValidationFailed
from fleetops.lib.machine import Edge
from fleetops.lib.reason import clean_reason
from fleetops.lib.transition import authorize, transition

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 30
# A stop that finds the event moved between its read and its lock reads it again this many times.
STOP_ATTEMPTS = 3

NO_TARGETS = "no targets selected"
START_ROLE = "starting a curtailment event needs the operator role in the organization"
MAX_DURATION_ABOVE_DEFAULT = (
    "max_duration_seconds={value} is above the organization default {default}; only admins may raise it"
)
INTERVAL_ABOVE_CAP = (
    "restore_batch_interval_sec={value} is above {cap}; only admins may choose a longer interval"
)
STOP_TERMINAL = 'cannot stop curtailment event {uuid} in terminal state "{state}"'
STOP_MIN_DURATION = (
    "min_curtailed_duration_sec not elapsed: {elapsed}s of {minimum}s; "
    "an admin can supply force=true on Stop to bypass this gate"
)
STOP_DEFAULT_REASON = "stop requested"
FORCE_ADMIN_ONLY = "force=true is admin-only"
UPDATE_EMPTY = (
    "give at least one of reason, restore_batch_size, restore_batch_interval_sec, max_duration_seconds"
)
UPDATE_STATE = (
    'curtailment event in state "{state}" cannot be updated; '
    + "restoring/terminal events reject operator-safe updates"
)
UPDATE_RACE = "curtailment event state advanced during update; retry against the current event state"
TERMINATE_ADMIN_ONLY = "admin terminate needs the admin role and an interactive session"
TERMINATE_TARGET_STATE = "target_state must be cancelled or failed"
TERMINATE_IN_FLIGHT = (
    "curtailment event has miners with in-flight curtail commands; call StopCurtailment first to issue "
    "compensating uncurtail commands before admin termination"
)
TERMINATE_STATE_CONFLICT = 'curtailment event is already terminal in state "{state}"'
DEVICES_TAKEN = (
    "some selected devices were claimed by another curtailment event meanwhile; preview again and retry"
)
MOVE_ROLE = "moving a curtailment event to {to!r} needs the {role} role in the organization"
CONFIG_ADMIN_ONLY = "only admins can change the curtailment configuration"

WHAT_START = "curtailment.start"
WHAT_FORCE_STOP = "curtailment.stop: force"
WHAT_TERMINATE = "curtailment.terminate"
WHAT_CONFIG = "curtailment.config_update"


@dataclass
class StartResult:
    event: CurtailmentEvent
    created: bool
    plan: Plan | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _fresh(event: CurtailmentEvent) -> CurtailmentEvent:
    return CurtailmentEvent.objects.select_related("org").get(pk=event.pk)


# The edges each service takes: their roles gate a call that finds no edge to take (an echo, or a
# state conflict), so a refusal comes before anything about the event's state is told.
STOP_EDGES = tuple(e for e in EVENT_MACHINE.edges if e.target == EventState.RESTORING)
UPDATE_EDGES = tuple(e for e in EVENT_MACHINE.edges if e.source == e.target)


def _authorize_move(event: CurtailmentEvent, *, to: str, actor: Actor, edges: tuple[Edge, ...]) -> None:
    """The actor may take the edge from the event's state to `to`, or (with no such edge) the
    service's least guarded edge; otherwise `Forbidden` and one `access.denied` row."""
    if EVENT_MACHINE.can(event.state, to):
        authorize(machine=EVENT_MACHINE, source=event.state, to=to, actor=actor, org=event.org, target=event)
        return
    roles = [e.role for e in edges if e.role is not None]
    if roles:
        role = min(roles, key=Role.rank)
        require_role(
            actor=actor,
            org=event.org,
            role=role,
            what=f"{EVENT_MACHINE.name}: {event.state} -> {to}",
            message=MOVE_ROLE.format(to=to, role=role),
            target=event,
        )


def _live_replay(*, org: Organization, req: StartRequest) -> CurtailmentEvent | None:
    live = CurtailmentEvent.objects.filter(org=org, state__in=EVENT_NON_TERMINAL)
    if req.idempotency_key:
        return live.filter(idempotency_key=req.idempotency_key).first()
    if req.external_source and req.external_reference:
        return live.filter(
            external_source=req.external_source, external_reference=req.external_reference
        ).first()
    return None


def _source_actor(actor: Actor) -> tuple[str, str]:
    if actor.type == ActorType.SCHEDULER:
        return SourceActorType.SCHEDULER, ""
    if actor.type == ActorType.API_TOKEN:
        return SourceActorType.API_KEY, actor.id
    return SourceActorType.USER, actor.id


@counted("start")
def curtailment_start(*, org: Organization, actor: Actor, req: StartRequest) -> StartResult:
    """Create a pending event and its targets, or replay the live event with the same key."""
    # 1. Validation and role gates (each refusal audited before anything else happens).
    require_role(actor=actor, org=org, role=Role.OPERATOR, what=WHAT_START, message=START_ROLE)
    validate_plan(req, actor=actor, org=org)
    keyed = validate_start(req)
    if req.allow_unbounded:
        admin_gate(
            actor=actor,
            org=org,
            what=WHAT_ALLOW_UNBOUNDED,
            message=ADMIN_OVERRIDE_FIELDS,
            asked={"allow_unbounded": True},
        )
    if req.force_include_maintenance:
        admin_gate(
            actor=actor,
            org=org,
            what=WHAT_FORCE_MAINTENANCE,
            message=ADMIN_OVERRIDE_FIELDS,
            asked={"force_include_maintenance": True},
        )

    # 2. Replay a live event with the same idempotency key or external reference.
    replay = _live_replay(org=org, req=keyed)
    if replay is not None:
        START_REPLAYS.inc()
        return StartResult(event=replay, created=False)

    # 3-4. Plan; exclusions are counted on start only.
    config = curtailment_config_get(org=org)
    plan = make_plan(org=org, req=req, config=config)
    for skipped in plan.skipped:
        CANDIDATES_EXCLUDED.labels(reason=skipped.reason).inc()
    if plan.outcome is Outcome.INSUFFICIENT_LOAD:
        raise insufficient(plan)
    if not plan.selected:
        raise ValidationFailed(NO_TARGETS)

    # 5-6. Durations and interval, with their gates on the resolved values.
    max_duration: int | None = req.max_duration_seconds or None
    if max_duration is None and not req.allow_unbounded:
        max_duration = config.max_duration_default_sec
    if max_duration is not None and max_duration > config.max_duration_default_sec:
        admin_gate(
            actor=actor,
            org=org,
            what=WHAT_DURATION_ABOVE_DEFAULT,
            message=MAX_DURATION_ABOVE_DEFAULT.format(
                value=max_duration, default=config.max_duration_default_sec
            ),
            asked={"max_duration_seconds": max_duration},
        )
    interval = req.restore_batch_interval_sec or DEFAULT_INTERVAL
    if interval > config.restore_interval_cap_sec:
        admin_gate(
            actor=actor,
            org=org,
            what=WHAT_INTERVAL_ABOVE_CAP,
            message=INTERVAL_ABOVE_CAP.format(value=interval, cap=config.restore_interval_cap_sec),
            asked={"restore_batch_interval_sec": interval},
        )

    # 7-8. One transaction: the event (created in the machine's initial state), every target (bulk),
    # the audit rows.
    now = clock.now()
    source_type, source_id = _source_actor(actor)
    creator = get_user_model().objects.get(pk=actor.user_id) if actor.user_id else None
    if creator is None:
        raise ValidationFailed("start needs an acting user (the reconciler dispatches on their behalf)")
    event = CurtailmentEvent(
        org=org,
        state=EVENT_MACHINE.initial,
        priority=req.priority,
        scope_type=req.scope_type,
        scope={"device_identifiers": list(req.device_identifiers)} if req.device_identifiers else {},
        target_kw=req.target_kw,
        tolerance_kw=req.tolerance_kw,
        restore_batch_size=req.restore_batch_size,
        restore_batch_interval_sec=interval,
        effective_batch_size=effective_batch_size(req.restore_batch_size, len(plan.selected)),
        min_curtailed_duration_sec=req.min_curtailed_duration_sec,
        max_duration_seconds=max_duration,
        allow_unbounded=req.allow_unbounded,
        include_maintenance=req.include_maintenance,
        force_include_maintenance=req.force_include_maintenance,
        decision_snapshot=snapshot_of(plan),
        source_actor_type=source_type,
        source_actor_id=source_id,
        idempotency_key=keyed.idempotency_key,
        external_source=keyed.external_source,
        external_reference=keyed.external_reference,
        reason=req.reason,
        created_at=now,
        updated_at=now,
        created_by=creator,
    )
    try:
        with transaction.atomic():
            event.save()
            CurtailmentTarget.objects.bulk_create(
                [
                    CurtailmentTarget(
                        event=event,
                        device_id=s.candidate.device_id,
                        device_identifier=s.candidate.identifier,
                        baseline_power_w=s.power_w if s.power_w > 0 else None,
                        efficiency_j_th=s.efficiency_j_th,
                        added_at=now,
                    )
                    for s in plan.selected
                ],
                batch_size=2000,
            )
            _audit_start(event=event, actor=actor, plan=plan)
            overrides = start_overrides(config=config, req=req, interval=interval, max_duration=max_duration)
            overrides_record(
                event=event, actor=actor, reason=event.reason, operation="start", overrides=overrides
            )
    except IntegrityError as exc:
        return _start_conflict(exc, org=org, req=keyed)
    EVENTS_STARTED.inc()
    if req.force_include_maintenance:
        MAINTENANCE_OVERRIDES.inc()
    return StartResult(event=event, created=True, plan=plan)


def _constraint_name(exc: IntegrityError) -> str:
    diag = getattr(getattr(exc, "__cause__", None), "diag", None)
    return str(getattr(diag, "constraint_name", "") or "")


def _start_conflict(exc: IntegrityError, *, org: Organization, req: StartRequest) -> StartResult:
    """A unique index refused the insert: replay the winner, or a 409 that names no constraint."""
    constraint = _constraint_name(exc)
    log.info("curtailment start lost on a unique index", extra={"constraint": constraint})
    if constraint in ("curtailevent_idempotency_live", "curtailevent_external_ref_live"):
        winner = _live_replay(org=org, req=req)
        if winner is not None:
            START_REPLAYS.inc()
            note_race_lost("curtailment_start_replay")
            return StartResult(event=winner, created=False)
    if constraint == "curtailtarget_one_live_per_device":
        note_race_lost("curtailment_start_devices")
        raise Conflict(DEVICES_TAKEN, code="devices_taken")
    raise Conflict("curtailment event already exists", code="already_exists")


def _audit_start(*, event: CurtailmentEvent, actor: Actor, plan: Plan) -> None:
    metadata = {
        "event_uuid": str(event.uuid),
        "strategy": event.strategy,
        "level": event.level,
        "priority": event.priority,
        "scope_type": event.scope_type,
        "target_kw": event.target_kw,
        "selected_count": len(plan.selected),
        "skipped_count": len(plan.skipped),
        "allow_unbounded": event.allow_unbounded,
        "force_include_maintenance": event.force_include_maintenance,
        "source_actor": event.source_actor_type,
        "max_duration_seconds": event.max_duration_seconds,
        **{
            k: v
            for k, v in (
                ("idempotency_key", event.idempotency_key),
                ("external_source", event.external_source),
                ("external_reference", event.external_reference),
            )
            if v
        },
    }
    # Each override (unbounded, maintenance included, ...) has a row of its own: `overrides_record`.
    record(
        action="curtailment.started",
        actor=actor,
        org=event.org,
        target=event,
        reason=event.reason,
        metadata=metadata,
    )


@counted("stop")
def curtailment_stop(
    *, event: CurtailmentEvent, actor: Actor, force: bool = False, reason: str = ""
) -> CurtailmentEvent:
    """Begin restoring (pending|active -> restoring). Idempotent on a restoring event; refused on a
    terminal one. `force` (admin) skips the minimum curtailed duration."""
    reason = clean_reason(reason, required=False) or STOP_DEFAULT_REASON
    if force:
        admin_gate(
            actor=actor,
            org=event.org,
            what=WHAT_FORCE_STOP,
            message=FORCE_ADMIN_ONLY,
            asked={"force": True},
            target=event,
        )
    for attempt in range(1, STOP_ATTEMPTS + 1):
        current = _fresh(event)
        _authorize_move(current, to=EventState.RESTORING, actor=actor, edges=STOP_EDGES)
        if EVENT_MACHINE.is_terminal(current.state):
            raise Conflict(
                STOP_TERMINAL.format(uuid=current.uuid, state=current.state), code="state_conflict"
            )
        if current.state == EventState.RESTORING:
            return current
        # started_at is set once, on activation, so the read copy decides the minimum duration.
        if (
            current.state == EventState.ACTIVE
            and current.min_curtailed_duration_sec > 0
            and current.started_at is not None
            and not force
        ):
            elapsed = int((clock.now() - current.started_at).total_seconds())
            if elapsed < current.min_curtailed_duration_sec:
                raise Conflict(
                    STOP_MIN_DURATION.format(elapsed=elapsed, minimum=current.min_curtailed_duration_sec),
                    code="min_duration_not_elapsed",
                )
        try:
            with transaction.atomic():
                lock_as_read(current)
                event_begin_restore(
                    current,
                    actor=actor,
                    reason=reason,
                    action="curtailment.force_stopped" if force else "curtailment.stopped",
                    metadata={"force": force},
                )
        except RaceLost:
            # The reconciler moved the event first (activated, completed): decide again.
            if attempt == STOP_ATTEMPTS:
                raise
            continue
        break
    current.refresh_from_db()
    return current


UPDATABLE = ("reason", "restore_batch_size", "restore_batch_interval_sec", "max_duration_seconds")


@counted("update")
def curtailment_update(
    *, event: CurtailmentEvent, actor: Actor, patch: dict[str, Any], audit_reason: str = ""
) -> CurtailmentEvent:
    """Operator-safe partial update of a pending or active event (the machine's self-edges).
    Fields equal to the stored values are dropped first; an empty effective patch writes nothing
    (and trips no admin gate). `patch["reason"]` is a new title; `audit_reason`, why (the audit
    row's reason; without one, a new title doubles as the reason)."""
    unknown = set(patch) - set(UPDATABLE)
    if unknown:
        raise ValidationFailed(
            f"cannot update {sorted(unknown)}", fields={k: ["not updatable"] for k in unknown}
        )
    patch = {k: v for k, v in patch.items() if v is not None}
    if not patch:
        raise ValidationFailed(UPDATE_EMPTY)
    if "reason" in patch:
        validate_title(patch["reason"])
    for name, low, high in (
        ("restore_batch_size", 0, 10_000),
        ("restore_batch_interval_sec", 0, INTERVAL_CAP),
        ("max_duration_seconds", 1, MAX_DURATION_CAP),
    ):
        if name in patch and not (isinstance(patch[name], int) and low <= patch[name] <= high):
            raise ValidationFailed(
                f"{name} must be between {low} and {high}", fields={name: [f"{low}..{high}"]}
            )
    _authorize_move(event, to=event.state, actor=actor, edges=UPDATE_EDGES)
    if not EVENT_MACHINE.can(event.state, event.state):
        raise Conflict(UPDATE_STATE.format(state=event.state), code="state_conflict")
    effective = {k: v for k, v in patch.items() if getattr(event, k) != v}
    if not effective:
        return event
    config = curtailment_config_get(org=event.org)
    if effective.get("max_duration_seconds", 0) > config.max_duration_default_sec:
        admin_gate(
            actor=actor,
            org=event.org,
            what=WHAT_DURATION_ABOVE_DEFAULT,
            message=MAX_DURATION_ABOVE_DEFAULT.format(
                value=effective["max_duration_seconds"], default=config.max_duration_default_sec
            ),
            asked={"max_duration_seconds": effective["max_duration_seconds"]},
            target=event,
        )
    if effective.get("restore_batch_interval_sec", 0) > config.restore_interval_cap_sec:
        admin_gate(
            actor=actor,
            org=event.org,
            what=WHAT_INTERVAL_ABOVE_CAP,
            message=INTERVAL_ABOVE_CAP.format(
                value=effective["restore_batch_interval_sec"], cap=config.restore_interval_cap_sec
            ),
            asked={"restore_batch_interval_sec": effective["restore_batch_interval_sec"]},
            target=event,
        )
    overrides = update_overrides(config=config, event=event, effective=effective)
    try:
        # The update's row and one row per override commit together (or not at all on a lost race).
        with transaction.atomic():
            transition(
                event,
                machine=EVENT_MACHINE,
                to=event.state,
                actor=actor,
                org=event.org,
                action="curtailment.updated",
                reason=audit_reason or effective.get("reason", ""),
                updates={**effective, "updated_at": clock.now()},
                audit_fields=tuple(effective),
                metadata={"event_uuid": str(event.uuid), "fields": sorted(effective)},
                check_role=False,
            )
            overrides_record(
                event=event,
                actor=actor,
                reason=audit_reason or effective.get("reason") or event.reason,
                operation="update",
                overrides=overrides,
            )
    except RaceLost as exc:
        raise Conflict(UPDATE_RACE, code="race_lost") from exc
    event.refresh_from_db()
    return event


@counted("terminate")
def curtailment_terminate(
    *, event: CurtailmentEvent, actor: Actor, target_state: str, reason: str
) -> tuple[CurtailmentEvent, bool]:
    """Admin escape hatch: pending or restoring -> cancelled|failed, sweeping live targets to
    cancelled (never sent a command) or restore_failed (`target_sweep`). Refused while a curtail
    command may be acting on a device (stop first)."""
    require_role(
        actor=actor,
        org=event.org,
        role=Role.ADMIN,
        what=WHAT_TERMINATE,
        message=TERMINATE_ADMIN_ONLY,
        target=event,
        asked={"target_state": target_state},
        interactive=True,
    )
    if target_state not in TERMINATE_STATES:
        raise ValidationFailed(TERMINATE_TARGET_STATE, fields={"target_state": [TERMINATE_TARGET_STATE]})
    reason = clean_reason(reason)
    with transaction.atomic():
        # The event's lock first: the reconciler's target writes take it too, so no curtail command
        # can start between the in-flight check and the sweep.
        locked = CurtailmentEvent.objects.select_for_update(of=("self",)).select_related("org")
        current = locked.get(pk=event.pk)
        if current.state == target_state:
            record(
                action="curtailment.admin_terminated_replay",
                actor=actor,
                org=current.org,
                target=current,
                reason=reason,
                metadata={"event_uuid": str(current.uuid), "target_state": target_state},
            )
            return current, False
        if EVENT_MACHINE.is_terminal(current.state):
            raise Conflict(TERMINATE_STATE_CONFLICT.format(state=current.state), code="state_conflict")
        in_flight = CurtailmentTarget.objects.filter(
            event=current, desired_state=DesiredState.CURTAILED, state__in=TARGET_IN_FLIGHT
        ).exists()
        if in_flight or not EVENT_MACHINE.can(current.state, target_state):
            raise Conflict(TERMINATE_IN_FLIGHT, code="in_flight_commands")
        # The reason goes to this audit row only; the targets record what happened to them.
        swept = target_sweep(event=current)
        now = clock.now()
        transition(
            current,
            machine=EVENT_MACHINE,
            to=target_state,
            actor=actor,
            org=current.org,
            action="curtailment.admin_terminated",
            reason=reason,
            updates={"ended_at": now, "updated_at": now},
            metadata={"event_uuid": str(current.uuid), "target_state": target_state, **swept},
            check_role=False,
        )
    current.refresh_from_db()
    return current, True


CONFIG_FIELDS = (
    "gateway_url",
    "max_duration_default_sec",
    "candidate_min_power_w",
    "post_event_cooldown_sec",
    "restore_interval_cap_sec",
    "curtail_confirm_timeout_sec",
)


@counted("config_update")
def curtailment_config_update(
    *, org: Organization, actor: Actor, values: dict[str, Any]
) -> OrgCurtailmentConfig:
    """Admins change the organization's curtailment defaults; every change is audited."""
    require_role(actor=actor, org=org, role=Role.ADMIN, what=WHAT_CONFIG, message=CONFIG_ADMIN_ONLY)
    unknown = set(values) - set(CONFIG_FIELDS)
    if unknown:
        raise ValidationFailed(f"unknown fields {sorted(unknown)}")
    with transaction.atomic():
        config, _ = OrgCurtailmentConfig.objects.select_for_update().get_or_create(org=org)
        before = {k: getattr(config, k) for k in values}
        changes = {k: [before[k], v] for k, v in values.items() if before[k] != v}
        if not changes:
            return config
        for key, value in values.items():
            setattr(config, key, value)
        config.full_clean()
        config.save()
        record(action="curtailment.config_updated", actor=actor, org=org, target=config, changes=changes)
    return config
