from __future__ import annotations

from typing import Any

from rest_framework import serializers

from fleetops.api.fields import ReasonField
from fleetops.api.serializers import InputSerializer
from indexer.models import Block, Chain, Enrichment, Event, Mode, Transaction
from indexer.selectors import ChainStatus, lag_of
from indexer.services import REQUEUE_IDS_CAP

# --- inputs ------------------------------------------------------------------------------------------


class ChainActionInput(InputSerializer):
    reason = ReasonField()


class ChainRollbackInput(ChainActionInput):
    to_height = serializers.IntegerField(min_value=0)


class EnrichmentRequeueInput(ChainActionInput):
    ids = serializers.ListField(
        child=serializers.IntegerField(min_value=1),
        required=False,
        allow_null=True,
        default=None,
        min_length=1,
        max_length=REQUEUE_IDS_CAP,
        help_text="Enrichment ids to re-queue; omit (or null) for every failed and undecodable row.",
    )


# --- status ------------------------------------------------------------------------------------------


class ChainLeaderOutput(serializers.Serializer):
    holder = serializers.CharField()
    token = serializers.IntegerField()
    expires_at = serializers.DateTimeField()
    live = serializers.BooleanField(help_text="False when the lease expired and nobody took it over.")


class SourceDegradedReasonOutput(serializers.Serializer):
    code = serializers.CharField()
    # A declared field named `label` replaces Field.label only in the stubs' eyes: DRF's metaclass
    # moves declared fields off the class.
    label = serializers.CharField()  # type: ignore[assignment]


class SyncSourceOutput(serializers.Serializer):
    name = serializers.CharField()
    rpc_url = serializers.CharField()
    websocket_url = serializers.CharField()
    priority = serializers.IntegerField()
    enabled = serializers.BooleanField()
    connection_status = serializers.IntegerField(
        help_text="0 disconnected, 1 connecting, 2 syncing, 3 connected, 4 connected (degraded: "
        "partial data), 5 disconnecting (intentional), 6 refused (DNS, TLS or protocol error; until "
        "an operator re-enables it)."
    )
    connection_status_label = serializers.CharField()
    degraded_reasons = SourceDegradedReasonOutput(many=True)
    degraded_detail = serializers.CharField()
    health = serializers.IntegerField(
        help_text="1 healthy, 2 disconnected, 3 degraded, 4 dead, 5 rate limited."
    )
    health_label = serializers.CharField()
    consecutive_failures = serializers.IntegerField()
    first_failure_at = serializers.DateTimeField(allow_null=True)
    last_failure_at = serializers.DateTimeField(allow_null=True)
    last_success_at = serializers.DateTimeField(allow_null=True)
    next_retry_at = serializers.DateTimeField(allow_null=True)
    rate_limited_until = serializers.DateTimeField(allow_null=True)
    head_height = serializers.IntegerField(allow_null=True)
    latency_ms = serializers.FloatField(allow_null=True)
    last_error = serializers.CharField()
    refused_reason = serializers.CharField(
        help_text="Why the source was refused (status 6); empty otherwise."
    )


class ChainRollbackRequestOutput(serializers.Serializer):
    to_height = serializers.IntegerField()
    reason = serializers.CharField()
    requested_by = serializers.CharField()


class EnrichmentBacklogOutput(serializers.Serializer):
    pending = serializers.IntegerField()
    retrying = serializers.IntegerField()
    failed = serializers.IntegerField()
    undecodable = serializers.IntegerField()


