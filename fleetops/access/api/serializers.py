from __future__ import annotations

from typing import Any

from rest_framework import serializers

from fleetops.access.models import ApiToken, Role
from fleetops.api.fields import ReasonField
from fleetops.api.serializers import InputSerializer


class MembershipOutput(serializers.Serializer):
    org = serializers.CharField(source="org.slug")
    org_name = serializers.CharField(source="org.name")
    role = serializers.ChoiceField(choices=Role.choices)


class OrgAccessOutput(serializers.Serializer):
    org = serializers.CharField(source="org.slug")
    role = serializers.ChoiceField(choices=Role.choices)
    via_token = serializers.SerializerMethodField()

    def get_via_token(self, obj: object) -> str | None:
        token = getattr(obj, "token", None)
        return token.key_id if token is not None else None


class MeOutput(serializers.Serializer):
    username = serializers.CharField()
    is_superuser = serializers.BooleanField()
    memberships = MembershipOutput(many=True)
    current = OrgAccessOutput(allow_null=True)


class ApiTokenOutput(serializers.ModelSerializer):
    org: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    owner = serializers.CharField(source="user.username", read_only=True)

    class Meta:
        model = ApiToken
        fields = [
            "id",
            "name",
            "key_id",
            "org",
            "owner",
            "role",
            "created_at",
            "expires_at",
            "last_used_at",
            "revoked_at",
            "revoked_reason",
        ]
        read_only_fields = fields


class ApiTokenCreateInput(InputSerializer):
    name = serializers.CharField(max_length=100)
    role = serializers.ChoiceField(choices=Role.choices)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)


class ApiTokenCreated(ApiTokenOutput):
    token = serializers.CharField(
        allow_null=True, help_text="The plaintext token. Shown once; null when an Idempotency-Key replays."
    )

    class Meta(ApiTokenOutput.Meta):
        fields = [*ApiTokenOutput.Meta.fields, "token"]
        read_only_fields = fields


class ReasonInput(InputSerializer):
    reason = ReasonField()
