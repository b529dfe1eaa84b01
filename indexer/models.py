"""The forever indexer's storage: one chain per row, its single-writer state, and the indexed
blocks, transactions and events with deterministic identities (a replay can never duplicate a row).

Three state machines live here, declared once (`fleetops.lib.machine`): the indexer's mode
(`MODE_MACHINE`), a sync source's connection status (`CONNECTION_MACHINE`) and an enrichment row's
status (`ENRICHMENT_MACHINE`). Their check constraints, the transition kernel, the generated tests and
the diagrams (docs, admin) all read these declarations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db import models
from django.db.models import Q

from fleetops.access.models import Role
from fleetops.lib import clock
from fleetops.lib.machine import Machine, engine_too


class Chain(models.Model):
    org = models.ForeignKey("access.Organization", on_delete=models.PROTECT, related_name="+")
    slug = models.SlugField(max_length=60, unique=True)
    chain_id = models.CharField(max_length=100, help_text="Expected /status network; a mismatch halts.")
    fingerprint = models.CharField(
        max_length=64,
        blank=True,
        default="",
        help_text="Hash of the first indexed block, stored on first connect.",
    )
    expected_block_time_seconds = models.FloatField(default=6.0)
    head_lag = models.PositiveIntegerField(default=0)
    finality_depth = models.PositiveIntegerField(default=64, help_text="Deepest automatic rollback.")
    catchup_batch_size = models.PositiveIntegerField(
        default=50, help_text="Blocks per transaction in catch-up."
    )
    max_in_flight = models.PositiveIntegerField(default=8)
    decode_concurrency = models.PositiveIntegerField(
        default=4, help_text="Decoder requests an enrichment worker makes at once."
    )
    enrichment_batch_size = models.PositiveIntegerField(
        default=200, help_text="Enrichment rows a worker claims per round."
    )
    rollback_automation = models.BooleanField(default=True)
    enrichment_enabled = models.BooleanField(default=True)
    # Changed only through `indexer.retention.chain_set_retention` (admin role, audited).
    retain_heights = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text=(
            "Keep only this many heights below the indexed tip; older height ranges are "
            "dropped a whole partition at a time. Empty: keep forever."
        ),
    )

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class Mode(models.TextChoices):
    NORMAL = "normal"
    CATCHING_UP = "catching_up"
    IDLE = "idle"
    DEGRADED = "degraded"
    HALTED = "halted"


# Engine edges (`None`) are the portal's own steps (the writer, enrichment workers); the role edges
# are what a person needs (see the docstrings below each machine).
_ENGINE = None

MODE_MACHINE = Machine.declare(
    "indexer.mode",
    Mode,
    field="mode",
    initial=Mode.CATCHING_UP,
    edges={
        Mode.CATCHING_UP: {
            Mode.NORMAL: _ENGINE,
            Mode.IDLE: _ENGINE,
            Mode.DEGRADED: _ENGINE,
            Mode.HALTED: _ENGINE,
        },
        Mode.NORMAL: {
            Mode.CATCHING_UP: _ENGINE,
            Mode.IDLE: _ENGINE,
            Mode.DEGRADED: _ENGINE,
            Mode.HALTED: _ENGINE,
        },
        Mode.IDLE: {
            Mode.NORMAL: _ENGINE,
            Mode.CATCHING_UP: _ENGINE,
            Mode.DEGRADED: _ENGINE,
            Mode.HALTED: _ENGINE,
        },
        Mode.DEGRADED: {
            # Retry poison height (an admin), or the writer when steps pass again.
            Mode.CATCHING_UP: engine_too(Role.ADMIN),
            Mode.NORMAL: _ENGINE,
            Mode.IDLE: _ENGINE,
            Mode.HALTED: _ENGINE,
        },
        # Resume (an admin), or the writer carrying out an admin's rollback request.
        Mode.HALTED: {Mode.CATCHING_UP: engine_too(Role.ADMIN)},
    },
    description=(
        "The single writer of a chain. catching_up / normal / idle are the quiet modes: the writer "
        "moves between them on its own, unaudited (counted in fleetops_indexer_mode_changes_total). "
        "Every edge into or out of degraded and halted writes one audit row."
    ),
)
"""`IndexerState.mode`::

    catching_up <-> normal <-> idle <-> catching_up     the quiet modes: the writer's steps, NOT audited
         |            |          |
         +------------+----------+--> degraded          steps keep failing, a poison height, a range
         |            |          |                      no source serves (audited)
         +------------+----------+--> halted            identity mismatch, a reorg the writer may not
                                                        roll back: writes nothing (audited)
    degraded --> halted                                 (audited)
    degraded --> normal | idle | catching_up            the writer: steps pass again (audited)
    degraded --> catching_up                            admin: Retry poison height (audited)
    halted   --> catching_up                            admin: Resume, or the writer carrying out an
                                                        admin's rollback request (audited)

