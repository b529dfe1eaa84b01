"""Address groups, keys and their re-stake lifecycle (seed 000).

Moving a key to another address group commits at once; the on-chain re-stake happens later, on the
re-stake schedule, and can fail. `Key.migration_status` is what an operator watches::

    none ─(migrate)─> scheduled ─(attempt claimed: +1, pending tx)──> [in flight]
                 ^                                             │ verdict (CAS on the tx)
                 │                 ┌── success ────────────────┴──> succeeded
                 │                 ├── failure, attempts < max ──> retrying ─(due)─> [in flight]
                 │                 └── failure, attempts = max ──> failed
                 └──(manual retry | cool-down reset | migrate again)── retrying | failed | succeeded

A claimed attempt keeps the status it was claimed in (`scheduled` for attempt 1, `retrying` after)
with `migration_next_attempt_at` NULL: "in flight" is that, plus one pending `StakeTransaction`. A key
migrated or retried while an older attempt is still pending also waits with NULL: that attempt's
verdict (recorded as superseded) releases it, so the claim never needs to look for pending rows.

Stake transaction (one per attempt; at most one `pending` per key, by a partial unique index)::

    pending/claimed ─(commit hash, heights)─> pending/broadcasting ─(node took it)─> pending/sent
        │  (a worker that died here is recovered: re-claimed, broadcast once)    │
        │                                            verification: confirmed | absent | unavailable
        └─(no hash: CheckTx refused)─> failure     success <─ code 0 ──┤  (absent past the timeout)
                                                   failure <─ code ≠ 0 ┴──────────> failure

    pending/broadcasting ─(transport error, or its worker died)─> pending/unknown
        ─(looked up by hash: on chain)─> success | failure (its code)
        ─(not on chain, before its timeout height)─> pending/resending ─(node took it)─> pending/sent
    A transaction is re-sent at most once, with the same bytes (same hash); verification's coverage
    scan covers `unknown` and `resending` rows too, and fails them only past the timeout height.

The three machines are declared once below (`KEY_MIGRATION_MACHINE`, `STAKE_TX_MACHINE`,
`BROADCAST_MACHINE`): the check constraints, the state lists the code filters on, the transition
kernel (`fleetops.lib.transition`), the generated tests and the drawn diagrams
(`docs/state-machines.md`, the key's admin page) all read them. Every change goes through the
services in `migrations_app.keys` (see `migrations_app.keys.services`); the re-stake and verification
loops in `migrations_app.keys.schedule` / `verification` claim rows with `FOR UPDATE SKIP LOCKED`.
Every `migration_status` change writes one audit row per key (bulk moves: one INSERT per batch), so
a key's audit trail replays to its status. Stake-transaction and broadcast moves are engine steps
recorded in the key's `RemediationEntry` history, not in the audit log.
"""

from __future__ import annotations

from collections.abc import Mapping

from django.db import models
from django.db.models import F, Q

from fleetops.access.models import Role
from fleetops.lib.machine import Machine

__all__ = [
    "BROADCAST_MACHINE",
    "BROADCAST_STARTED",
    "KEY_MIGRATION_DUE",
    "KEY_MIGRATION_GIVEN_UP",
    "KEY_MIGRATION_MACHINE",
    "KEY_MIGRATION_RETRYABLE",
    "KEY_MIGRATION_TRANSITIONS",
    "STAKE_TX_MACHINE",
    "STAKE_TX_PENDING",
    "AddressGroup",
    "BroadcastState",
    "Key",
    "KeyMigrationStatus",
    "KeyState",
    "OrgKeyConfig",
    "RemediationEntry",
    "RemediationOutcome",
    "RemediationReason",
    "StakeTransaction",
    "StakeTxStatus",
]


class KeyState(models.TextChoices):
    """The key's on-chain supplier state as the provider tracks it (the subset the flows need)."""

    AVAILABLE = "available"
    STAKING = "staking"
    STAKED = "staked"
    UNSTAKING = "unstaking"
    UNSTAKED = "unstaked"
    ATTENTION_NEEDED = "attention_needed"
    REMEDIATION_FAILED = "remediation_failed"


