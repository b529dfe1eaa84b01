"""Domain errors raised by services and mapped to the one API error shape.

Every error carries a stable machine-readable `code` and an HTTP status; the message texts are
module constants so tests import them instead of repeating strings.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, fields: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.fields = fields or {}


class ValidationFailed(DomainError):
    status_code = 400
    code = "validation_error"


class NotFound(DomainError):
    status_code = 404
    code = "not_found"


class Forbidden(DomainError):
    status_code = 403
    code = "permission_denied"


class Conflict(DomainError):
    status_code = 409
    code = "conflict"


class Unprocessable(DomainError):
    status_code = 422
    code = "unprocessable"


class RaceLost(Conflict):
    """A compare-and-set found the row in another state: somebody else moved it first."""

    code = "race_lost"