Audit policy (issue 10): entering or leaving `degraded` or `halted` writes one audit row, in the
transaction of the compare-and-set (actor: the writer, `Actor.scheduler("indexer_run")`, or the
admin). The quiet edges (catching_up, normal, idle) flap with the chain, block by block when it
produces slowly, so they are taken with `action=None`: they are counted in
`fleetops_indexer_mode_changes_total{chain,from_mode,to_mode}` and visible as the mode gauge, the
heartbeat and the lag chart, never as audit rows. Consequence for the audit trail of a state: its
moves are all audited edges, and between two of them (and before the first, after the last) the
mode only walked quiet edges. So the trail replays over `MODE_MACHINE` once each gap between two
quiet modes is filled with the quiet edge that joins them, and a gap with a loud end (a move into or
out of degraded / halted without its row) makes the replay fail (`tests/indexer/mode_trail.py`).

`paused` is a flag, not a mode: a paused chain keeps its mode (a halted chain is paused so a shell
command can take the lease), and only the operator services write it, each with an audit row.

Two `Role.ADMIN` edges are also taken by the writer itself, declared `engine_too(Role.ADMIN)`:
leaving `degraded` when steps pass again (a stall that cleared) and leaving `halted` when it carries
out a rollback request (the admin role was checked when the request was accepted). The kernel lets
the scheduler and system actors take them as an engine step (`fleetops.lib.transition.authorize`);
a person still needs the admin role.
"""

# The audit policy (issue 10), not a property of the edges: the modes an operator must hear about,
# so every move into or out of them writes an audit row. Kept as a list on purpose; it is checked
# against the machine's states below.
MODE_LOUD: tuple[str, ...] = (Mode.DEGRADED.value, Mode.HALTED.value)
MODE_QUIET: tuple[str, ...] = tuple(s for s in MODE_MACHINE.states if s not in MODE_LOUD)
assert set(MODE_LOUD) < set(MODE_MACHINE.states), "MODE_LOUD names a mode MODE_MACHINE does not have"


def beside_state(machine: Machine, fields: Mapping[str, Any]) -> dict[str, Any]:
    """`fields` for a plain `.update(**fields)` on a row of `machine`: the columns beside its state.
    Refuses the state column itself, which only the transition kernel (`fleetops.lib.transition`)
    writes, so an `.update(**beside_state(...))` never moves a state outside the kernel."""
    if machine.field in fields:
        raise ValueError(f"{machine.name}: {machine.field!r} moves only through the transition kernel")
    return dict(fields)


def mode_edge_audited(source: str, target: str) -> bool:
    """Whether the mode edge source -> target writes an audit row (see `MODE_MACHINE`)."""
    return source in MODE_LOUD or target in MODE_LOUD


class IndexerState(models.Model):
    """Where the single writer of a chain stands. `last_indexed_height` only moves by compare-and-set
    inside the transaction that wrote the rows up to it, so it never claims unwritten heights."""

    chain = models.OneToOneField(Chain, on_delete=models.CASCADE, primary_key=True, related_name="state")
    last_indexed_height = models.BigIntegerField(null=True, blank=True)
    oldest_indexed_height = models.BigIntegerField(null=True, blank=True)
    head_height = models.BigIntegerField(null=True, blank=True)
    head_moved_at = models.DateTimeField(null=True, blank=True)
    mode = models.CharField(max_length=16, choices=Mode.choices, default=Mode.CATCHING_UP)
    paused = models.BooleanField(default=False)
    poison_height = models.BigIntegerField(null=True, blank=True)
    poison_attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    # An operator's rollback (admin action or API) is a request the writer carries out under its
    # lease on its next step, so it is fenced like every other write.
    rollback_requested_to = models.BigIntegerField(null=True, blank=True)
    rollback_requested_reason = models.TextField(blank=True, default="")
    rollback_requested_by = models.CharField(max_length=200, blank=True, default="")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=MODE_MACHINE.constraint_q(), name="indexerstate_mode_valid")
        ]

    def __str__(self) -> str:
        return f"{self.chain_id} at {self.last_indexed_height} ({self.mode})"


class Block(models.Model):
    """An indexed block. Blocks, transactions and events are partitioned tables in the database:
    LIST by chain, then RANGE by height (`indexer.partitions`), with (id, chain_id, height) as the
    database's primary key; `id` stays the primary key Django knows (one sequence, still unique)."""

    chain = models.ForeignKey(Chain, on_delete=models.CASCADE, related_name="+", db_index=False)
    height = models.BigIntegerField()
    hash = models.CharField(max_length=64)
    parent_hash = models.CharField(max_length=64)
    time = models.DateTimeField(null=True)
    proposer = models.CharField(max_length=64, blank=True, default="")
    tx_count = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["chain", "height"], name="block_identity")]
        indexes = [models.Index(fields=["chain", "hash"], name="block_chain_hash")]

    def __str__(self) -> str:
        return f"{self.height} {self.hash[:12]}"