class KeyMigrationStatus(models.TextChoices):
    NONE = "none", "None"
    SCHEDULED = "scheduled", "Scheduled"
    RETRYING = "retrying", "Retrying"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


KEY_MIGRATION_MACHINE = Machine.declare(
    "keys.migration",
    KeyMigrationStatus,
    field="migration_status",
    initial=KeyMigrationStatus.NONE,
    description=(
        "A key's address-group migration: the operator schedules it (migrate, manual retry), the "
        "re-stake engine's verdicts move it on. The scheduler's cool-down reset takes the operator "
        "edge failed -> scheduled (the scheduler acts as an operator)."
    ),
    edges={
        # migrate
        KeyMigrationStatus.NONE: {KeyMigrationStatus.SCHEDULED: Role.OPERATOR},
        KeyMigrationStatus.SCHEDULED: {
            KeyMigrationStatus.SCHEDULED: Role.OPERATOR,  # migrated again
            # verdicts of the attempt in flight (success; failure with attempts left; at the limit)
            KeyMigrationStatus.RETRYING: None,
            KeyMigrationStatus.SUCCEEDED: None,
            KeyMigrationStatus.FAILED: None,
        },
        KeyMigrationStatus.RETRYING: {
            KeyMigrationStatus.SCHEDULED: Role.OPERATOR,  # manual retry or migrated again
            KeyMigrationStatus.RETRYING: None,
            KeyMigrationStatus.SUCCEEDED: None,
            KeyMigrationStatus.FAILED: None,
        },
        KeyMigrationStatus.SUCCEEDED: {KeyMigrationStatus.SCHEDULED: Role.OPERATOR},  # migrated again
        # manual retry, migrated again, cool-down reset (scheduler)
        KeyMigrationStatus.FAILED: {KeyMigrationStatus.SCHEDULED: Role.OPERATOR},
    },
)

# The state lists the code filters on, all read from the machine (never retyped):
# - due: the states the engine still moves on its own (they have a verdict edge out); the schedule
#   claims keys in them whose next attempt is due;
KEY_MIGRATION_DUE: tuple[str, ...] = tuple(
    s
    for s in KEY_MIGRATION_MACHINE.states
    if any(e.engine_only and e.source == s for e in KEY_MIGRATION_MACHINE.edges)
)
# - retryable: where a failing verdict leaves a key (the verdict edges' targets but the success
#   one); a manual retry re-queues exactly these;
KEY_MIGRATION_RETRYABLE: tuple[str, ...] = tuple(
    s
    for s in KEY_MIGRATION_MACHINE.states
    if s != KeyMigrationStatus.SUCCEEDED
    and any(e.engine_only and e.target == s for e in KEY_MIGRATION_MACHINE.edges)
)
# - given up: retryable keys the engine no longer moves (the cool-down reset's and `--all-failed`'s).
KEY_MIGRATION_GIVEN_UP: tuple[str, ...] = tuple(
    s for s in KEY_MIGRATION_RETRYABLE if s not in KEY_MIGRATION_DUE
)
# Where each status may go next (a view of the machine, for readers of the old map).
KEY_MIGRATION_TRANSITIONS: Mapping[str, tuple[str, ...]] = {
    s: KEY_MIGRATION_MACHINE.targets(s) for s in KEY_MIGRATION_MACHINE.states
}


class RemediationReason(models.TextChoices):
    """Igniter's RemediationHistoryEntryReason codes; this portal acts on 1006 only."""

    ADDRESS_GROUP_MIGRATION = "1006", "Address group migration"


class RemediationOutcome(models.TextChoices):
    MIGRATED = "migrated", "Migrated to group"
    BROADCAST = "broadcast", "Stake tx broadcast"
    SUCCEEDED = "succeeded", "Re-staked on chain"
    ATTEMPT_FAILED = "attempt_failed", "Attempt failed, will retry"
    FAILED = "failed", "Failed: attempt limit reached"
    SUPERSEDED = "superseded", "Verdict of a superseded attempt"
    OUTCOME_UNKNOWN = "outcome_unknown", "Broadcast outcome unknown (transport error)"
    RESENT = "resent", "Not on chain: re-sent once (same bytes)"
    MANUAL_RETRY = "manual_retry", "Manual retry"
    AUTO_RESET = "auto_reset", "Cool-down auto-reset"


