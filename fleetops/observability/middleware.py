from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from fleetops.observability.context import actor_var, request_id_var, sanitize_request_id

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
