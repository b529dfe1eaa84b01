from __future__ import annotations

from typing import Any

from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request

from fleetops.access.context import resolve_org_access
from fleetops.access.models import Role
from fleetops.access.roles import audit_denial
from fleetops.audit.actors import Actor
from fleetops.observability.context import actor_var

ROLE_REQUIRED = "This needs the {role} role in the organization; you have {have}."
INTERACTIVE_REQUIRED = "This needs an interactive session (log in to the portal); API tokens cannot do it."


def required_role_for(view: Any, request: Request) -> Role:
    """A view declares `required_roles = {"<action or METHOD>": Role...}`; otherwise reads need a
    viewer and writes an operator."""
    declared: dict[str, Role] = getattr(view, "required_roles", {})
    action = getattr(view, "action", None)
    if action and action in declared:
        return declared[action]
    if request.method in declared:
        return declared[request.method]
    return Role.VIEWER if request.method in SAFE_METHODS else Role.OPERATOR


def audit_denied(request: Any, *, surface: str, org: Any, required: str, have: str | None, what: str) -> None:
    """A refusal at an edge (API permission class, admin gate): the same `access.denied` row as a
    refusal inside a service (`fleetops.access.roles`)."""
    audit_denial(
        actor=Actor.from_request(request), org=org, surface=surface, what=what, required=required, have=have
    )


class OrgRolePermission(BasePermission):
    """Resolves the request's organization and role and checks the view's required role."""

    message = "Permission denied."

    def has_permission(self, request: Request, view: Any) -> bool:
        if not request.user or not request.user.is_authenticated:
            return False
        method = (request.method or "").lower()
        if method not in view.http_method_names or not hasattr(view, method):
            return True  # let the view answer 405 instead of a misleading 403
        access = resolve_org_access(request)
        actor_var.set(Actor.from_request(request).label)
        required = required_role_for(view, request)
        if Role.at_least(access.role, required):
            return True
        self.message = ROLE_REQUIRED.format(role=required.value, have=access.role.value)
        audit_denied(
            request,
            surface="api",
            org=access.org,
            required=required,
            have=access.role,
            what=f"{request.method} {request.path}",
        )
        return False


class InteractiveSessionRequired(BasePermission):
    """For operations a script must never do (admin terminate, issuing tokens)."""

    message = INTERACTIVE_REQUIRED

    def has_permission(self, request: Request, view: Any) -> bool:
        if request.user and request.user.is_authenticated and request.auth is None:
            return True
        if request.user and request.user.is_authenticated:
            access = resolve_org_access(request)
            audit_denied(
                request,
                surface="api",
                org=access.org,
                required="interactive_session",
                have=access.role,
                what=f"{request.method} {request.path}",
            )
        return False
