from __future__ import annotations

from typing import Any

from rest_framework import serializers

from fleetops.audit.models import AuditEvent


class AuditEventOutput(serializers.ModelSerializer):
    org: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(slug_field="slug", read_only=True)

    class Meta:
        model = AuditEvent
        fields = [
            "id",
            "at",
            "org",
            "actor_type",
            "actor_id",
            "actor_label",
            "action",
            "target_type",
            "target_id",
            "target_label",
            "reason",
            "changes",
            "metadata",
            "request_id",
        ]
        read_only_fields = fields
