from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from django.core.signals import got_request_exception
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string

from fleetops.api.errors import database_unavailable_json, is_api_path
from fleetops.observability.context import actor_var, request_id_var, sanitize_request_id
from fleetops.observability.outages import DATABASE_ERRORS, RETRY_AFTER_SECONDS, one_line

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"


class RequestIdMiddleware:
    """Binds X-Request-ID (the caller's when sane, else a new one) for logs and audit rows, and
    returns it on every response."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        request_id = sanitize_request_id(request.headers.get(REQUEST_ID_HEADER))
        request.request_id = request_id  # type: ignore[attr-defined]
        token = request_id_var.set(request_id)
        actor_token = actor_var.set("")
        try:
            response = self.get_response(request)
        finally:
            request_id_var.reset(token)
            actor_var.reset(actor_token)
        response[REQUEST_ID_HEADER] = request_id
        return response


class DatabaseUnavailableMiddleware:
    """A database outage answers 503 with Retry-After, never a 500: the API's error shape under
    /api/, a small "database unavailable" page everywhere else (admin, /ops/status, login).

    1. A view that raises OperationalError/InterfaceError (the session or the user loaded lazily by
       `request.user`, a query, a template) reaches `process_exception`. DRF views answer for
       themselves through `fleetops.api.errors.api_exception_handler`, with the same shape.
    2. Middleware that touches the database outside the view (the session saved in
       SessionMiddleware's response phase) raises past `process_exception`; Django turns that into
       a 500 one layer in. `got_request_exception` marks the request, and `__call__` swaps that
       500 for the 503. Keep this middleware outside SessionMiddleware and AuthenticationMiddleware.
    `/health/ready` catches the error itself and keeps its own 503 body.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response
        got_request_exception.connect(_note_database_error, dispatch_uid=_MARK)

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if response.status_code >= 500 and getattr(request, _MARK, False):
            return database_unavailable_response(request)
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if isinstance(exception, DATABASE_ERRORS):
            log.warning("database unavailable while serving %s: %s", request.path, one_line(exception))
            return database_unavailable_response(request)
        return None


_MARK = "_fleetops_database_unavailable"


def _note_database_error(sender: Any, request: HttpRequest | None = None, **kwargs: Any) -> None:
    # Sent from inside Django's `except` block, so the exception being handled is sys.exc_info().
    exc = sys.exc_info()[1]
    if request is not None and isinstance(exc, DATABASE_ERRORS):
        setattr(request, _MARK, True)


def database_unavailable_response(request: HttpRequest) -> HttpResponse:
    if is_api_path(request):
        return database_unavailable_json()
    # Rendered without the request: the context processors would load the user, i.e. the database.
    body = render_to_string(
        "observability/database_unavailable.html",
        {"retry_after": RETRY_AFTER_SECONDS, "request_id": getattr(request, "request_id", "")},
    )
    response = HttpResponse(body, status=503)
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    response["Cache-Control"] = "no-store"
    return response