class Transaction(models.Model):
    """An indexed transaction; partitioned like `Block`."""

    chain = models.ForeignKey(Chain, on_delete=models.CASCADE, related_name="+", db_index=False)
    height = models.BigIntegerField()
    index = models.PositiveIntegerField()
    hash = models.CharField(max_length=64)
    code = models.PositiveIntegerField(default=0)
    gas_wanted = models.BigIntegerField(default=0)
    gas_used = models.BigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["chain", "height", "index"], name="tx_identity")]
        indexes = [models.Index(fields=["chain", "hash"], name="tx_chain_hash")]

    def __str__(self) -> str:
        return f"{self.height}/{self.index} {self.hash[:12]}"


class Phase(models.TextChoices):
    BEGIN_BLOCK = "begin_block"
    TX = "tx"
    END_BLOCK = "end_block"
    FINALIZE_BLOCK = "finalize_block"


class Event(models.Model):
    """`tx_index` is NULL for block-level events; the identity treats NULLs as equal. Partitioned
    like `Block`."""

    chain = models.ForeignKey(Chain, on_delete=models.CASCADE, related_name="+", db_index=False)
    height = models.BigIntegerField()
    phase = models.CharField(max_length=16, choices=Phase.choices)
    tx_index = models.PositiveIntegerField(null=True, blank=True)
    event_index = models.PositiveIntegerField()
    type = models.CharField(max_length=200)
    attributes = models.JSONField(default=list, help_text="[{key, value, index}] in node order.")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["chain", "height", "phase", "tx_index", "event_index"],
                name="event_identity",
                nulls_distinct=False,
            ),
        ]
        # The API and the admin walk events newest first by id (keyset), optionally by type.
        indexes = [
            models.Index(fields=["chain", "type", "height"], name="event_chain_type_height"),
            models.Index(fields=["chain", "id"], name="event_chain_id"),
            models.Index(fields=["chain", "type", "id"], name="event_chain_type_id"),
        ]

    def __str__(self) -> str:
        return f"{self.height} {self.phase} {self.type}"