class StakeTxStatus(models.TextChoices):
    PENDING = "pending"
    SUCCESS = "success"
    FAILURE = "failure"


class BroadcastState(models.TextChoices):
    """Where a pending transaction is on its way to the node (meaningless once terminal)."""

    CLAIMED = "claimed", "Claimed, not sent"
    BROADCASTING = "broadcasting", "Broadcast started"
    UNKNOWN = "unknown", "Outcome unknown: to be looked up by hash"
    RESENDING = "resending", "Not on chain: re-sent once (same bytes)"
    SENT = "sent", "Accepted by the node"


STAKE_TX_MACHINE = Machine.declare(
    "keys.stake_tx",
    StakeTxStatus,
    field="status",
    initial=StakeTxStatus.PENDING,
    description="One re-stake attempt's transaction: verification (or CheckTx) gives its verdict once.",
    edges={StakeTxStatus.PENDING: {StakeTxStatus.SUCCESS: None, StakeTxStatus.FAILURE: None}},
)
# The one open state of a stake transaction (unpacking fails loudly if the machine grows another).
(STAKE_TX_PENDING,) = STAKE_TX_MACHINE.non_terminal

BROADCAST_MACHINE = Machine.declare(
    "keys.stake_tx_broadcast",
    BroadcastState,
    field="broadcast_state",
    initial=BroadcastState.CLAIMED,
    description=(
        "Where a pending stake transaction is on its way to the node. `broadcasting` is committed "
        "before the call; a transport error (timeout, connection reset) or a worker that died in "
        "the call leaves the outcome `unknown`, and the next pass looks the hash up on chain: found "
        "is the verdict, missing is re-sent once with the same bytes (`resending`, committed before "
        "the call, with no way back). A claimed row of a dead worker is taken over in place."
    ),
    edges={
        BroadcastState.CLAIMED: {BroadcastState.BROADCASTING: None},
        BroadcastState.BROADCASTING: {BroadcastState.SENT: None, BroadcastState.UNKNOWN: None},
        BroadcastState.UNKNOWN: {BroadcastState.RESENDING: None},
        BroadcastState.RESENDING: {BroadcastState.SENT: None},
    },
)
# Past the pre-state commit: the transaction has its hash and may be on chain (verification's queue).
BROADCAST_STARTED: tuple[str, ...] = tuple(
    s for s in BROADCAST_MACHINE.states if s != BROADCAST_MACHINE.initial
)


