"""Serializer fields shared by every API: one rule per kind of input."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from fleetops.lib.errors import ValidationFailed
from fleetops.lib.reason import REASON_MAX_LENGTH, clean_reason


class ReasonField(serializers.CharField):
    """The reason an operator gives for an action: `fleetops.lib.reason.clean_reason`'s rules
    (required unless `required=False`, stripped, at most `REASON_MAX_LENGTH` characters)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", REASON_MAX_LENGTH)
        kwargs.setdefault("trim_whitespace", False)
        kwargs.setdefault("help_text", f"Why: recorded in the audit log (1-{REASON_MAX_LENGTH} characters).")
        if not kwargs.get("required", True):
            kwargs.setdefault("allow_blank", True)
            kwargs.setdefault("default", "")
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        value = super().to_internal_value(data)
        try:
            return clean_reason(value, required=self.required)
        except ValidationFailed as exc:
            raise serializers.ValidationError(exc.message) from exc
