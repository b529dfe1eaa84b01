from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from fleetops.api.fields import ReasonField
from fleetops.api.serializers import InputSerializer
from fleetops.lib import clock
from migrations_app.keys.selectors import migration_label
from migrations_app.models.keys import AddressGroup, Key, KeyState, RemediationEntry, StakeTransaction


class KeyFilterInput(InputSerializer):
    address_group = serializers.IntegerField(required=False, allow_null=True, default=None)
    states = serializers.ListField(
        child=serializers.ChoiceField(choices=KeyState.choices), required=False, default=list
    )
    owner_address = serializers.CharField(required=False, allow_blank=True, default="", max_length=100)


class MigrateInput(InputSerializer):
    target_group = serializers.IntegerField()
    key_ids = serializers.ListField(
        child=serializers.IntegerField(min_value=1),
        required=False,
        allow_null=True,
        default=None,
        max_length=10_000,
    )
    filter = KeyFilterInput(required=False, allow_null=True, default=None)
    dry_run = serializers.BooleanField(default=False)
    reason = ReasonField(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("key_ids") is not None and attrs.get("filter"):
            both = "give key_ids or filter, not both"
            raise serializers.ValidationError({"key_ids": [both], "filter": [both]})
        if attrs.get("key_ids") is None and not attrs.get("filter"):
            neither = "give key_ids or filter"
            raise serializers.ValidationError({"key_ids": [neither], "filter": [neither]})
        return attrs


class MigrateOutput(serializers.Serializer):
    dry_run = serializers.BooleanField()
    target_group = serializers.IntegerField()
    target_group_name = serializers.CharField()
    count = serializers.IntegerField()
    key_ids = serializers.ListField(child=serializers.IntegerField())
    excluded_retired = serializers.IntegerField()


class RetryInput(InputSerializer):
    reason = ReasonField()


class BulkRetryInput(RetryInput):
    key_ids = serializers.ListField(
        child=serializers.IntegerField(min_value=1), min_length=1, max_length=10_000
    )


class BulkRetryOutput(serializers.Serializer):
    retried = serializers.ListField(child=serializers.IntegerField())
    skipped = serializers.DictField(child=serializers.CharField())


class GroupOutput(serializers.ModelSerializer):
    key_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = AddressGroup
        fields = [
            "id",
            "name",
            "services",
            "relay_miner",
            "region",
            "operator_shares",
            "supplier_share_percentage",
            "private",
            "key_count",
        ]
        read_only_fields = fields


class KeyMigrationOutput(serializers.Serializer):
    status = serializers.CharField()
    badge = serializers.CharField()
    attempts = serializers.IntegerField()
    max_attempts = serializers.IntegerField()
    in_flight = serializers.BooleanField()
    next_attempt_at = serializers.DateTimeField(allow_null=True)
    last_error = serializers.CharField(allow_blank=True)
    manual_retries = serializers.IntegerField()
    round = serializers.IntegerField()
    scheduled_at = serializers.DateTimeField(allow_null=True)
    updated_at = serializers.DateTimeField(allow_null=True)


def migration_of(key: Key) -> dict[str, Any]:
    return {
        "status": key.migration_status,
        "badge": migration_label(key, now=clock.now()),
        "attempts": key.migration_attempts,
        "max_attempts": key.migration_max_attempts,
        "in_flight": key.in_flight,
        "next_attempt_at": key.migration_next_attempt_at,
        "last_error": key.migration_last_error,
        "manual_retries": key.migration_manual_retries,
        "round": key.migration_round,
        "scheduled_at": key.migration_scheduled_at,
        "updated_at": key.migration_updated_at,
    }


class KeyOutput(serializers.ModelSerializer):
    address_group_name = serializers.SerializerMethodField()
    migration = serializers.SerializerMethodField()

    class Meta:
        model = Key
        fields = [
            "id",
            "address",
            "public_key",
            "owner_address",
            "address_group",
            "address_group_name",
            "state",
            "retired_at",
            "migration",
            "created_at",
        ]
        read_only_fields = fields

    def get_address_group_name(self, obj: Key) -> str | None:
        return obj.address_group.name if obj.address_group_id and obj.address_group else None

    @extend_schema_field(KeyMigrationOutput)
    def get_migration(self, obj: Key) -> dict[str, Any]:
        return migration_of(obj)


class RemediationEntryOutput(serializers.ModelSerializer):
    class Meta:
        model = RemediationEntry
        fields = [
            "id",
            "reason",
            "round",
            "attempt",
            "outcome",
            "message",
            "error",
            "tx_hash",
            "result_code",
            "actor_label",
            "created_at",
        ]
        read_only_fields = fields


class StakeTransactionOutput(serializers.ModelSerializer):
    class Meta:
        model = StakeTransaction
        fields = [
            "id",
            "reason",
            "round",
            "attempt",
            "status",
            "broadcast_state",
            "hash",
            "execution_height",
            "last_covered_height",
            "timeout_height",
            "landed_height",
            "unavailable_checks",
            "last_verification_at",
            "broadcast_at",
            "code",
            "message",
            "created_at",
            "resolved_at",
        ]
        read_only_fields = fields


class KeyDetailOutput(KeyOutput):
    history = serializers.SerializerMethodField()
    transactions = serializers.SerializerMethodField()

    class Meta(KeyOutput.Meta):
        fields = [*KeyOutput.Meta.fields, "history", "transactions"]
        read_only_fields = fields

    @extend_schema_field(RemediationEntryOutput(many=True))
    def get_history(self, obj: Key) -> list[dict[str, Any]]:
        from migrations_app.keys.selectors import key_history

        return list(RemediationEntryOutput(key_history(key=obj), many=True).data)

    @extend_schema_field(StakeTransactionOutput(many=True))
    def get_transactions(self, obj: Key) -> list[dict[str, Any]]:
        from migrations_app.keys.selectors import key_transactions

        return list(StakeTransactionOutput(key_transactions(key=obj), many=True).data)
