"""Admin overrides of a curtailment start or update, each audited on its own.

An override is a value only an admin may choose because it goes past an organization rule: a
min-power floor of their own, a restore interval above the cap, a maximum duration above the
organization default, no maximum duration at all, maintenance devices included. The services gate
each one (`curtailment.planning.admin_gate`, an `access.denied` row for anyone else) and, once the
start or update is written, `overrides_record` adds one `curtailment.override.<kind>` row per
override in the same transaction, with the rule's limit, the value the event had before (updates)
and the value chosen. A feed of overrides is then one action-prefix filter, not a metadata scan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from curtailment.models import CurtailmentEvent, OrgCurtailmentConfig
from curtailment.planning import StartRequest
from fleetops.audit.actors import Actor
from fleetops.audit.services import record

OVERRIDE_ACTION_PREFIX = "curtailment.override."


class OverrideKind:
    MIN_POWER = "min_power"
    INTERVAL_ABOVE_CAP = "interval_above_cap"
    DURATION_ABOVE_DEFAULT = "duration_above_default"
    UNBOUNDED = "unbounded"
    FORCE_INCLUDE_MAINTENANCE = "force_include_maintenance"


def override_action(kind: str) -> str:
    return f"{OVERRIDE_ACTION_PREFIX}{kind}"


@dataclass(frozen=True)
class Override:
    """One rule an admin went past: the field, the rule's limit, the value before (None on a
    start) and the value chosen."""

    kind: str
    field: str
    limit: Any
    chosen: Any
    before: Any = None


def start_overrides(
    *, config: OrgCurtailmentConfig, req: StartRequest, interval: int, max_duration: int | None
) -> list[Override]:
    """The overrides of a start, from its request and the interval and maximum duration it resolved
    (the same tests as its admin gates)."""
    found = []
    if req.candidate_min_power_w_override is not None:
        found.append(
            Override(
                OverrideKind.MIN_POWER,
                "candidate_min_power_w_override",
                limit=config.candidate_min_power_w,
                chosen=req.candidate_min_power_w_override,
            )
        )
    if interval > config.restore_interval_cap_sec:
        found.append(
            Override(
                OverrideKind.INTERVAL_ABOVE_CAP,
                "restore_batch_interval_sec",
                limit=config.restore_interval_cap_sec,
                chosen=interval,
            )
        )
    if req.allow_unbounded:
        found.append(
            Override(
                OverrideKind.UNBOUNDED,
                "max_duration_seconds",
                limit=config.max_duration_default_sec,
                chosen=None,
            )
        )
    elif max_duration is not None and max_duration > config.max_duration_default_sec:
        found.append(
            Override(
                OverrideKind.DURATION_ABOVE_DEFAULT,
                "max_duration_seconds",
                limit=config.max_duration_default_sec,
                chosen=max_duration,
            )
        )
    if req.force_include_maintenance:
        found.append(
            Override(
                OverrideKind.FORCE_INCLUDE_MAINTENANCE, "force_include_maintenance", limit=False, chosen=True
            )
        )
    return found


def update_overrides(
    *, config: OrgCurtailmentConfig, event: CurtailmentEvent, effective: Mapping[str, Any]
) -> list[Override]:
    """The overrides of an update's effective patch (fields equal to the stored value are no
    change, so no override), with the event's value before."""
    found = []
    interval = effective.get("restore_batch_interval_sec")
    if interval is not None and interval > config.restore_interval_cap_sec:
        found.append(
            Override(
                OverrideKind.INTERVAL_ABOVE_CAP,
                "restore_batch_interval_sec",
                limit=config.restore_interval_cap_sec,
                chosen=interval,
                before=event.restore_batch_interval_sec,
            )
        )
    duration = effective.get("max_duration_seconds")
    if duration is not None and duration > config.max_duration_default_sec:
        found.append(
            Override(
                OverrideKind.DURATION_ABOVE_DEFAULT,
                "max_duration_seconds",
                limit=config.max_duration_default_sec,
                chosen=duration,
                before=event.max_duration_seconds,
            )
        )
    return found


def overrides_record(
    *,
    event: CurtailmentEvent,
    actor: Actor,
    reason: str,
    operation: str,
    overrides: Sequence[Override],
) -> None:
    """One audit row per override, inside the caller's transaction (the start's or update's)."""
    for override in overrides:
        record(
            action=override_action(override.kind),
            actor=actor,
            org=event.org,
            target=event,
            reason=reason,
            changes={override.field: [override.before, override.chosen]},
            metadata={
                "event_uuid": str(event.uuid),
                "operation": operation,
                "kind": override.kind,
                "field": override.field,
                "limit": override.limit,
                "before": override.before,
                "chosen": override.chosen,
            },
        )
