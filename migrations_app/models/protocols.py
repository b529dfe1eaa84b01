"""Protocols, cursors and protocol state changes (seed 003).

A protocol (`SEP41`, `SEP50`, …) is a classifier over the indexer's stored events. Its state changes
are written live by the indexer's producer hook for every new block and backfilled for history by
`manage.py protocol_migrate history`; both advance the protocol's `Cursor` row by compare-and-set in
the transaction that writes the rows, so each height is written by exactly one of them.

The three status columns are state machines declared below (`CLASSIFICATION_MACHINE`,
`HISTORY_MACHINE`, `CURRENT_STATE_MACHINE`), moved only by `migrations_app.protocols.status` through the
transition kernel; the drawn diagrams are in `docs/state-machines.md`::

    not_started ──> in_progress ──> success
                        │  ▲  └──> failed ──> in_progress (a re-run resumes at cursor + 1)
                        └──┘ (a run killed mid-way is resumed by the next run)

`success` is terminal for the two migrations (a re-run skips the protocol); classification may be
re-run (success -> in_progress) when new contracts were seen. Starting (or resuming) is an admin's
edge; the outcome edges are the run's own (engine) steps.
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q

from fleetops.access.models import Role
from fleetops.lib.machine import Machine

__all__ = [
    "CLASSIFICATION_MACHINE",
    "CURRENT_STATE_MACHINE",
    "HISTORY_MACHINE",
    "ChangeKind",
    "Cursor",
    "MigrationStatus",
    "Protocol",
    "ProtocolBalance",
    "ProtocolContract",
    "ProtocolNftOwner",
    "ProtocolStateChange",
    "ProtocolWriteSpan",
    "Writer",
    "cursor_name",
]


class MigrationStatus(models.TextChoices):
    NOT_STARTED = "not_started"
    IN_PROGRESS = "in_progress"
    SUCCESS = "success"
    FAILED = "failed"


_S = MigrationStatus
# Who takes which edge: an admin starts a run (or classifies again, or resumes a run killed mid-way:
# in_progress -> in_progress); the run itself settles it (engine edges, authorized by its start).
CLASSIFICATION_MACHINE = Machine.declare(
    "protocols.classification",
    MigrationStatus,
    field="classification_status",
    initial=_S.NOT_STARTED,
    edges={
        _S.NOT_STARTED: {_S.IN_PROGRESS: Role.ADMIN},
        # in_progress -> in_progress: a classification left in_progress past the stale threshold.
        _S.IN_PROGRESS: {_S.SUCCESS: None, _S.FAILED: None, _S.IN_PROGRESS: Role.ADMIN},
        _S.SUCCESS: {_S.IN_PROGRESS: Role.ADMIN},
        _S.FAILED: {_S.IN_PROGRESS: Role.ADMIN},
    },
    description="Protocol classification: which contracts belong to the protocol.",
)
_MIGRATION_EDGES: dict[str, dict[str, str | None]] = {
    _S.NOT_STARTED: {_S.IN_PROGRESS: Role.ADMIN},
    _S.IN_PROGRESS: {_S.SUCCESS: None, _S.FAILED: None, _S.IN_PROGRESS: Role.ADMIN},
    _S.FAILED: {_S.IN_PROGRESS: Role.ADMIN},
}
HISTORY_MACHINE = Machine.declare(
    "protocols.history_migration",
    MigrationStatus,
    field="history_migration_status",
    initial=_S.NOT_STARTED,
    edges=_MIGRATION_EDGES,
    terminal=(_S.SUCCESS,),
    description="Protocol history migration: backfill state changes until live ingestion takes over.",
)
CURRENT_STATE_MACHINE = Machine.declare(
    "protocols.current_state_migration",
    MigrationStatus,
    field="current_state_migration_status",
    initial=_S.NOT_STARTED,
    edges=_MIGRATION_EDGES,
    terminal=(_S.SUCCESS,),
    description="Protocol current-state migration: balances / owners from a start height on.",
)


def _status_field() -> models.CharField[str, str]:
    return models.CharField(
        max_length=16, choices=MigrationStatus.choices, default=MigrationStatus.NOT_STARTED
    )


class Protocol(models.Model):
    """A registered protocol on one chain (the organization that runs the chain owns it), identified
    by (chain, protocol id): SEP41 may run on every chain of a deployment, each with its own
    statuses, cursors and rows. Rows are created by `protocol_setup` from the classifier registry
    (`migrations_app.protocols.registry`); the surrogate `id` is what the rows of a protocol point at."""

    id = models.BigAutoField(primary_key=True)
    protocol_id = models.CharField(max_length=32, help_text="SEP41, SEP50, … (the classifier's id)")
    chain = models.ForeignKey("indexer.Chain", on_delete=models.PROTECT, related_name="+")
    name = models.CharField(max_length=200)
    classification_status = _status_field()
    classification_error = models.TextField(blank=True, default="")
    classified_at = models.DateTimeField(null=True, blank=True)
    history_migration_status = _status_field()
    history_error = models.TextField(blank=True, default="")
    history_started_at = models.DateTimeField(null=True, blank=True)
    # When and where the backfill lost its compare-and-set to live ingestion (the handoff).
    history_handed_off_at = models.DateTimeField(null=True, blank=True)
    history_handoff_height = models.BigIntegerField(null=True, blank=True)
    current_state_migration_status = _status_field()
    current_state_error = models.TextField(blank=True, default="")
    current_state_start_height = models.BigIntegerField(null=True, blank=True)
    current_state_handed_off_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["protocol_id", "chain_id"]
        constraints = [
            models.UniqueConstraint(fields=["chain", "protocol_id"], name="protocol_chain_identity"),
            models.CheckConstraint(
                condition=CLASSIFICATION_MACHINE.constraint_q(),
                name="protocol_classification_status_valid",
            ),
            models.CheckConstraint(
                condition=HISTORY_MACHINE.constraint_q(), name="protocol_history_status_valid"
            ),
            models.CheckConstraint(
                condition=CURRENT_STATE_MACHINE.constraint_q(), name="protocol_current_state_status_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.protocol_id} on {self.chain.slug}"

    # The cursors are named after the chain and the protocol (`protocol_<chain>_<ID>_…_cursor`), so
    # the same protocol on two chains never shares one.
    @property
    def history_cursor_name(self) -> str:
        return cursor_name(self.chain.slug, self.protocol_id, "history")

    @property
    def current_state_cursor_name(self) -> str:
        return cursor_name(self.chain.slug, self.protocol_id, "current_state")


def cursor_name(chain_slug: str, protocol_id: str, migration: str) -> str:
    return f"protocol_{chain_slug}_{protocol_id}_{migration}_cursor"


class Cursor(models.Model):
    """A named height, moved only by `migrations_app.protocols.cursor` (compare-and-swap in the
    transaction that wrote the rows up to it, or a rewind inside an indexer rollback). A missing row
    means "nobody produces this protocol yet", which is not the same as losing a race."""

    name = models.CharField(primary_key=True, max_length=120)
    height = models.BigIntegerField()
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} = {self.height}"


class ProtocolContract(models.Model):
    """A contract (token contract or NFT class) classified as belonging to a protocol. Written by
    `protocol_setup` for what was indexed so far and by both writers for contracts first seen later."""

    protocol = models.ForeignKey(Protocol, on_delete=models.CASCADE, related_name="contracts")
    contract = models.CharField(max_length=200)
    first_seen_height = models.BigIntegerField(null=True, blank=True)
    classified_at = models.DateTimeField()

    class Meta:
        ordering = ["protocol", "contract"]
        constraints = [
            models.UniqueConstraint(fields=["protocol", "contract"], name="protocolcontract_identity")
        ]

    def __str__(self) -> str:
        return f"{self.protocol.protocol_id} {self.contract}"


class ChangeKind(models.TextChoices):
    TRANSFER = "transfer"
    MINT = "mint"
    BURN = "burn"


class ProtocolStateChange(models.Model):
    """One protocol-relevant event, identified like the event it came from, so a replay can never
    duplicate it. `account` is the side the change is about (sender of a transfer or burn, recipient
    of a mint), `counterparty` the recipient of a transfer; `asset` is the token contract (SEP41) or
    NFT class (SEP50); fungible changes carry `amount`, NFT changes `token_id`."""

    protocol = models.ForeignKey(Protocol, on_delete=models.CASCADE, related_name="+", db_index=False)
    chain = models.ForeignKey("indexer.Chain", on_delete=models.CASCADE, related_name="+", db_index=False)
    height = models.BigIntegerField()
    phase = models.CharField(max_length=16)
    tx_index = models.PositiveIntegerField(null=True, blank=True)
    event_index = models.PositiveIntegerField()
    kind = models.CharField(max_length=16, choices=ChangeKind.choices)
    account = models.CharField(max_length=200)
    counterparty = models.CharField(max_length=200, blank=True, default="")
    asset = models.CharField(max_length=200)
    amount = models.DecimalField(max_digits=78, decimal_places=0, null=True, blank=True)
    token_id = models.CharField(max_length=200, blank=True, default="")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["protocol", "chain", "height", "phase", "tx_index", "event_index"],
                name="protocolstatechange_identity",
                nulls_distinct=False,
            ),
            models.CheckConstraint(
                condition=Q(kind__in=ChangeKind.values), name="protocolstatechange_kind_valid"
            ),
        ]
        # The API walks (protocol, height desc, id desc), optionally for one account.
        indexes = [
            models.Index(fields=["protocol", "height", "id"], name="psc_protocol_height_id"),
            models.Index(fields=["protocol", "account", "height", "id"], name="psc_protocol_account"),
        ]

    def __str__(self) -> str:
        return f"{self.protocol_id} {self.height} {self.kind} {self.account[:16]}"


class Writer(models.TextChoices):
    HISTORY = "history"
    LIVE = "live"


class ProtocolWriteSpan(models.Model):
    """Which writer wrote which heights of a protocol's history: one row per contiguous run of heights
    by the same writer, extended in the transaction that moves the cursor. The spans of a protocol
    tile [oldest indexed height, history cursor] without overlap; the handoff is where `history`
    ends and `live` begins. A rollback trims them with the rows."""

    protocol = models.ForeignKey(Protocol, on_delete=models.CASCADE, related_name="write_spans")
    writer = models.CharField(max_length=16, choices=Writer.choices)
    from_height = models.BigIntegerField()
    to_height = models.BigIntegerField()
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["protocol", "from_height"]
        constraints = [
            models.CheckConstraint(
                condition=Q(writer__in=Writer.values), name="protocolwritespan_writer_valid"
            ),
            models.CheckConstraint(
                condition=Q(to_height__gte=models.F("from_height")), name="protocolwritespan_range_valid"
            ),
            models.UniqueConstraint(fields=["protocol", "from_height"], name="protocolwritespan_start_once"),
        ]

    def __str__(self) -> str:
        return f"{self.protocol_id} {self.writer} {self.from_height}-{self.to_height}"


class ProtocolBalance(models.Model):
    """SEP41 current state: the net amount of `asset` held by `account`, summed from the state changes
    at and after the current-state start height (so from the chain's first height it is the balance)."""

    protocol = models.ForeignKey(Protocol, on_delete=models.CASCADE, related_name="+", db_index=False)
    asset = models.CharField(max_length=200)
    account = models.CharField(max_length=200)
    amount = models.DecimalField(max_digits=78, decimal_places=0)
    height = models.BigIntegerField(help_text="Height of the last change applied to this row.")

    class Meta:
        ordering = ["protocol", "asset", "account"]
        constraints = [
            models.UniqueConstraint(fields=["protocol", "asset", "account"], name="protocolbalance_identity")
        ]
        indexes = [models.Index(fields=["protocol", "account"], name="protocolbalance_account")]

    def __str__(self) -> str:
        return f"{self.protocol_id} {self.asset[:12]} {self.account[:16]} {self.amount}"


class ProtocolNftOwner(models.Model):
    """SEP50 current state: the owner of each token of each NFT class."""

    protocol = models.ForeignKey(Protocol, on_delete=models.CASCADE, related_name="+", db_index=False)
    asset = models.CharField(max_length=200)
    token_id = models.CharField(max_length=200)
    owner = models.CharField(max_length=200)
    height = models.BigIntegerField(help_text="Height of the last change applied to this row.")

    class Meta:
        ordering = ["protocol", "asset", "token_id"]
        constraints = [
            models.UniqueConstraint(
                fields=["protocol", "asset", "token_id"], name="protocolnftowner_identity"
            )
        ]
        indexes = [models.Index(fields=["protocol", "owner"], name="protocolnftowner_owner")]

    def __str__(self) -> str:
        return f"{self.protocol_id} {self.asset} #{self.token_id} -> {self.owner[:16]}"
