"""What the key services, the re-stake schedule and verification share: audit actions, result and
verdict types, error messages, the role gate and the early schedule kick (an outbox message).

It imports none of them, so `services` (operator writes), `verdicts` (engine writes), `schedule`,
`verification` and `tasks` never import each other in a circle; the schedule is kicked by task name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.conf import settings
from django.db import models

from fleetops.access.models import Organization, Role
from fleetops.access.roles import effective_role, require_role
from fleetops.audit.actors import Actor
from fleetops.lib.machine import Machine, State
from fleetops.outbox.services import outbox_enqueue
from migrations_app.models.keys import AddressGroup, OrgKeyConfig

RESTAKE_TASK = "migrations_app.keys.tasks.restake"
FAILED_EVENT = "keys.migration_failed"
MAX_KEY_IDS = 10_000

NOT_A_MEMBER = "You are not a member of this organization (no role there)."
ROLE_REQUIRED = {
    Role.VIEWER: "This needs the viewer role in the organization.",
    Role.OPERATOR: "This needs the operator role in the organization.",
    Role.ADMIN: "This needs the admin role in the organization.",
}
OPERATOR_REQUIRED = ROLE_REQUIRED[Role.OPERATOR]
ADMIN_REQUIRED = ROLE_REQUIRED[Role.ADMIN]
KEYS_NOT_FOUND = "key ids not found in this organization: {ids}"
TOO_MANY_IDS = f"at most {MAX_KEY_IDS} key ids per call"


class KeyAction:
    """Audit actions of the key lifecycle. Every `migration_status` change writes one row per key
    (`changes.migration_status = [before, after]`), so a key's trail replays to its status."""

    MIGRATED = "keys.migrated"  # the operator's migrate command: one row on the target group
    SCHEDULED = "keys.migration_scheduled"  # each key the migrate command moved
    RETRIED = "keys.migration_retried"
    AUTO_RESET = "keys.migration_auto_reset"
    SUCCEEDED = "keys.migration_succeeded"
    ATTEMPT_FAILED = "keys.migration_attempt_failed"
    FAILED = "keys.migration_failed"
    CONFIG_UPDATED = "keys.config_updated"
    GROUP_SAVED = "keys.address_group_saved"
    GROUP_DELETED = "keys.address_group_deleted"


@dataclass(frozen=True)
class MigrateResult:
    dry_run: bool
    target_group: AddressGroup
    key_ids: list[int]
    excluded_retired: int = 0

    @property
    def count(self) -> int:
        return len(self.key_ids)


@dataclass
class RetryResult:
    retried: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """The terminal outcome of one stake transaction, as verification or the broadcast saw it."""

    tx_id: int
    success: bool
    code: int | None = None
    message: str = ""
    landed_height: int | None = None
    kind: str = "confirmed"  # confirmed | rejected | expired


@dataclass
class ResolveStats:
    succeeded: list[int] = field(default_factory=list)
    retrying: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    superseded: list[int] = field(default_factory=list)
    races_lost: int = 0


def role_to_enter(machine: Machine, to: State, sources: tuple[State, ...] | None = None) -> Role:
    """The role a person needs to move `sources` (default: every state that may) into `to`: the
    highest role among those edges, read from the machine."""
    roles = [
        Role(edge.role)
        for source in (machine.allowed_from(to) if sources is None else sources)
        if (edge := machine.edge(source, to)) is not None and edge.role is not None
    ]
    if not roles:
        raise ValueError(f"{machine.name}: no person may enter {to!r}")
    return max(roles, key=Role.rank)


def require(
    *, actor: Actor, org: Organization, role: Role, what: str, target: models.Model | None = None
) -> Role:
    """`require_role` with the keys' messages: "not a member" when the actor has no role in `org`
    at all, "needs the X role" otherwise. The refusal is audited (`access.denied`) either way."""
    have = effective_role(actor=actor, org_id=org.pk)
    return require_role(
        actor=actor,
        org=org,
        role=role,
        what=what,
        target=target,
        message=NOT_A_MEMBER if have is None else ROLE_REQUIRED[role],
    )


def max_attempts_for(org: Organization | int) -> int:
    org_id = org if isinstance(org, int) else org.pk
    configured = OrgKeyConfig.objects.filter(org_id=org_id).values_list("max_attempts", flat=True).first()
    return int(configured or settings.FLEETOPS_KEYS_MAX_ATTEMPTS)


def kick_schedule() -> None:
    """The early kick after a migration or retry, by task name, as an outbox message in the
    caller's transaction (call it inside the migration's or retry's `atomic()`): an optimization
    only, since the beat claims the keys within 30 s anyway. A broker outage is counted
    (`fleetops_outbox_send_failures_total{task=...restake}`), never reported as a failed
    migration; a pass run twice claims nothing twice (claims skip locked rows)."""
    outbox_enqueue(task=RESTAKE_TASK, expires_seconds=25)
