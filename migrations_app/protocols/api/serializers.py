from __future__ import annotations

from typing import Any

from rest_framework import serializers

from migrations_app.models import ProtocolBalance, ProtocolNftOwner, ProtocolStateChange
from migrations_app.protocols.selectors import MigrationView, ProtocolStatus


class MigrationOutput(serializers.Serializer):
    status = serializers.CharField(help_text="not_started | in_progress | success | failed")
    cursor = serializers.IntegerField(
        allow_null=True, help_text="Null until the migration created its cursor."
    )
    lag_blocks = serializers.IntegerField(allow_null=True, help_text="Indexed height minus the cursor.")
    handed_off_at = serializers.DateTimeField(allow_null=True, help_text="When live ingestion took over.")
    error = serializers.CharField()

    @staticmethod
    def of(view: MigrationView) -> dict[str, Any]:
        return {
            "status": view.status,
            "cursor": view.cursor,
            "lag_blocks": view.lag_blocks,
            "handed_off_at": view.handed_off_at,
            "error": view.error,
        }


class ProtocolOutput(serializers.Serializer):
    id = serializers.CharField(help_text="Protocol id (SEP41, …); with `chain` it names the protocol.")
    name = serializers.CharField()
    chain = serializers.CharField(help_text="Slug of the chain the protocol runs on.")
    indexed_height = serializers.IntegerField(allow_null=True)
    oldest_indexed_height = serializers.IntegerField(allow_null=True)
    classification_status = serializers.CharField()
    classified_at = serializers.DateTimeField(allow_null=True)
    contracts = serializers.IntegerField()
    history = MigrationOutput()
    history_handoff_height = serializers.IntegerField(
        allow_null=True, help_text="First height written by live ingestion after the backfill."
    )
    current_state = MigrationOutput()
    current_state_start_height = serializers.IntegerField(allow_null=True)

    @staticmethod
    def of(s: ProtocolStatus) -> dict[str, Any]:
        return {
            "id": s.protocol.protocol_id,
            "name": s.protocol.name,
            "chain": s.chain_slug,
            "indexed_height": s.indexed_height,
            "oldest_indexed_height": s.oldest_indexed_height,
            "classification_status": s.classification_status,
            "classified_at": s.classified_at,
            "contracts": s.contracts,
            "history": MigrationOutput.of(s.history),
            "history_handoff_height": s.handoff_height,
            "current_state": MigrationOutput.of(s.current_state),
            "current_state_start_height": s.current_state_start_height,
        }


class StateChangeOutput(serializers.ModelSerializer):
    amount = serializers.CharField(allow_null=True, help_text="Integer amount as a string (up to 78 digits).")

    class Meta:
        model = ProtocolStateChange
        fields = [
            "height",
            "phase",
            "tx_index",
            "event_index",
            "kind",
            "account",
            "counterparty",
            "asset",
            "amount",
            "token_id",
        ]


class BalanceOutput(serializers.ModelSerializer):
    amount = serializers.CharField()

    class Meta:
        model = ProtocolBalance
        fields = ["asset", "account", "amount", "height"]


class OwnerOutput(serializers.ModelSerializer):
    class Meta:
        model = ProtocolNftOwner
        fields = ["asset", "token_id", "owner", "height"]
