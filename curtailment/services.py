"""Curtailment writes: preview (reads only), start, update, stop, admin terminate.

Every function is keyword-only, runs in one transaction, re-checks the role gates the API applies,
and writes its audit row inside that transaction.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from django.db import IntegrityError, transaction

from curtailment.metrics import (
    CANDIDATES_EXCLUDED,
    EVENTS_STARTED,
    MAINTENANCE_OVERRIDES,
    OPERATIONS,
    START_REPLAYS,
)
from curtailment.models import (
    EVENT_NON_TERMINAL,
    EVENT_TERMINAL,
    TARGET_IN_FLIGHT,
    TARGET_NON_TERMINAL,
    TARGET_TERMINAL,
    CurtailmentEvent,
    CurtailmentTarget,
    DesiredState,
    Device,
    EventState,
    OrgCurtailmentConfig,
    Priority,
    ScopeType,
    SourceActorType,
    TargetState,
)
from curtailment.selector import Candidate, Outcome, Plan, effective_batch_size, select_fixed_kw
from fleetops.access.models import Organization, Role
from fleetops.audit.actors import Actor
from fleetops.audit.models import ActorType
from fleetops.audit.services import record
from fleetops.lib import clock
from fleetops.lib.cas import note_race_lost
from fleetops.lib.errors import Conflict, DomainError, Forbidden, NotFound, ValidationFailed

log = logging.getLogger(__name__)

MAX_DURATION_CAP = 604_800
INTERVAL_CAP = 3600
DEFAULT_INTERVAL = 30
TEXT_CAP = 256

ADMIN_OVERRIDE_FIELDS = "only admins can supply curtailment override fields"
DEVICES_NOT_FOUND = "device_identifiers not found in caller's org: {ids}"
NO_TARGETS = "no targets selected"
MAINTENANCE_FLAGS = "include_maintenance and force_include_maintenance must be equal"
TOLERANCE_RANGE = "tolerance_kw must be >= 0 and below target_kw"
TARGET_RANGE = "target_kw must be a finite number above 0"
UNBOUNDED_WITH_MAX = "allow_unbounded cannot be combined with a non-zero max_duration_seconds"
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
REASON_REQUIRED = "reason is required (1-256 characters, not blank)"


@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    target_kw: float
    tolerance_kw: float = 0.0
    scope_type: str = ScopeType.WHOLE_ORG
    device_identifiers: tuple[str, ...] = ()
    priority: str = Priority.NORMAL
    include_maintenance: bool = False
    force_include_maintenance: bool = False
    candidate_min_power_w_override: int | None = None


@dataclass(frozen=True, kw_only=True)
class StartRequest(PlanRequest):
    reason: str
    max_duration_seconds: int = 0
    restore_batch_size: int = 0
    restore_batch_interval_sec: int = 0
    min_curtailed_duration_sec: int = 0
    allow_unbounded: bool = False
    idempotency_key: str | None = None
    external_source: str | None = None
    external_reference: str | None = None


@dataclass
class StartResult:
    event: CurtailmentEvent
    created: bool
    plan: Plan | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def curtailment_config_get(*, org: Organization) -> OrgCurtailmentConfig:
    """The organization's config, or the defaults (unsaved) when an admin never edited it: a read
    must not write."""
    return OrgCurtailmentConfig.objects.filter(org=org).first() or OrgCurtailmentConfig(org=org)


F = TypeVar("F", bound=Callable[..., Any])


def counted(operation: str) -> Callable[[F], F]:
    """Count every call of a service by outcome: ok, or the error code it raised."""

    def decorator(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                result = fn(*args, **kwargs)
            except DomainError as exc:
                OPERATIONS.labels(operation=operation, outcome=exc.code).inc()
                raise
            OPERATIONS.labels(operation=operation, outcome="ok").inc()
            return result

        return wrapper  # type: ignore[return-value]

    return decorator


def _is_admin(role: str) -> bool:
    return Role.at_least(role, Role.ADMIN)


def _clean_text(value: str | None) -> str | None:
    """Empty strings are stored as NULL; longer than 256 characters is a validation error."""
    if value is None or value == "":
        return None
    if len(value) > TEXT_CAP:
        raise ValidationFailed(f"at most {TEXT_CAP} characters")
    return value


def _validate_reason(reason: str) -> str:
    if not reason or not reason.strip() or len(reason) > TEXT_CAP:
        raise ValidationFailed(REASON_REQUIRED, fields={"reason": [REASON_REQUIRED]})
    return reason


def _validate_plan(req: PlanRequest, *, role: str) -> None:
    if not (isinstance(req.target_kw, int | float) and math.isfinite(req.target_kw) and req.target_kw > 0):
        raise ValidationFailed(TARGET_RANGE, fields={"target_kw": [TARGET_RANGE]})
    if not (math.isfinite(req.tolerance_kw) and 0 <= req.tolerance_kw < req.target_kw):
        raise ValidationFailed(TOLERANCE_RANGE, fields={"tolerance_kw": [TOLERANCE_RANGE]})
    if req.include_maintenance != req.force_include_maintenance:
        raise ValidationFailed(MAINTENANCE_FLAGS, fields={"force_include_maintenance": [MAINTENANCE_FLAGS]})
    if req.priority not in Priority.values:
        raise ValidationFailed("priority must be normal or emergency", fields={"priority": ["invalid"]})
    if req.scope_type == ScopeType.DEVICE_LIST:
        if not req.device_identifiers or any(not i for i in req.device_identifiers):
            message = "device_list scope needs a non-empty list of non-empty device identifiers"
            raise ValidationFailed(message, fields={"device_identifiers": [message]})
    elif req.scope_type == ScopeType.WHOLE_ORG:
        if req.device_identifiers:
            message = "whole_org scope takes no device identifiers"
            raise ValidationFailed(message, fields={"device_identifiers": [message]})
    else:
        raise ValidationFailed(
            "scope_type must be whole_org or device_list", fields={"scope_type": ["invalid"]}
        )
    override = req.candidate_min_power_w_override
    if override is not None:
        if not 1 <= override <= 10_000_000:
            message = "candidate_min_power_w_override must be between 1 and 10000000"
            raise ValidationFailed(message, fields={"candidate_min_power_w_override": [message]})
        if not _is_admin(role):
            raise Forbidden(ADMIN_OVERRIDE_FIELDS)


def _candidates(*, org: Organization, req: PlanRequest) -> list[Candidate]:
    devices = Device.objects.filter(org=org, deleted_at__isnull=True)
    if req.scope_type == ScopeType.DEVICE_LIST:
        wanted = set(req.device_identifiers)
        devices = devices.filter(identifier__in=wanted)
        found = set(devices.values_list("identifier", flat=True))
        if missing := sorted(wanted - found):
            raise NotFound(DEVICES_NOT_FOUND.format(ids=missing), fields={"device_identifiers": missing})
    rows = devices.values_list(
        "id",
        "identifier",
        "driver",
        "status",
        "pairing_status",
        "last_sample_at",
        "last_power_w",
        "last_hash_rate_hs",
        "last_efficiency_j_th",
    )
    return [Candidate(*row) for row in rows]


def _excluded_sets(
    *, org: Organization, config: OrgCurtailmentConfig, priority: str
) -> tuple[set[str], set[str]]:
    active = set(
        CurtailmentTarget.objects.filter(event__org=org, state__in=TARGET_NON_TERMINAL).values_list(
            "device_identifier", flat=True
        )
    )
    cooldown: set[str] = set()
    if priority != Priority.EMERGENCY and config.post_event_cooldown_sec > 0:
        since = clock.now() - timedelta(seconds=config.post_event_cooldown_sec)
        cooldown = set(
            CurtailmentTarget.objects.filter(
                event__org=org, state__in=TARGET_TERMINAL, event__ended_at__gte=since
            ).values_list("device_identifier", flat=True)
        )
    return active, cooldown


def _plan(*, org: Organization, req: PlanRequest, config: OrgCurtailmentConfig) -> Plan:
    active, cooldown = _excluded_sets(org=org, config=config, priority=req.priority)
    return select_fixed_kw(
        _candidates(org=org, req=req),
        now=clock.now(),
        target_kw=req.target_kw,
        tolerance_kw=req.tolerance_kw,
        floor_w=req.candidate_min_power_w_override or config.candidate_min_power_w,
        active=active,
        cooldown=cooldown,
        include_maintenance=req.include_maintenance,
        force_include_maintenance=req.force_include_maintenance,
    )


def _insufficient(plan: Plan) -> ValidationFailed:
    return ValidationFailed(
        plan.insufficient_load_message(),
        code="insufficient_load",
        fields={"excluded": {reason: n for reason, n in plan.counts.items() if n}},
    )


def curtailment_preview(*, org: Organization, role: str, req: PlanRequest) -> Plan:
    """The plan a start would make now. Writes nothing, counts nothing, audits nothing."""
    _validate_plan(req, role=role)
    plan = _plan(org=org, req=req, config=curtailment_config_get(org=org))
    if plan.outcome is Outcome.INSUFFICIENT_LOAD:
        raise _insufficient(plan)
    return plan


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


def snapshot_of(plan: Plan) -> dict[str, Any]:
    return {
        "candidate_min_power_w": plan.floor_w,
        "estimated_reduction_kw": round(plan.estimated_reduction_kw, 3),
        "estimated_remaining_power_kw": round(plan.estimated_remaining_power_kw, 3),
        "selected_count": len(plan.selected),
        "outcome": plan.outcome.value,
        "skipped": [{"device_identifier": s.identifier, "reason": s.reason} for s in plan.skipped],
    }


def trimmed_snapshot(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The list view's copy: `skipped` replaced by per-reason counts."""
    skipped = snapshot.get("skipped")
    if not isinstance(skipped, list):
        return snapshot
    aggregate: dict[str, int] = {}
    for entry in skipped:
        reason = entry.get("reason") if isinstance(entry, dict) else None
        if reason:
            aggregate[reason] = aggregate.get(reason, 0) + 1
    return {**{k: v for k, v in snapshot.items() if k != "skipped"}, "skipped_aggregate": aggregate}


