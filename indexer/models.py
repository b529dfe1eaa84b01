"""The forever indexer's storage: one chain per row, its single-writer state, and the indexed
blocks, transactions and events with deterministic identities (a replay can never duplicate a row).

IndexerState.mode::

    catching_up ⇄ normal ⇄ idle (head flat, sources agree: the chain halted)
         │           └──> degraded (sources advance, indexed height does not; or a poison height)
         └──> halted (identity mismatch, reorg deeper than the finality bound): writes nothing
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q


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
    rollback_automation = models.BooleanField(default=True)
    enrichment_enabled = models.BooleanField(default=True)

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
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(mode__in=Mode.values), name="indexerstate_mode_valid")
        ]

    def __str__(self) -> str:
        return f"{self.chain_id} at {self.last_indexed_height} ({self.mode})"


class Block(models.Model):
    chain = models.ForeignKey(Chain, on_delete=models.CASCADE, related_name="+")
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
    chain = models.ForeignKey(Chain, on_delete=models.CASCADE, related_name="+")
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
    """`tx_index` is NULL for block-level events; the identity treats NULLs as equal."""

    chain = models.ForeignKey(Chain, on_delete=models.CASCADE, related_name="+")
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
        indexes = [models.Index(fields=["chain", "type", "height"], name="event_chain_type_height")]

    def __str__(self) -> str:
        return f"{self.height} {self.phase} {self.type}"