class ChainStatusOutput(serializers.Serializer):
    slug = serializers.CharField()
    chain_id = serializers.CharField(source="chain.chain_id")
    head_height = serializers.IntegerField(allow_null=True)
    last_indexed_height = serializers.IntegerField(allow_null=True)
    oldest_indexed_height = serializers.IntegerField(allow_null=True)
    lag_blocks = serializers.IntegerField(allow_null=True)
    head_moved_at = serializers.DateTimeField(allow_null=True)
    mode = serializers.ChoiceField(choices=Mode.choices)
    paused = serializers.BooleanField()
    stalled = serializers.BooleanField(help_text="The chain itself halted (mode idle), not the indexer.")
    poison_height = serializers.IntegerField(allow_null=True)
    poison_attempts = serializers.IntegerField()
    last_error = serializers.CharField()
    rollback_requested = ChainRollbackRequestOutput(allow_null=True)
    leader = ChainLeaderOutput(allow_null=True)
    sources = SyncSourceOutput(many=True)
    enrichment_backlog = EnrichmentBacklogOutput()
    updated_at = serializers.DateTimeField(allow_null=True)


class ChainActionOutput(serializers.Serializer):
    changed = serializers.BooleanField(help_text="False when there was nothing to do (already so).")
    status = ChainStatusOutput()

    @staticmethod
    def of(changed: bool, status: ChainStatus) -> dict[str, Any]:
        return {"changed": changed, "status": ChainStatusOutput(status).data}


class EnrichmentRequeueOutput(serializers.Serializer):
    requeued = serializers.IntegerField()


# --- lists -------------------------------------------------------------------------------------------


class ChainOutput(serializers.ModelSerializer):
    """A chain with the headline of its state (the full picture is at .../status)."""

    head_height = serializers.SerializerMethodField()
    last_indexed_height = serializers.SerializerMethodField()
    lag_blocks = serializers.SerializerMethodField()
    mode = serializers.SerializerMethodField()
    paused = serializers.SerializerMethodField()

    class Meta:
        model = Chain
        fields = [
            "slug",
            "chain_id",
            "expected_block_time_seconds",
            "head_lag",
            "finality_depth",
            "rollback_automation",
            "enrichment_enabled",
            "head_height",
            "last_indexed_height",
            "lag_blocks",
            "mode",
            "paused",
        ]
        read_only_fields = fields

    @staticmethod
    def _state(obj: Chain) -> Any:
        return getattr(obj, "state", None)

    def get_head_height(self, obj: Chain) -> int | None:
        state = self._state(obj)
        return state.head_height if state else None

    def get_last_indexed_height(self, obj: Chain) -> int | None:
        state = self._state(obj)
        return state.last_indexed_height if state else None

    def get_lag_blocks(self, obj: Chain) -> int | None:
        return lag_of(self._state(obj))

    def get_mode(self, obj: Chain) -> str | None:
        state = self._state(obj)
        return state.mode if state else None

    def get_paused(self, obj: Chain) -> bool:
        state = self._state(obj)
        return bool(state and state.paused)


class ChainBlockOutput(serializers.ModelSerializer):
    class Meta:
        model = Block
        fields = ["height", "hash", "parent_hash", "time", "proposer", "tx_count"]
        read_only_fields = fields


class ChainTransactionOutput(serializers.ModelSerializer):
    class Meta:
        model = Transaction
        fields = ["height", "index", "hash", "code", "gas_wanted", "gas_used"]
        read_only_fields = fields


EVENT_FIELDS = ("id", "height", "phase", "tx_index", "event_index", "type", "attributes")


# The documented shape of an event. The list view renders `Event.objects.values(*EVENT_FIELDS)` rows
# as they are: every field is a plain JSON value already (attributes come decoded from jsonb, with
# string keys), which is what this serializer's to_representation returns for them.
class ChainEventOutput(serializers.ModelSerializer):
    # Stored as the node emitted them, `[{key, value, index}]`; older nodes may omit keys.
    attributes = serializers.ListField(child=serializers.DictField(), help_text="[{key, value, index}]")

    class Meta:
        model = Event
        fields = list(EVENT_FIELDS)
        read_only_fields = fields


class EnrichmentOutput(serializers.ModelSerializer):
    class Meta:
        model = Enrichment
        fields = [
            "id",
            "height",
            "phase",
            "tx_index",
            "event_index",
            "encoding",
            "payload",
            "status",
            "attempts",
            "next_attempt_at",
            "last_error",
            "decoded",
            "updated_at",
        ]
        read_only_fields = fields