class ChainLagSample(models.Model):
    """Head and indexed height of a chain, sampled by the writer about once a minute (the admin's lag
    chart); pruned after a week."""

    chain = models.ForeignKey(Chain, on_delete=models.CASCADE, related_name="+")
    at = models.DateTimeField()
    head_height = models.BigIntegerField(null=True)
    indexed_height = models.BigIntegerField(null=True)

    class Meta:
        indexes = [models.Index(fields=["chain", "at"], name="lagsample_chain_at")]

    def __str__(self) -> str:
        lag = (self.head_height or 0) - (self.indexed_height or 0)
        return f"{self.chain_id} {self.at:%Y-%m-%d %H:%M} lag {lag}"


class ConnectionStatus(models.IntegerChoices):
    """A source's connection, as in seed 002 (the gauge exports the number).

    disconnected(0) -> connecting(1) -> connected(3)     it answers, caught up on two checks in a row
    connected(3) <-> syncing(2)                          the indexer catches up from it
    syncing(2) -> connected(3) | connected_degraded(4)   caught up; 4 when a range it had to serve
                                                         failed (pruned or missing blocks): partial data
    live -> disconnected(0)                              the connection was lost (failing)
    live -> disconnecting(5) -> disconnected(0)          an intentional disconnect: an operator
                                                         disabled it, or the process stops
    disconnected | connecting -> refused(6)              DNS, TLS or protocol error: kept off until an
                                                         operator re-enables it
    """

    DISCONNECTED = 0, "disconnected"
    CONNECTING = 1, "connecting"
    SYNCING = 2, "syncing"
    CONNECTED = 3, "connected"
    CONNECTED_DEGRADED = 4, "connected (degraded)"
    DISCONNECTING = 5, "disconnecting"
    REFUSED = 6, "refused"


_S = ConnectionStatus
CONNECTION_MACHINE = Machine.declare(
    "indexer.source_connection",
    ConnectionStatus,
    field="connection_status",
    initial=ConnectionStatus.DISCONNECTED,
    edges={
        _S.DISCONNECTED: {_S.CONNECTING: _ENGINE, _S.REFUSED: _ENGINE},
        _S.CONNECTING: {
            _S.SYNCING: _ENGINE,
            _S.CONNECTED: _ENGINE,
            _S.DISCONNECTED: _ENGINE,  # the attempt failed
            _S.DISCONNECTING: _ENGINE,  # disabled while connecting
            _S.REFUSED: _ENGINE,
        },
        _S.SYNCING: {
            _S.CONNECTED: _ENGINE,
            _S.CONNECTED_DEGRADED: _ENGINE,
            _S.DISCONNECTED: _ENGINE,  # connection lost
            _S.DISCONNECTING: _ENGINE,
        },
        _S.CONNECTED: {
            _S.CONNECTED_DEGRADED: _ENGINE,
            _S.SYNCING: _ENGINE,
            _S.DISCONNECTED: _ENGINE,
            _S.DISCONNECTING: _ENGINE,
        },
        _S.CONNECTED_DEGRADED: {
            # The writer when the range is served again, or an operator clearing a historic range
            # failure (`source_clear_degraded`); the scheduler actor has the operator role.
            _S.CONNECTED: Role.OPERATOR,
            _S.SYNCING: _ENGINE,
            _S.DISCONNECTED: _ENGINE,
            _S.DISCONNECTING: _ENGINE,
        },
        _S.DISCONNECTING: {_S.DISCONNECTED: _ENGINE},
        # An operator re-enables a refused source (`source_reenable`, audited).
        _S.REFUSED: {_S.DISCONNECTED: Role.OPERATOR},
    },
    description=(
        "A sync source's connection (seed 002). connected_degraded means partial data only; other "
        "troubles are health reasons. disconnecting is an intentional disconnect only (disabled, "
        "process stop); a lost connection drops straight to disconnected. refused: DNS/TLS/protocol "
        "errors, until an operator re-enables the source (audited). The writer's own moves are "
        "unaudited (counted in fleetops_indexer_source_transitions_total)."
    ),
)


