from __future__ import annotations

from typing import Any

from rest_framework import serializers

from curtailment.models import TERMINATE_STATES, CurtailmentEvent, CurtailmentTarget, Priority, ScopeType
from curtailment.planning import TEXT_CAP, trimmed_snapshot
from curtailment.selector import REASON_SELECTED, Plan
from fleetops.api.fields import ReasonField
from fleetops.api.serializers import InputSerializer

EVENT_FIELDS = [
    "uuid",
    "state",
    "mode",
    "strategy",
    "level",
    "priority",
    "scope_type",
    "scope",
    "target_kw",
    "tolerance_kw",
    "restore_batch_size",
    "restore_batch_interval_sec",
    "effective_batch_size",
    "min_curtailed_duration_sec",
    "max_duration_seconds",
    "allow_unbounded",
    "include_maintenance",
    "force_include_maintenance",
    "source_actor_type",
    "source_actor_id",
    "external_source",
    "external_reference",
    "idempotency_key",
    "reason",
    "started_at",
    "ended_at",
    "created_at",
    "updated_at",
]

# Fields of an event that no input sets: named as read-only, not unknown, when a body has them.
EVENT_READ_ONLY = frozenset([*EVENT_FIELDS, "decision_snapshot", "target_rollup"])


class PlanInput(InputSerializer):
    scope_type = serializers.ChoiceField(choices=ScopeType.choices, default=ScopeType.WHOLE_ORG)
    device_identifiers = serializers.ListField(
        child=serializers.CharField(max_length=100), required=False, default=list, max_length=100_000
    )
    target_kw = serializers.FloatField(min_value=0, allow_null=False)
    tolerance_kw = serializers.FloatField(required=False, default=0.0)
    priority = serializers.ChoiceField(choices=Priority.choices, default=Priority.NORMAL)
    include_maintenance = serializers.BooleanField(default=False)
    force_include_maintenance = serializers.BooleanField(default=False)
    candidate_min_power_w_override = serializers.IntegerField(required=False, allow_null=True, default=None)


class StartInput(PlanInput):
    read_only_names = EVENT_READ_ONLY

    # The event's title, not a reason for an action: its own cap (`curtailment.planning`).
    reason = serializers.CharField(max_length=TEXT_CAP, trim_whitespace=False)
    max_duration_seconds = serializers.IntegerField(required=False, default=0)
    restore_batch_size = serializers.IntegerField(required=False, default=0)
    restore_batch_interval_sec = serializers.IntegerField(required=False, default=0)
    min_curtailed_duration_sec = serializers.IntegerField(required=False, default=0)
    allow_unbounded = serializers.BooleanField(default=False)
    idempotency_key = serializers.CharField(
        required=False, allow_null=True, allow_blank=True, default=None, max_length=TEXT_CAP
    )
    external_source = serializers.CharField(
        required=False, allow_null=True, allow_blank=True, default=None, max_length=TEXT_CAP
    )
    external_reference = serializers.CharField(
        required=False, allow_null=True, allow_blank=True, default=None, max_length=TEXT_CAP
    )


class UpdateInput(InputSerializer):
    read_only_names = EVENT_READ_ONLY

    # A new title for the event (its `reason` field).
    reason = serializers.CharField(max_length=TEXT_CAP, required=False, trim_whitespace=False)
    restore_batch_size = serializers.IntegerField(required=False)
    restore_batch_interval_sec = serializers.IntegerField(required=False)
    max_duration_seconds = serializers.IntegerField(required=False)


class StopInput(InputSerializer):
    force = serializers.BooleanField(default=False)
    reason = ReasonField(required=False)


class TerminateInput(InputSerializer):
    target_state = serializers.ChoiceField(choices=list(TERMINATE_STATES))
    reason = ReasonField()


class ReconcilerStatusOutput(serializers.Serializer):
    last_tick_at = serializers.DateTimeField(allow_null=True)
    heartbeat_age_seconds = serializers.FloatField(allow_null=True)
    last_tick_duration_seconds = serializers.FloatField(allow_null=True)
    last_error = serializers.CharField(allow_blank=True)
    live_events = serializers.IntegerField()


class PlanCandidate(serializers.Serializer):
    device_identifier = serializers.CharField()
    current_power_w = serializers.FloatField()
    efficiency_j_th = serializers.FloatField(allow_null=True)
    reason_selected = serializers.CharField()


class PlanSkipped(serializers.Serializer):
    device_identifier = serializers.CharField()
    reason = serializers.CharField()


class PlanOutput(serializers.Serializer):
    outcome = serializers.CharField()
    candidates = PlanCandidate(many=True)
    skipped_candidates = PlanSkipped(many=True)
    estimated_reduction_kw = serializers.FloatField()
    estimated_remaining_power_kw = serializers.FloatField()
    candidate_min_power_w = serializers.IntegerField()

    @staticmethod
    def from_plan(plan: Plan) -> dict[str, Any]:
        return {
            "outcome": plan.outcome.value,
            "candidates": [
                {
                    "device_identifier": s.candidate.identifier,
                    "current_power_w": s.power_w,
                    "efficiency_j_th": s.efficiency_j_th,
                    "reason_selected": REASON_SELECTED,
                }
                for s in plan.selected
            ],
            "skipped_candidates": [
                {"device_identifier": s.identifier, "reason": s.reason} for s in plan.skipped
            ],
            "estimated_reduction_kw": round(plan.estimated_reduction_kw, 3),
            "estimated_remaining_power_kw": round(plan.estimated_remaining_power_kw, 3),
            "candidate_min_power_w": plan.floor_w,
        }


class EventListOutput(serializers.ModelSerializer):
    """List items: no targets, no attribution keys, the trimmed snapshot."""

    decision_snapshot = serializers.SerializerMethodField()

    class Meta:
        model = CurtailmentEvent
        fields = [
            f for f in EVENT_FIELDS if f not in ("external_source", "external_reference", "idempotency_key")
        ] + ["decision_snapshot"]
        read_only_fields = fields

    def get_decision_snapshot(self, obj: CurtailmentEvent) -> dict[str, Any]:
        return trimmed_snapshot(obj.decision_snapshot)


class TargetOutput(serializers.ModelSerializer):
    class Meta:
        model = CurtailmentTarget
        fields = [
            "device_identifier",
            "state",
            "desired_state",
            "baseline_power_w",
            "efficiency_j_th",
            "observed_power_w",
            "observed_at",
            "confirmed_at",
            "last_dispatched_at",
            "retry_count",
            "last_error",
        ]
        read_only_fields = fields


class EventOutput(serializers.ModelSerializer):
    """One event in full: the whole decision snapshot and the target rollup."""

    target_rollup = serializers.SerializerMethodField()

    class Meta:
        model = CurtailmentEvent
        fields = [*EVENT_FIELDS, "decision_snapshot", "target_rollup"]
        read_only_fields = fields

    def get_target_rollup(self, obj: CurtailmentEvent) -> dict[str, int]:
        from curtailment.selectors import target_rollup

        return target_rollup(event=obj)
