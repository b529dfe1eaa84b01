"""Curtailment: shed a requested amount of power from a device fleet, hold it, restore it.

Both state machines are declared once below (`EVENT_MACHINE`, `TARGET_MACHINE`) and read by
everything else: the check constraints, the transition kernel (`fleetops.lib.transition`), the
generated tests, and the diagrams in `docs/state-machines.md` and on the event's admin page.

Event states::

    pending ──(all targets confirmed/failed, ≥1 confirmed)──> active ──(stop / max duration)──> restoring
       │  └──(all targets restore_failed)──> completed_with_failures                              │
       ├──(stop)──> restoring ──(all targets terminal)──> completed | completed_with_failures <───┘
       └──(admin terminate: pending or restoring, no curtail command in flight)──> cancelled | failed

Target states (per phase; `desired_state` says which phase)::

    pending ─> dispatching ─> dispatched ─> confirmed ⇄ drifted ─> dispatching ...   (curtail)
    pending ─> dispatching ─> dispatched ─> resolved                                   (restore)
    dispatching | dispatched | drifted ─(retry budget spent)─> restore_failed
    any live ─(stop)─> pending (restore phase)
    pending | dispatching | dispatched ─(admin terminate)─> restore_failed
    pending, never dispatched ─(admin terminate)─> cancelled
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.contrib.postgres.indexes import GinIndex, OpClass
from django.db import models
from django.db.models import Q
from django.db.models.functions import Upper

from fleetops.access.models import Role
from fleetops.lib.machine import Machine


class DeviceStatus(models.TextChoices):
    ACTIVE = "active"
    OFFLINE = "offline"
    UPDATING = "updating"
    REBOOT_REQUIRED = "reboot_required"
    INACTIVE = "inactive"
    NEEDS_MINING_POOL = "needs_mining_pool"
    MAINTENANCE = "maintenance"
    ERROR = "error"
    UNKNOWN = "unknown"


class PairingStatus(models.TextChoices):
    PAIRED = "PAIRED"
    UNPAIRED = "UNPAIRED"


class Device(models.Model):
    """A miner as the fleet gateway reports it, synced by `fleet_sync`. The latest telemetry sample
    is denormalized onto the row (`last_*`) so the selector reads one row per device."""

    org = models.ForeignKey("access.Organization", on_delete=models.CASCADE, related_name="+")
    identifier = models.CharField(max_length=100)
    name = models.CharField(max_length=200, blank=True, default="")
    model = models.CharField(max_length=100, blank=True, default="")
    site = models.CharField(max_length=100, blank=True, default="")
    driver = models.CharField(max_length=100, blank=True, default="")
    pairing_status = models.CharField(
        max_length=16, choices=PairingStatus.choices, default=PairingStatus.UNPAIRED
    )
    # Blank means the gateway reported no status at all (treated as stale telemetry).
    status = models.CharField(max_length=24, choices=DeviceStatus.choices, blank=True, default="")
    rated_power_w = models.PositiveIntegerField(default=0)
    deleted_at = models.DateTimeField(null=True, blank=True)
    synced_at = models.DateTimeField(null=True, blank=True)
    last_sample_at = models.DateTimeField(null=True, blank=True)
    last_power_w = models.FloatField(null=True, blank=True)
    last_hash_rate_hs = models.FloatField(null=True, blank=True)
    last_efficiency_j_th = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["identifier"]
        constraints = [
            models.UniqueConstraint(
                fields=["org", "identifier"],
                condition=Q(deleted_at__isnull=True),
                name="device_identifier_per_org",
            ),
        ]
        indexes = [models.Index(fields=["org", "identifier"], name="device_org_identifier")]

    def __str__(self) -> str:
        return self.identifier


class DeviceSample(models.Model):
    """One telemetry reading. Bulk-inserted every 15 s, pruned after the retention window."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="samples")
    taken_at = models.DateTimeField()
    power_w = models.FloatField(null=True)
    hash_rate_hs = models.FloatField(null=True)
    efficiency_j_th = models.FloatField(null=True)

    class Meta:
        indexes = [
            models.Index(fields=["device", "-taken_at"], name="sample_device_taken"),
            models.Index(fields=["taken_at"], name="sample_taken"),
        ]

    def __str__(self) -> str:
        return f"{self.device_id}@{self.taken_at:%H:%M:%S}"


