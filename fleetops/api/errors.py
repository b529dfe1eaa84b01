"""The one error shape: `{"error": {"code": "...", "message": "...", "fields": {...}}}`.

Every error leaving /api/ has it: DRF's own exceptions, domain errors raised by services, unknown
paths, wrong methods, a database outage (503 `database_unavailable` with Retry-After) and unexpected
crashes (as a 500 with no internals).
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import set_rollback

from fleetops.api.parsers import RequestTooLarge
from fleetops.lib.errors import DomainError
from fleetops.observability.metrics import API_ERRORS
from fleetops.observability.outages import (
    DATABASE_ERRORS,
    DATABASE_UNAVAILABLE,
    DATABASE_UNAVAILABLE_MESSAGE,
    RETRY_AFTER_SECONDS,
    one_line,
)

log = logging.getLogger(__name__)

_CODES: dict[type[exceptions.APIException], str] = {
    exceptions.ValidationError: "validation_error",
    exceptions.ParseError: "malformed_request",
    exceptions.AuthenticationFailed: "authentication_failed",
    exceptions.NotAuthenticated: "not_authenticated",
    exceptions.PermissionDenied: "permission_denied",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.NotAcceptable: "not_acceptable",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.Throttled: "throttled",
}


def error_body(code: str, message: str, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    # The request id travels in the X-Request-ID header of every response, errors included.
    return {"error": {"code": code, "message": message, "fields": fields or {}}}


def _flatten(detail: Any) -> Any:
    if isinstance(detail, dict):
        return {str(k): _flatten(v) for k, v in detail.items()}
    if isinstance(detail, list):
        return [_flatten(v) for v in detail]
    return str(detail)


def _validation_message(fields: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(fields, dict):
        non_field = fields.pop("non_field_errors", None)
        if non_field:
            return str(non_field[0]), fields
        first = next(iter(fields), None)
        if first is not None:
            value = fields[first]
            text = value[0] if isinstance(value, list) and value else value
            return f"{first}: {text}", fields
        return "Invalid input.", fields
    if isinstance(fields, list) and fields:
        return str(fields[0]), {}
    return "Invalid input.", {}


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    headers: dict[str, str] = {}
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, RequestDataTooBig):
        # Django's own upload limit (a body read through `request.body`): the parser's 413.
        exc = RequestTooLarge()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()

    if isinstance(exc, DomainError):
        body = error_body(exc.code, exc.message, exc.fields)
        status_code = exc.status_code
        set_rollback()
    elif isinstance(exc, exceptions.APIException):
        code = _CODES.get(type(exc)) or (exc.default_code if isinstance(exc.default_code, str) else "error")
        if isinstance(exc, exceptions.ValidationError):
            message, fields = _validation_message(_flatten(exc.detail))
        else:
            message, fields = str(exc.detail), {}
        wait = getattr(exc, "wait", None)
        if isinstance(exc, exceptions.Throttled) and wait is not None:
            headers["Retry-After"] = str(int(wait) + 1)
        auth_header = getattr(exc, "auth_header", None)
        if auth_header:
            headers["WWW-Authenticate"] = auth_header
        body = error_body(code, message, fields)
        status_code = exc.status_code
        set_rollback()
    elif isinstance(exc, DATABASE_ERRORS):
        # PostgreSQL is down or restarting: not a bug and not the client's fault. Nothing committed
        # (every write is one transaction), so the client may safely retry the same request.
        log.warning("database unavailable: %s", one_line(exc))
        body = error_body(DATABASE_UNAVAILABLE, DATABASE_UNAVAILABLE_MESSAGE)
        status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        set_rollback()
    else:
        # Anything else is our bug, never the client's: log it with the request id, answer 500.
        log.exception("unhandled API error", exc_info=exc)
        body = error_body("internal_error", "Something went wrong on our side; the request id identifies it.")
        status_code = status.HTTP_500_INTERNAL_SERVER_ERROR
        set_rollback()
    API_ERRORS.labels(status=str(status_code), code=body["error"]["code"]).inc()
    return Response(body, status=status_code, headers=headers)


def _json_error(status_code: int, code: str, message: str) -> JsonResponse:
    API_ERRORS.labels(status=str(status_code), code=code).inc()
    return JsonResponse(error_body(code, message), status=status_code)


def database_unavailable_json() -> JsonResponse:
    """The API's answer when the database fails outside a DRF view (authentication middleware,
    session save): the same shape and header as `api_exception_handler` gives."""
    response = _json_error(503, DATABASE_UNAVAILABLE, DATABASE_UNAVAILABLE_MESSAGE)
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


# Exempt from CSRF: a POST, PATCH or DELETE to a path that does not exist is a 404 in the error
# shape, not the CSRF middleware's HTML 403 (there is nothing here to protect).
@csrf_exempt
def api_not_found(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
    return _json_error(404, "not_found", f"No API endpoint at {request.path}.")


def is_api_path(request: HttpRequest) -> bool:
    return request.path.startswith("/api/")


def handler404(request: HttpRequest, exception: Exception | None = None) -> Any:
    if is_api_path(request):
        return _json_error(404, "not_found", "Not found.")
    from django.views.defaults import page_not_found

    return page_not_found(request, exception or Http404())


def handler500(request: HttpRequest) -> Any:
    if is_api_path(request):
        return _json_error(
            500, "internal_error", "Something went wrong on our side; the request id identifies it."
        )
    from django.views.defaults import server_error

    return server_error(request)


def handler403(request: HttpRequest, exception: Exception | None = None) -> Any:
    if is_api_path(request):
        return _json_error(403, "permission_denied", "Permission denied.")
    from django.views.defaults import permission_denied

    return permission_denied(request, exception or DjangoPermissionDenied())


def handler400(request: HttpRequest, exception: Exception | None = None) -> Any:
    if is_api_path(request):
        return _json_error(400, "bad_request", "Bad request.")
    from django.views.defaults import bad_request

    return bad_request(request, exception or Exception())