class AddressGroup(models.Model):
    """A slot binding a relay miner to on-chain services, with revenue-share settings. Keys stake
    for their group's services; a group that still has keys cannot be deleted (PROTECT)."""

    org = models.ForeignKey("access.Organization", on_delete=models.CASCADE, related_name="+")
    name = models.CharField(max_length=100)
    services = models.JSONField(default=list, blank=True, help_text="Service ids the keys stake for.")
    relay_miner = models.CharField(max_length=200, blank=True, default="")
    region = models.CharField(max_length=50, blank=True, default="")
    # Operator share entries [{"address": ..., "percentage": ...}]; the owner gets the remainder.
    operator_shares = models.JSONField(default=list, blank=True)
    supplier_share_percentage = models.PositiveSmallIntegerField(null=True, blank=True)
    private = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["org", "name"], name="addressgroup_name_per_org"),
            models.CheckConstraint(
                condition=Q(supplier_share_percentage__isnull=True)
                | Q(supplier_share_percentage__gte=1, supplier_share_percentage__lte=100),
                name="addressgroup_supplier_share_range",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class OrgKeyConfig(models.Model):
    """Per-organization re-stake settings: the chain to stake on and the attempt limit."""

    org = models.OneToOneField(
        "access.Organization", on_delete=models.CASCADE, primary_key=True, related_name="key_config"
    )
    rpc_url = models.URLField(blank=True, default="", help_text="Chain RPC; blank = keys are not re-staked.")
    max_attempts = models.PositiveSmallIntegerField(
        null=True,
        blank=True,
        help_text="Attempts before a key is failed; blank = the KEYS_MAX_ATTEMPTS setting.",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "organization key config"
        constraints = [
            models.CheckConstraint(
                condition=Q(max_attempts__isnull=True) | Q(max_attempts__gte=1, max_attempts__lte=100),
                name="orgkeycfg_max_attempts_range",
            )
        ]

    def __str__(self) -> str:
        return f"key config of {self.org_id}"


class Key(models.Model):
    """A supplier operator key staked on a chain, and its address-group migration lifecycle.

    `migration_round` increases at every migrate and manual retry: a stake transaction belongs to
    one round, so the verdict of an attempt the operator has since superseded never moves the key.
    """

    org = models.ForeignKey("access.Organization", on_delete=models.PROTECT, related_name="+")
    address = models.CharField(max_length=100, unique=True)
    public_key = models.CharField(max_length=66, unique=True)
    owner_address = models.CharField(max_length=100, blank=True, default="")
    address_group = models.ForeignKey(
        AddressGroup, on_delete=models.PROTECT, null=True, blank=True, related_name="keys"
    )
    state = models.CharField(max_length=24, choices=KeyState.choices, default=KeyState.STAKED)
    retired_at = models.DateTimeField(null=True, blank=True, help_text="Unbonding: never re-staked again.")
    migration_status = models.CharField(
        max_length=16,
        choices=KeyMigrationStatus.choices,
        default=KEY_MIGRATION_MACHINE.initial,
        db_index=True,
    )
    migration_attempts = models.PositiveSmallIntegerField(default=0)
    migration_max_attempts = models.PositiveSmallIntegerField(default=0)
    migration_next_attempt_at = models.DateTimeField(null=True, blank=True)
    migration_last_error = models.TextField(blank=True, default="")
    migration_manual_retries = models.PositiveIntegerField(default=0)
    migration_round = models.PositiveIntegerField(default=0)
    # When the current round began (migrate, manual retry, auto-reset): "stuck" and the oldest
    # scheduled key are measured from here, not from the last attempt.
    migration_scheduled_at = models.DateTimeField(null=True, blank=True)
    migration_updated_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(condition=Q(state__in=KeyState.values), name="key_state_valid"),
            models.CheckConstraint(
                condition=KEY_MIGRATION_MACHINE.constraint_q(), name="key_migration_status_valid"
            ),
            models.CheckConstraint(
                condition=Q(migration_attempts__lte=F("migration_max_attempts")),
                name="key_attempts_within_limit",
            ),
        ]
        indexes = [
            models.Index(fields=["org", "id"], name="key_org_id"),
            # The console's and the API's search by owner (address and public key are unique).
            models.Index(fields=["owner_address"], name="key_owner_address"),
            # The schedule's claim: due keys in (next attempt time, id) order, read as a range scan.
            models.Index(
                fields=["migration_next_attempt_at", "id"],
                condition=Q(migration_status__in=KEY_MIGRATION_DUE),
                name="key_migration_due",
            ),
            # Stuck and overdue keys (console filters, the dashboard's oldest due key): due keys by
            # round start, and in-flight keys (claimed, no next attempt) by last change. Both stay
            # as small as the due set; without them each read visits every due key's row.
            models.Index(
                fields=["migration_scheduled_at"],
                condition=Q(migration_status__in=KEY_MIGRATION_DUE),
                name="key_due_scheduled",
            ),
            models.Index(
                fields=["migration_updated_at"],
                condition=Q(migration_status__in=KEY_MIGRATION_DUE, migration_next_attempt_at__isnull=True),
                name="key_in_flight",
            ),
            # The dashboard's newest failures (failed keys only, newest change first).
            models.Index(
                fields=["-migration_updated_at"],
                condition=Q(migration_status=KeyMigrationStatus.FAILED),
                name="key_failed_recent",
            ),
        ]

    def __str__(self) -> str:
        return self.address

    @property
    def in_flight(self) -> bool:
        return self.migration_status in KEY_MIGRATION_DUE and self.migration_next_attempt_at is None


class RemediationEntry(models.Model):
    """One step of a key's migration history: migrated, each attempt's outcome, manual retries.
    Append-only; it survives manual retries (the lineage an operator reads on the key page)."""

    key = models.ForeignKey(Key, on_delete=models.CASCADE, related_name="remediation_entries")
    reason = models.CharField(
        max_length=10, choices=RemediationReason.choices, default=RemediationReason.ADDRESS_GROUP_MIGRATION
    )
    round = models.PositiveIntegerField(default=0)
    attempt = models.PositiveSmallIntegerField(default=0)
    outcome = models.CharField(max_length=16, choices=RemediationOutcome.choices)
    message = models.CharField(max_length=300, blank=True, default="")
    error = models.TextField(blank=True, default="")
    tx_hash = models.CharField(max_length=64, blank=True, default="")
    result_code = models.IntegerField(null=True, blank=True)
    actor_label = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["-id"]
        verbose_name_plural = "remediation entries"
        constraints = [
            models.CheckConstraint(
                condition=Q(outcome__in=RemediationOutcome.values), name="remediation_outcome_valid"
            )
        ]
        indexes = [models.Index(fields=["key", "-id"], name="remediation_key_id")]

    def __str__(self) -> str:
        return f"{self.key_id} {self.outcome} #{self.attempt}"


class StakeTransaction(models.Model):
    """One re-stake attempt's transaction. The hash is computed from the deterministic tx bytes
    before the broadcast and committed first, so a crash mid-broadcast leaves a verifiable row."""

    key = models.ForeignKey(Key, on_delete=models.CASCADE, related_name="stake_transactions")
    reason = models.CharField(
        max_length=10, choices=RemediationReason.choices, default=RemediationReason.ADDRESS_GROUP_MIGRATION
    )
    round = models.PositiveIntegerField()
    attempt = models.PositiveSmallIntegerField()
    status = models.CharField(max_length=8, choices=StakeTxStatus.choices, default=STAKE_TX_MACHINE.initial)
    broadcast_state = models.CharField(
        max_length=16, choices=BroadcastState.choices, default=BROADCAST_MACHINE.initial
    )
    # Who holds the claim (a random token per worker pass) and since when: a claimed row whose
    # holder went silent past the lease is taken over and broadcast by the next pass.
    claim_token = models.CharField(max_length=32, blank=True, default="")
    claimed_at = models.DateTimeField()
    payload = models.JSONField(default=dict, blank=True)
    hash = models.CharField(max_length=64, blank=True, default="")
    execution_height = models.BigIntegerField(null=True, blank=True)
    last_covered_height = models.BigIntegerField(null=True, blank=True)
    timeout_height = models.BigIntegerField(null=True, blank=True)
    landed_height = models.BigIntegerField(null=True, blank=True)
    unavailable_checks = models.PositiveIntegerField(default=0)
    last_verification_at = models.DateTimeField(null=True, blank=True)
    broadcast_at = models.DateTimeField(null=True, blank=True)
    code = models.IntegerField(null=True, blank=True)
    message = models.TextField(blank=True, default="")
    created_at = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.CheckConstraint(condition=STAKE_TX_MACHINE.constraint_q(), name="staketx_status_valid"),
            models.CheckConstraint(
                condition=BROADCAST_MACHINE.constraint_q(), name="staketx_broadcast_state_valid"
            ),
            # At most one pending transaction per key: two workers cannot both claim a key.
            models.UniqueConstraint(
                fields=["key"], condition=Q(status=STAKE_TX_PENDING), name="staketx_one_pending_per_key"
            ),
            # Every attempt is counted once.
            models.UniqueConstraint(fields=["key", "round", "attempt"], name="staketx_one_per_attempt"),
            models.CheckConstraint(
                condition=Q(status=STAKE_TX_PENDING) | Q(resolved_at__isnull=False),
                name="staketx_resolved_when_terminal",
            ),
        ]
        indexes = [
            # The verification queue.
            models.Index(
                fields=["last_verification_at"],
                condition=Q(status=STAKE_TX_PENDING),
                name="staketx_pending_verify",
            ),
            # A key's transactions newest first (its page in the console and the API): without it
            # the planner walks the primary key backwards past every other key's rows.
            models.Index(fields=["key", "-id"], name="staketx_key_id"),
        ]

    def __str__(self) -> str:
        return f"{self.key_id} #{self.round}.{self.attempt} {self.status}"