@counted("start")
def curtailment_start(*, org: Organization, actor: Actor, role: str, req: StartRequest) -> StartResult:
    """Create a pending event and its targets, or replay the live event with the same key."""
    # 1. Validation and admin gates.
    _validate_plan(req, role=role)
    _validate_reason(req.reason)
    idempotency_key = _clean_text(req.idempotency_key)
    external_source, external_reference = (
        _clean_text(req.external_source),
        _clean_text(req.external_reference),
    )
    for name, value, cap in (
        ("max_duration_seconds", req.max_duration_seconds, MAX_DURATION_CAP),
        ("restore_batch_interval_sec", req.restore_batch_interval_sec, INTERVAL_CAP),
        ("restore_batch_size", req.restore_batch_size, 10_000),
        ("min_curtailed_duration_sec", req.min_curtailed_duration_sec, 2**31 - 1),
    ):
        if not 0 <= value <= cap:
            raise ValidationFailed(f"{name} must be between 0 and {cap}", fields={name: [f"0..{cap}"]})
    if req.allow_unbounded and req.max_duration_seconds:
        raise ValidationFailed(UNBOUNDED_WITH_MAX, fields={"allow_unbounded": [UNBOUNDED_WITH_MAX]})
    if (req.allow_unbounded or req.force_include_maintenance) and not _is_admin(role):
        raise Forbidden(ADMIN_OVERRIDE_FIELDS)
    keyed = StartRequest(
        **{
            **req.__dict__,
            "idempotency_key": idempotency_key,
            "external_source": external_source,
            "external_reference": external_reference,
        }
    )

    # 2. Replay a live event with the same idempotency key or external reference.
    replay = _live_replay(org=org, req=keyed)
    if replay is not None:
        START_REPLAYS.inc()
        return StartResult(event=replay, created=False)

    # 3-4. Plan; exclusions are counted on start only.
    config = curtailment_config_get(org=org)
    plan = _plan(org=org, req=req, config=config)
    for skipped in plan.skipped:
        CANDIDATES_EXCLUDED.labels(reason=skipped.reason).inc()
    if plan.outcome is Outcome.INSUFFICIENT_LOAD:
        raise _insufficient(plan)
    if not plan.selected:
        raise ValidationFailed(NO_TARGETS)

    # 5-6. Durations and interval, with their gates on the resolved values.
    max_duration: int | None = req.max_duration_seconds or None
    if max_duration is None and not req.allow_unbounded:
        max_duration = config.max_duration_default_sec
    if max_duration is not None and max_duration > config.max_duration_default_sec and not _is_admin(role):
        raise Forbidden(
            MAX_DURATION_ABOVE_DEFAULT.format(value=max_duration, default=config.max_duration_default_sec)
        )
    interval = req.restore_batch_interval_sec or DEFAULT_INTERVAL
    if interval > config.restore_interval_cap_sec and not _is_admin(role):
        raise Forbidden(INTERVAL_ABOVE_CAP.format(value=interval, cap=config.restore_interval_cap_sec))

    # 7-8. One transaction: the event, every target (bulk), the audit rows.
    now = clock.now()
    source_type, source_id = _source_actor(actor)
    from django.contrib.auth import get_user_model

    creator = get_user_model().objects.get(pk=actor.user_id) if actor.user_id else None
    if creator is None:
        raise ValidationFailed("start needs an acting user (the reconciler dispatches on their behalf)")
    event = CurtailmentEvent(
        org=org,
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
        idempotency_key=idempotency_key,
        external_source=external_source,
        external_reference=external_reference,
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
    actions = ["curtailment.started"]
    if event.allow_unbounded:
        actions.append("curtailment.unbounded_start")
    if event.force_include_maintenance:
        actions.append("curtailment.force_include_maintenance")
    for action in actions:
        record(
            action=action, actor=actor, org=event.org, target=event, reason=event.reason, metadata=metadata
        )


def _locked(event: CurtailmentEvent) -> CurtailmentEvent:
    return CurtailmentEvent.objects.select_for_update().get(pk=event.pk)


def _reset_targets_for_restore(event: CurtailmentEvent) -> int:
    return CurtailmentTarget.objects.filter(event=event, state__in=TARGET_NON_TERMINAL).update(
        desired_state=DesiredState.ACTIVE,
        state=TargetState.PENDING,
        retry_count=0,
        dispatch_attempt=0,
        last_dispatched_at=None,
        last_batch_id="",
        last_command_id="",
        confirmed_at=None,
        last_error="",
    )


def event_begin_restore(
    *, event: CurtailmentEvent, actor: Actor, reason: str, action: str, **meta: Any
) -> bool:
    """pending|active -> restoring and every live target to (pending, desired=active). Used by stop
    and by the reconciler's max-duration auto-stop. Returns False when the event had moved."""
    now = clock.now()
    with transaction.atomic():
        changed = CurtailmentEvent.objects.filter(
            pk=event.pk, state__in=(EventState.PENDING, EventState.ACTIVE)
        ).update(state=EventState.RESTORING, updated_at=now)
        if changed != 1:
            note_race_lost("curtailment_begin_restore")
            return False
        reset = _reset_targets_for_restore(event)
        record(
            action=action,
            actor=actor,
            org=event.org,
            target=event,
            reason=reason,
            changes={"state": [event.state, EventState.RESTORING]},
            metadata={"event_uuid": str(event.uuid), "targets_reset": reset, **meta},
        )
    return True


@counted("stop")
def curtailment_stop(
    *, event: CurtailmentEvent, actor: Actor, role: str, force: bool = False, reason: str = ""
) -> CurtailmentEvent:
    """Begin restoring. Idempotent on a restoring event; refused on a terminal one."""
    if force and not _is_admin(role):
        raise Forbidden(FORCE_ADMIN_ONLY)
    with transaction.atomic():
        current = _locked(event)
        if current.state in EVENT_TERMINAL:
            raise Conflict(
                STOP_TERMINAL.format(uuid=current.uuid, state=current.state), code="state_conflict"
            )
        if current.state == EventState.RESTORING:
            return current
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
        event_begin_restore(
            event=current,
            actor=actor,
            reason=reason or "stop requested",
            action="curtailment.force_stopped" if force else "curtailment.stopped",
            force=force,
        )
    current.refresh_from_db()
    return current


UPDATABLE = ("reason", "restore_batch_size", "restore_batch_interval_sec", "max_duration_seconds")


@counted("update")
def curtailment_update(
    *, event: CurtailmentEvent, actor: Actor, role: str, patch: dict[str, Any]
) -> CurtailmentEvent:
    """Operator-safe partial update of a pending or active event. Fields equal to the stored values
    are dropped first; an empty effective patch writes nothing (and trips no admin gate)."""
    unknown = set(patch) - set(UPDATABLE)
    if unknown:
        raise ValidationFailed(
            f"cannot update {sorted(unknown)}", fields={k: ["not updatable"] for k in unknown}
        )
    patch = {k: v for k, v in patch.items() if v is not None}
    if not patch:
        raise ValidationFailed(UPDATE_EMPTY)
    if "reason" in patch:
        _validate_reason(patch["reason"])
    for name, low, high in (
        ("restore_batch_size", 0, 10_000),
        ("restore_batch_interval_sec", 0, INTERVAL_CAP),
        ("max_duration_seconds", 1, MAX_DURATION_CAP),
    ):
        if name in patch and not (isinstance(patch[name], int) and low <= patch[name] <= high):
            raise ValidationFailed(
                f"{name} must be between {low} and {high}", fields={name: [f"{low}..{high}"]}
            )
    if event.state not in (EventState.PENDING, EventState.ACTIVE):
        raise Conflict(UPDATE_STATE.format(state=event.state), code="state_conflict")
    effective = {k: v for k, v in patch.items() if getattr(event, k) != v}
    if not effective:
        return event
    if not _is_admin(role):
        config = curtailment_config_get(org=event.org)
        if effective.get("max_duration_seconds", 0) > config.max_duration_default_sec:
            raise Forbidden(
                MAX_DURATION_ABOVE_DEFAULT.format(
                    value=effective["max_duration_seconds"], default=config.max_duration_default_sec
                )
            )
        if effective.get("restore_batch_interval_sec", 0) > config.restore_interval_cap_sec:
            raise Forbidden(
                INTERVAL_ABOVE_CAP.format(
                    value=effective["restore_batch_interval_sec"], cap=config.restore_interval_cap_sec
                )
            )
    with transaction.atomic():
        changed = CurtailmentEvent.objects.filter(
            pk=event.pk, org=event.org, state__in=(EventState.PENDING, EventState.ACTIVE)
        ).update(**effective, updated_at=clock.now())
        if changed != 1:
            note_race_lost("curtailment_update")
            raise Conflict(UPDATE_RACE, code="race_lost")
        record(
            action="curtailment.updated",
            actor=actor,
            org=event.org,
            target=event,
            reason=effective.get("reason", ""),
            changes={k: [getattr(event, k), v] for k, v in effective.items()},
            metadata={"event_uuid": str(event.uuid), "fields": sorted(effective)},
        )
    event.refresh_from_db()
    return event


@counted("terminate")
def curtailment_terminate(
    *, event: CurtailmentEvent, actor: Actor, role: str, target_state: str, reason: str
) -> tuple[CurtailmentEvent, bool]:
    """Admin escape hatch: pending or restoring -> cancelled|failed, sweeping live targets to
    restore_failed. Refused while a curtail command may be acting on a device (stop first)."""
    if not _is_admin(role) or not actor.interactive or actor.type != ActorType.USER:
        raise Forbidden(TERMINATE_ADMIN_ONLY)
    if target_state not in (EventState.CANCELLED, EventState.FAILED):
        raise ValidationFailed(TERMINATE_TARGET_STATE, fields={"target_state": [TERMINATE_TARGET_STATE]})
    _validate_reason(reason)
    with transaction.atomic():
        current = _locked(event)
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
        if current.state in EVENT_TERMINAL:
            raise Conflict(TERMINATE_STATE_CONFLICT.format(state=current.state), code="state_conflict")
        in_flight = CurtailmentTarget.objects.filter(
            event=current, desired_state=DesiredState.CURTAILED, state__in=TARGET_IN_FLIGHT
        ).exists()
        if current.state == EventState.ACTIVE or in_flight:
            raise Conflict(TERMINATE_IN_FLIGHT, code="in_flight_commands")
        now = clock.now()
        CurtailmentEvent.objects.filter(pk=current.pk).update(
            state=target_state, ended_at=now, updated_at=now
        )
        swept = CurtailmentTarget.objects.filter(event=current, state__in=TARGET_NON_TERMINAL).update(
            state=TargetState.RESTORE_FAILED, last_error=reason
        )
        record(
            action="curtailment.admin_terminated",
            actor=actor,
            org=current.org,
            target=current,
            reason=reason,
            changes={"state": [current.state, target_state]},
            metadata={"event_uuid": str(current.uuid), "target_state": target_state, "targets_swept": swept},
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
    *, org: Organization, actor: Actor, role: str, values: dict[str, Any]
) -> OrgCurtailmentConfig:
    """Admins change the organization's curtailment defaults; every change is audited."""
    if not _is_admin(role):
        raise Forbidden("only admins can change the curtailment configuration")
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