class OrgCurtailmentConfig(models.Model):
    """Per-organization curtailment defaults; admins edit them in the console."""

    org = models.OneToOneField(
        "access.Organization", on_delete=models.CASCADE, primary_key=True, related_name="curtailment_config"
    )
    gateway_url = models.URLField(
        blank=True, default="", help_text="The fleet gateway of this organization; blank = no fleet to sync."
    )
    max_duration_default_sec = models.PositiveIntegerField(default=14400)
    candidate_min_power_w = models.PositiveIntegerField(default=1500)
    post_event_cooldown_sec = models.PositiveIntegerField(default=600)
    restore_interval_cap_sec = models.PositiveIntegerField(
        default=300, help_text="Highest restore batch interval a non-admin may choose."
    )
    curtail_confirm_timeout_sec = models.PositiveIntegerField(
        default=300,
        help_text="A dispatched curtail with no confirming telemetry after this long burns a retry.",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "organization curtailment config"
        constraints = [
            models.CheckConstraint(
                condition=Q(max_duration_default_sec__gt=0, max_duration_default_sec__lte=604800),
                name="curtailcfg_max_duration_range",
            ),
            models.CheckConstraint(
                condition=Q(candidate_min_power_w__gt=0), name="curtailcfg_min_power_positive"
            ),
        ]

    def __str__(self) -> str:
        return f"curtailment config of {self.org_id}"


class EventState(models.TextChoices):
    PENDING = "pending"
    ACTIVE = "active"
    RESTORING = "restoring"
    COMPLETED = "completed"
    COMPLETED_WITH_FAILURES = "completed_with_failures"
    CANCELLED = "cancelled"
    FAILED = "failed"


EVENT_MACHINE = Machine.declare(
    "curtailment.event",
    EventState,
    field="state",
    initial=EventState.PENDING,
    edges={
        EventState.PENDING: {
            # `curtailment_update`: operator-safe fields change, the state does not.
            EventState.PENDING: Role.OPERATOR,
            EventState.ACTIVE: None,  # curtailment_activate (reconciler)
            EventState.RESTORING: Role.OPERATOR,  # curtailment_stop
            EventState.COMPLETED_WITH_FAILURES: None,  # curtailment_complete: nothing curtailed
            EventState.CANCELLED: Role.ADMIN,  # curtailment_terminate
            EventState.FAILED: Role.ADMIN,  # curtailment_terminate
        },
        EventState.ACTIVE: {
            EventState.ACTIVE: Role.OPERATOR,  # curtailment_update
            # curtailment_stop; the reconciler's curtailment_expire (max duration) takes it too.
            EventState.RESTORING: Role.OPERATOR,
        },
        EventState.RESTORING: {
            EventState.COMPLETED: None,  # curtailment_complete
            EventState.COMPLETED_WITH_FAILURES: None,  # curtailment_complete
            EventState.CANCELLED: Role.ADMIN,  # curtailment_terminate
            EventState.FAILED: Role.ADMIN,  # curtailment_terminate
        },
    },
    description="""
A curtailment event. Operators start it (created `pending`), update it while `pending` or `active`,
and stop it (`restoring`); the reconciler activates it once its targets are curtailed, stops it when
its maximum duration is reached and completes it once every target is final. An admin in an
interactive session may terminate a `pending` or `restoring` event (an `active` one must be stopped
first, so no curtailed device is left behind). Every edge writes one audit row.
""",
)
EVENT_NON_TERMINAL = EVENT_MACHINE.non_terminal
EVENT_TERMINAL = tuple(s for s in EVENT_MACHINE.states if EVENT_MACHINE.is_terminal(s))
# The final states an admin may terminate an event into (cancelled, failed).
TERMINATE_STATES = tuple(
    s for s in EVENT_TERMINAL if any(e.target == s and e.role == Role.ADMIN for e in EVENT_MACHINE.edges)
)


class TargetState(models.TextChoices):
    PENDING = "pending"
    DISPATCHING = "dispatching"
    DISPATCHED = "dispatched"
    CONFIRMED = "confirmed"
    DRIFTED = "drifted"
    RESOLVED = "resolved"
    RESTORE_FAILED = "restore_failed"
    # Written off by an admin terminate before any command was sent to the device.
    CANCELLED = "cancelled"


TARGET_MACHINE = Machine.declare(
    "curtailment.target",
    TargetState,
    field="state",
    initial=TargetState.PENDING,
    edges={
        TargetState.PENDING: {
            TargetState.DISPATCHING: None,  # target_mark_dispatching
            # target_reset_for_restore (stop): the desired state becomes active
            TargetState.PENDING: Role.OPERATOR,
            TargetState.RESTORE_FAILED: Role.ADMIN,  # target_sweep (admin terminate)
            TargetState.CANCELLED: Role.ADMIN,  # target_sweep: never dispatched
        },
        TargetState.DISPATCHING: {
            # target_mark_dispatching: a crash orphan, redispatched with its first command id
            TargetState.DISPATCHING: None,
            TargetState.DISPATCHED: None,  # target_mark_dispatched
            # target_fail (a curtail while the event is pending, a restore) or a stop's reset
            TargetState.PENDING: Role.OPERATOR,
            TargetState.DRIFTED: None,  # target_fail while the event is active
            TargetState.RESTORE_FAILED: Role.ADMIN,  # target_fail (third strike) or target_sweep
        },
        TargetState.DISPATCHED: {
            TargetState.CONFIRMED: None,  # target_confirm
            TargetState.RESOLVED: None,  # target_resolve
            TargetState.PENDING: Role.OPERATOR,  # target_fail (confirmation timeout) or stop
            TargetState.RESTORE_FAILED: Role.ADMIN,  # target_fail (third strike) or target_sweep
        },
        TargetState.CONFIRMED: {
            TargetState.CONFIRMED: None,  # target_observe: still curtailed, fresh reading
            TargetState.DRIFTED: None,  # target_mark_drifted
            TargetState.PENDING: Role.OPERATOR,  # target_reset_for_restore (stop)
        },
        TargetState.DRIFTED: {
            TargetState.DISPATCHING: None,  # target_mark_dispatching
            TargetState.PENDING: Role.OPERATOR,  # target_reset_for_restore (stop)
            TargetState.RESTORE_FAILED: None,  # target_fail: retry budget spent
        },
    },
    description="""
One device in one curtailment event. The reconciler moves targets in set-based statements (one per
chunk of rows), each also locking the event in the state it expects and matching the target's phase
(`desired_state`); `dispatching` is committed before the gateway call. A stop resets every live
target to `pending` for the restore phase; an admin terminate sweeps the targets no command was ever
sent to to `cancelled` and the others to `restore_failed` (never a confirmed one: a curtailed device
is restored first). Target moves are not audited one by one (an
event has up to 10,000 targets): the event's audit rows (started, stopped, terminated, completed)
carry the counts, and the target keeps its own trail (`retry_count`, `last_error`,
`last_command_id`, `last_batch_id`).
""",
)
TARGET_NON_TERMINAL = TARGET_MACHINE.non_terminal
TARGET_TERMINAL = tuple(s for s in TARGET_MACHINE.states if TARGET_MACHINE.is_terminal(s))
# Curtail-direction targets past `pending` may have a curtail command acting on the device.
TARGET_IN_FLIGHT = tuple(s for s in TARGET_NON_TERMINAL if s != TARGET_MACHINE.initial)


class DesiredState(models.TextChoices):
    CURTAILED = "curtailed"
    ACTIVE = "active"


class Priority(models.TextChoices):
    NORMAL = "normal"
    EMERGENCY = "emergency"  # bypasses the post-event cooldown only


class ScopeType(models.TextChoices):
    WHOLE_ORG = "whole_org"
    DEVICE_LIST = "device_list"


class SourceActorType(models.TextChoices):
    USER = "user"
    API_KEY = "api_key"
    SCHEDULER = "scheduler"


class CurtailmentEvent(models.Model):
    """One request to shed `target_kw` from the organization's fleet. `EVENT_MACHINE` is its state
    machine; every change goes through the services in `curtailment.services` (operators) and
    `curtailment.lifecycle` (the reconciler)."""

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    org = models.ForeignKey("access.Organization", on_delete=models.PROTECT, related_name="+")
    state = models.CharField(max_length=32, choices=EventState.choices, default=EventState.PENDING)
    mode = models.CharField(max_length=16, default="fixed_kw")
    strategy = models.CharField(max_length=32, default="least_efficient_first")
    level = models.CharField(max_length=16, default="full")
    priority = models.CharField(max_length=16, choices=Priority.choices, default=Priority.NORMAL)
    scope_type = models.CharField(max_length=16, choices=ScopeType.choices, default=ScopeType.WHOLE_ORG)
    scope = models.JSONField(default=dict, blank=True)
    target_kw = models.FloatField("target kW")
    tolerance_kw = models.FloatField("tolerance kW", default=0)
    restore_batch_size = models.PositiveIntegerField(default=0)
    restore_batch_interval_sec = models.PositiveIntegerField(default=30)
    effective_batch_size = models.PositiveIntegerField()
    min_curtailed_duration_sec = models.PositiveIntegerField(default=0)
    max_duration_seconds = models.PositiveIntegerField(null=True, blank=True)
    allow_unbounded = models.BooleanField(default=False)
    include_maintenance = models.BooleanField(default=False)
    force_include_maintenance = models.BooleanField(default=False)
    decision_snapshot = models.JSONField(default=dict, blank=True)
    source_actor_type = models.CharField(max_length=16, choices=SourceActorType.choices)
    source_actor_id = models.CharField(max_length=64, blank=True, default="")
    # NULL, not "", means "not given": the partial unique indexes below must ignore absent keys.
    external_source = models.CharField(max_length=256, null=True, blank=True)  # noqa: DJ001
    external_reference = models.CharField(max_length=256, null=True, blank=True)  # noqa: DJ001
    idempotency_key = models.CharField(max_length=256, null=True, blank=True)  # noqa: DJ001
    reason = models.CharField(max_length=256)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.CheckConstraint(condition=EVENT_MACHINE.constraint_q(), name="curtailevent_state_valid"),
            models.UniqueConstraint(
                fields=["org", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False, state__in=EVENT_NON_TERMINAL),
                name="curtailevent_idempotency_live",
            ),
            models.UniqueConstraint(
                fields=["org", "external_source", "external_reference"],
                condition=Q(
                    external_source__isnull=False,
                    external_reference__isnull=False,
                    state__in=EVENT_NON_TERMINAL,
                ),
                name="curtailevent_external_ref_live",
            ),
            models.CheckConstraint(
                condition=Q(restore_batch_interval_sec__lte=3600), name="curtailevent_interval_range"
            ),
            models.CheckConstraint(
                condition=Q(max_duration_seconds__isnull=True)
                | Q(max_duration_seconds__gte=1, max_duration_seconds__lte=604800),
                name="curtailevent_max_duration_range",
            ),
            models.CheckConstraint(
                condition=Q(allow_unbounded=True) | Q(max_duration_seconds__isnull=False),
                name="curtailevent_bounded_unless_allowed",
            ),
            models.CheckConstraint(
                condition=Q(include_maintenance=models.F("force_include_maintenance")),
                name="curtailevent_maintenance_flags_equal",
            ),
            models.CheckConstraint(condition=~Q(reason=""), name="curtailevent_reason_required"),
            models.CheckConstraint(condition=Q(target_kw__gt=0), name="curtailevent_target_positive"),
        ]
        indexes = [
            models.Index(fields=["org", "-id"], name="curtailevent_org_id"),
            models.Index(
                fields=["state"], condition=Q(state__in=EVENT_NON_TERMINAL), name="curtailevent_live"
            ),
            # The console's search: a substring of the reason (`reason__icontains` compares
            # UPPER(reason) LIKE '%…%', answered by this trigram index), or an exact external reference.
            GinIndex(OpClass(Upper("reason"), name="gin_trgm_ops"), name="curtailevent_reason_trgm"),
            models.Index(
                fields=["external_reference"],
                condition=Q(external_reference__isnull=False),
                name="curtailevent_external_ref",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.reason[:40]} ({self.state})"

    @property
    def is_terminal(self) -> bool:
        return EVENT_MACHINE.is_terminal(self.state)


class CurtailmentTarget(models.Model):
    """One device in one event. A device is in at most one non-terminal target across all events:
    the partial unique constraint makes two concurrent starts unable to grab the same device."""

    # No index of its own: `curtailtarget_device_once_per_event` and `curtailtarget_event_state_id`
    # both lead with the event, and every index is one more write on each state change.
    event = models.ForeignKey(
        CurtailmentEvent, on_delete=models.CASCADE, related_name="targets", db_index=False
    )
    device = models.ForeignKey(Device, on_delete=models.PROTECT, related_name="+")
    device_identifier = models.CharField(max_length=100)
    state = models.CharField(max_length=16, choices=TargetState.choices, default=TargetState.PENDING)
    desired_state = models.CharField(
        max_length=16, choices=DesiredState.choices, default=DesiredState.CURTAILED
    )
    baseline_power_w = models.FloatField(null=True, blank=True)
    efficiency_j_th = models.FloatField(null=True, blank=True)
    observed_power_w = models.FloatField(null=True, blank=True)
    observed_at = models.DateTimeField(null=True, blank=True)
    confirmed_at = models.DateTimeField(null=True, blank=True)
    last_dispatched_at = models.DateTimeField(null=True, blank=True)
    last_command_id = models.CharField(max_length=120, blank=True, default="")
    last_batch_id = models.CharField(max_length=64, blank=True, default="")
    # Attempts of the current phase; part of the command id, so a crash-orphan is redispatched
    # with the id it was first sent with and the device side deduplicates it.
    dispatch_attempt = models.PositiveIntegerField(default=0)
    retry_count = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    added_at = models.DateTimeField()

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(condition=TARGET_MACHINE.constraint_q(), name="curtailtarget_state_valid"),
            models.CheckConstraint(
                condition=Q(desired_state__in=DesiredState.values), name="curtailtarget_desired_valid"
            ),
            models.UniqueConstraint(fields=["event", "device"], name="curtailtarget_device_once_per_event"),
            models.UniqueConstraint(
                fields=["device"],
                condition=Q(state__in=TARGET_NON_TERMINAL),
                name="curtailtarget_one_live_per_device",
            ),
        ]
        # (event, state, id): a tick reads one state of its event, and the restore claim takes the
        # next batch of pending targets in id order straight off the index (no sort of the rest).
        indexes = [models.Index(fields=["event", "state", "id"], name="curtailtarget_event_state_id")]

    def __str__(self) -> str:
        return f"{self.device_identifier} ({self.state}/{self.desired_state})"
