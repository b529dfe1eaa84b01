"""Test-only endpoints that exercise the API plumbing generically (roles, errors, idempotency)."""

from __future__ import annotations

from typing import Any

from django.urls import path
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fleetops.access.models import Role
from fleetops.api.idempotency import idempotent
from fleetops.api.views import OrgScopedMixin
from fleetops.lib.errors import Conflict
from fleetops.urls import urlpatterns as real_patterns

# Tests set `release` to make a request hold its Idempotency-Key in flight.
gate: dict[str, Any] = {"entered": None, "release": None}
calls: list[dict] = []


class RoleProbe(OrgScopedMixin, APIView):
    required_roles = {"GET": Role.VIEWER, "POST": Role.OPERATOR, "DELETE": Role.ADMIN}

    def get(self, request: Request) -> Response:
        return Response({"ok": "read"})

    def post(self, request: Request) -> Response:
        return Response({"ok": "operate"})

    def delete(self, request: Request) -> Response:
        return Response({"ok": "admin"})


class IdempotentCommand(OrgScopedMixin, APIView):
    required_roles = {"POST": Role.OPERATOR}

    @idempotent()
    def post(self, request: Request) -> Response:
        if gate["entered"] is not None:
            gate["entered"].set()
        if gate["release"] is not None:
            gate["release"].wait(10)
        data: dict[str, Any] = dict(request.data)
        if data.get("fail") == "conflict":
            raise Conflict("refused", code="refused")
        calls.append(dict(request.data))
        location = data.get("location")
        return Response(
            {"n": len(calls), "echo": request.data},
            status=201,
            headers={"Location": location} if isinstance(location, str) else None,
        )


class Crash(OrgScopedMixin, APIView):
    def get(self, request: Request) -> Response:
        raise RuntimeError("unexpected")


urlpatterns = [
    path("api/v1/test/roles/", RoleProbe.as_view()),
    path("api/v1/test/command/", IdempotentCommand.as_view()),
    path("api/v1/test/crash/", Crash.as_view()),
    *real_patterns,
]

handler404 = "fleetops.api.errors.handler404"
handler500 = "fleetops.api.errors.handler500"
