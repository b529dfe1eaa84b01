"""The one reason validator: every operator action that asks for a reason (API, admin forms,
management commands) cleans it here, so the rule and its message are the same everywhere."""

from __future__ import annotations

from typing import Any

from fleetops.lib.errors import ValidationFailed

REASON_MAX_LENGTH = 500
REASON_REQUIRED = f"A reason is required (1-{REASON_MAX_LENGTH} characters, not blank)."
REASON_TOO_LONG = f"The reason is too long (at most {REASON_MAX_LENGTH} characters)."
REASON_NOT_TEXT = "The reason must be text."


def clean_reason(value: Any, *, required: bool = True, field: str = "reason") -> str:
    """The reason, stripped; `ValidationFailed` naming `field` when it is missing, blank (and
    required), not a string, or longer than `REASON_MAX_LENGTH`."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ValidationFailed(REASON_NOT_TEXT, fields={field: [REASON_NOT_TEXT]})
    value = value.strip()
    if required and not value:
        raise ValidationFailed(REASON_REQUIRED, fields={field: [REASON_REQUIRED]})
    if len(value) > REASON_MAX_LENGTH:
        raise ValidationFailed(REASON_TOO_LONG, fields={field: [REASON_TOO_LONG]})
    return value