class DegradedReason(models.TextChoices):
    HISTORIC_RANGE_FAILED = "historic_range_failed", "historic range failed (partial data)"
    LAGGING_HEAD = "lagging_head", "head lags the other sources"
    ERROR_RATE = "error_rate", "error rate"
    LATENCY = "latency", "latency"
    FLAPPING = "flapping", "flapping"
    FORKED = "forked", "showed a fork the other sources do not"


# Reasons that are about the source's health, not its data: shown as health `degraded` with the
# reason; only HISTORIC_RANGE_FAILED (partial data) makes the connection status connected_degraded.
HEALTH_REASONS = frozenset(
    {
        DegradedReason.LAGGING_HEAD,
        DegradedReason.ERROR_RATE,
        DegradedReason.LATENCY,
        DegradedReason.FLAPPING,
        DegradedReason.FORKED,
    }
)


class SourceHealth(models.IntegerChoices):
    """Derived from the timestamps and health reasons on the row (never stored): see `SyncSource.health`."""

    HEALTHY = 1, "healthy"
    DISCONNECTED = 2, "disconnected"
    DEGRADED = 3, "degraded"
    DEAD = 4, "dead"
    RATE_LIMITED = 5, "rate limited"


DEAD_AFTER_SECONDS = 24 * 3600
DEGRADED_AFTER_RECOVERY_SECONDS = 5 * 60


