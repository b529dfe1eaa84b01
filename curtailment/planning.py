"""Curtailment planning: the requests, their validation and admin gates, the plan a start would
make (`curtailment_preview`, which writes nothing but a refusal's `access.denied` row), and the
organization's config as the planner reads it.

Every privileged ask (an override field, a value past the organization's cap) goes through
`admin_gate`, so its refusal writes the same `access.denied` row as a refusal at the API or admin
edge (`fleetops.access.roles.require_role`), before any transaction of the service opens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db import models

from curtailment.models import (
    TARGET_NON_TERMINAL,
    TARGET_TERMINAL,
    CurtailmentTarget,
    Device,
    OrgCurtailmentConfig,
    Priority,
    ScopeType,
)
from curtailment.selector import Candidate, Outcome, Plan, select_fixed_kw
from fleetops.access.models import Organization, Role
from fleetops.access.roles import require_role
from fleetops.audit.actors import Actor
from fleetops.lib import clock
from fleetops.lib.errors import NotFound, ValidationFailed

MAX_DURATION_CAP = 604_800
INTERVAL_CAP = 3600
TEXT_CAP = 256

ADMIN_OVERRIDE_FIELDS = "only admins can supply curtailment override fields"
PREVIEW_ROLE = "previewing a curtailment plan needs the viewer role in the organization"
DEVICES_NOT_FOUND = "device_identifiers not found in caller's org: {ids}"
MAINTENANCE_FLAGS = "include_maintenance and force_include_maintenance must be equal"
TOLERANCE_RANGE = "tolerance_kw must be >= 0 and below target_kw"
TARGET_RANGE = "target_kw must be a finite number above 0"
UNBOUNDED_WITH_MAX = "allow_unbounded cannot be combined with a non-zero max_duration_seconds"
# The event's own `reason` is its title (256 characters), not an operator's reason for an action
# (those go through `fleetops.lib.reason.clean_reason`).
REASON_REQUIRED = "reason is required (1-256 characters, not blank)"

# `metadata.what` of the `access.denied` row each refused ask writes.
WHAT_PREVIEW = "curtailment.preview"
WHAT_MIN_POWER_OVERRIDE = "curtailment: candidate_min_power_w_override"
WHAT_ALLOW_UNBOUNDED = "curtailment.start: allow_unbounded"
WHAT_FORCE_MAINTENANCE = "curtailment.start: force_include_maintenance"
WHAT_DURATION_ABOVE_DEFAULT = "curtailment: max_duration_seconds above the organization default"
WHAT_INTERVAL_ABOVE_CAP = "curtailment: restore_batch_interval_sec above the organization cap"


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


def curtailment_config_get(*, org: Organization) -> OrgCurtailmentConfig:
    """The organization's config, or the defaults (unsaved) when an admin never edited it: a read
    must not write."""
    return OrgCurtailmentConfig.objects.filter(org=org).first() or OrgCurtailmentConfig(org=org)


def admin_gate(
    *,
    actor: Actor,
    org: Organization,
    what: str,
    message: str,
    asked: Mapping[str, Any],
    target: models.Model | None = None,
) -> None:
    """A privileged ask: `Forbidden(message)` and one `access.denied` row unless the actor is an
    admin in `org`."""
    require_role(
        actor=actor, org=org, role=Role.ADMIN, what=what, message=message, asked=asked, target=target
    )


def validate_plan(req: PlanRequest, *, actor: Actor, org: Organization) -> None:
    """The plan's own rules, then its admin gate (the min-power override)."""
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
        admin_gate(
            actor=actor,
            org=org,
            what=WHAT_MIN_POWER_OVERRIDE,
            message=ADMIN_OVERRIDE_FIELDS,
            asked={"candidate_min_power_w_override": override},
        )


def _clean_text(name: str, value: str | None) -> str | None:
    """Empty strings are stored as NULL; longer than 256 characters is a validation error."""
    if value is None or value == "":
        return None
    if len(value) > TEXT_CAP:
        message = f"{name}: at most {TEXT_CAP} characters"
        raise ValidationFailed(message, fields={name: [f"at most {TEXT_CAP} characters"]})
    return value


def validate_title(reason: str) -> str:
    """The event's title (its `reason` field)."""
    if not reason or not reason.strip() or len(reason) > TEXT_CAP:
        raise ValidationFailed(REASON_REQUIRED, fields={"reason": [REASON_REQUIRED]})
    return reason


def validate_start(req: StartRequest) -> StartRequest:
    """A start's own fields (after `validate_plan`); returns the request with its keys cleaned
    (empty = NULL)."""
    validate_title(req.reason)
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
    return dataclasses.replace(
        req,
        idempotency_key=_clean_text("idempotency_key", req.idempotency_key),
        external_source=_clean_text("external_source", req.external_source),
        external_reference=_clean_text("external_reference", req.external_reference),
    )


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


def make_plan(*, org: Organization, req: PlanRequest, config: OrgCurtailmentConfig) -> Plan:
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


def insufficient(plan: Plan) -> ValidationFailed:
    return ValidationFailed(
        plan.insufficient_load_message(),
        code="insufficient_load",
        fields={"excluded": {reason: n for reason, n in plan.counts.items() if n}},
    )


def curtailment_preview(*, org: Organization, actor: Actor, req: PlanRequest) -> Plan:
    """The plan a start would make now. Writes nothing (but a refusal's `access.denied` row),
    counts nothing."""
    require_role(actor=actor, org=org, role=Role.VIEWER, what=WHAT_PREVIEW, message=PREVIEW_ROLE)
    validate_plan(req, actor=actor, org=org)
    plan = make_plan(org=org, req=req, config=curtailment_config_get(org=org))
    if plan.outcome is Outcome.INSUFFICIENT_LOAD:
        raise insufficient(plan)
    return plan


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