class SyncSource(models.Model):
    """An RPC endpoint of a chain. Lower priority numbers are preferred; the client fails over by
    health and lag. The connection status is a state machine (`CONNECTION_MACHINE`); health is
    derived from the failure and success timestamps the indexer writes after every request round and
    from the health reasons (`HEALTH_REASONS`: lagging head, error rate, latency, flapping)."""

    chain = models.ForeignKey(Chain, on_delete=models.CASCADE, related_name="sources")
    name = models.CharField(max_length=60)
    rpc_url = models.URLField()
    websocket_url = models.CharField(max_length=300, blank=True, default="")
    priority = models.PositiveIntegerField(default=100)
    enabled = models.BooleanField(default=True)

    connection_status = models.PositiveSmallIntegerField(
        choices=ConnectionStatus.choices, default=ConnectionStatus.DISCONNECTED
    )
    status_changed_at = models.DateTimeField(null=True, blank=True)
    degraded_reasons = models.JSONField(default=list, blank=True, help_text="DegradedReason values.")
    degraded_detail = models.TextField(blank=True, default="")
    consecutive_failures = models.PositiveIntegerField(default=0)
    first_failure_at = models.DateTimeField(null=True, blank=True)
    last_failure_at = models.DateTimeField(null=True, blank=True)
    last_success_at = models.DateTimeField(null=True, blank=True)
    recovered_at = models.DateTimeField(null=True, blank=True)
    next_retry_at = models.DateTimeField(null=True, blank=True)
    rate_limited_until = models.DateTimeField(null=True, blank=True)
    head_height = models.BigIntegerField(null=True, blank=True)
    latency_ms = models.FloatField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    refused_reason = models.TextField(
        blank=True,
        default="",
        help_text="Why the source was refused (DNS, TLS, protocol); kept until re-enabled.",
    )

    class Meta:
        ordering = ["chain", "priority", "name"]
        constraints = [
            models.UniqueConstraint(fields=["chain", "name"], name="syncsource_name_per_chain"),
            models.CheckConstraint(
                condition=CONNECTION_MACHINE.constraint_q(), name="syncsource_connection_status_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.chain_id}/{self.name}"

    @property
    def health(self) -> SourceHealth:
        now = clock.now()
        if self.rate_limited_until and self.rate_limited_until > now:
            return SourceHealth.RATE_LIMITED
        if self.consecutive_failures:
            since = self.first_failure_at or self.last_failure_at or now
            if (now - since).total_seconds() >= DEAD_AFTER_SECONDS:
                return SourceHealth.DEAD
            return SourceHealth.DEGRADED
        if self.last_success_at is None or self.connection_status == ConnectionStatus.REFUSED:
            return SourceHealth.DISCONNECTED
        if self.recovered_at and (now - self.recovered_at).total_seconds() < DEGRADED_AFTER_RECOVERY_SECONDS:
            return SourceHealth.DEGRADED
        if HEALTH_REASONS.intersection(self.degraded_reasons or []):
            return SourceHealth.DEGRADED  # lagging head, error rate, latency, flapping: see the reasons
        return SourceHealth.HEALTHY


class EnrichmentStatus(models.TextChoices):
    """See `ENRICHMENT_MACHINE`."""

    PENDING = "pending"
    OK = "ok"
    RETRYING = "retrying"
    FAILED = "failed"
    UNDECODABLE = "undecodable"


_WORKER = {
    EnrichmentStatus.OK: _ENGINE,
    EnrichmentStatus.RETRYING: _ENGINE,
    EnrichmentStatus.FAILED: _ENGINE,
    EnrichmentStatus.UNDECODABLE: _ENGINE,
}
ENRICHMENT_MACHINE = Machine.declare(
    "indexer.enrichment",
    EnrichmentStatus,
    field="status",
    initial=EnrichmentStatus.PENDING,
    edges={
        EnrichmentStatus.PENDING: _WORKER,
        EnrichmentStatus.RETRYING: _WORKER,  # retrying -> retrying: another attempt failed
        EnrichmentStatus.FAILED: {EnrichmentStatus.PENDING: Role.OPERATOR},
        EnrichmentStatus.UNDECODABLE: {EnrichmentStatus.PENDING: Role.OPERATOR},
    },
    description=(
        "An event payload waiting for the external decoder. Workers write verdicts in bulk "
        "(unaudited, counted in fleetops_indexer_enrichment_total); an operator's re-queue writes "
        "one audit row per call."
    ),
)
"""`Enrichment.status`::

    pending ─┬─> ok                          decoded
    retrying ┼─> retrying (attempts + 1)     the decoder was unavailable: back off and try again
             ├─> failed                      max attempts reached
             └─> undecodable                 the decoder said it never will
    failed | undecodable ─> pending          an operator's re-queue (operator role)
"""

# Rows a worker may claim (those with a verdict edge out) and rows an operator may re-queue.
ENRICHMENT_CLAIMABLE = ENRICHMENT_MACHINE.allowed_from(EnrichmentStatus.OK)
ENRICHMENT_REQUEUEABLE = ENRICHMENT_MACHINE.allowed_from(EnrichmentStatus.PENDING)


class Enrichment(models.Model):
    """An event whose payload needs the external decoder. Written in the block transaction with the
    event (same identity columns), removed with it on rollback; decoded later by enrichment workers,
    so a decoder outage never slows ingest."""

    chain = models.ForeignKey(Chain, on_delete=models.CASCADE, related_name="+")
    height = models.BigIntegerField()
    phase = models.CharField(max_length=16, choices=Phase.choices)
    tx_index = models.PositiveIntegerField(null=True, blank=True)
    event_index = models.PositiveIntegerField()
    encoding = models.CharField(max_length=40, blank=True, default="")
    payload = models.TextField(help_text="The encoded data as the chain emitted it.")
    status = models.CharField(
        max_length=12, choices=EnrichmentStatus.choices, default=EnrichmentStatus.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    decoded = models.JSONField(null=True, blank=True)
    updated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["chain", "height", "phase", "tx_index", "event_index"],
                name="enrichment_identity",
                nulls_distinct=False,
            ),
            models.CheckConstraint(
                condition=ENRICHMENT_MACHINE.constraint_q(), name="enrichment_status_valid"
            ),
        ]
        indexes = [
            models.Index(
                fields=["chain", "next_attempt_at"],
                name="enrichment_claimable",
                condition=Q(status__in=ENRICHMENT_CLAIMABLE),
            ),
            models.Index(fields=["chain", "status"], name="enrichment_chain_status"),
        ]

    def __str__(self) -> str:
        return f"{self.height} {self.phase} #{self.event_index} ({self.status})"
