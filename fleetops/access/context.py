"""Which organization an API request acts in, and with which role."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleetops.access.models import ApiToken, Organization, Role
from fleetops.access.roles import RequestActor
from fleetops.access.selectors import org_ids_for_user, role_in_org
from fleetops.audit.actors import Actor
from fleetops.audit.models import ActorType
from fleetops.lib.errors import NotFound, ValidationFailed

ORG_HEADER = "X-FleetOps-Org"
ORG_REQUIRED = (
    f"You belong to several organizations; name one with the {ORG_HEADER} header (its slug), "
    "or use an API token, which is bound to one."
)
ORG_NOT_FOUND = "No such organization."


@dataclass(frozen=True)
class OrgAccess:
    org: Organization
    role: Role
    token: ApiToken | None


def resolve_org_access(request: Any) -> OrgAccess:
    cached = getattr(request, "_fleetops_org_access", None)
    if cached is not None:
        return cached
    access = _resolve(request)
    request._fleetops_org_access = access
    return access


def _resolve(request: Any) -> OrgAccess:
    user = request.user
    slug = (request.headers.get(ORG_HEADER) or "").strip()
    token = request.auth if isinstance(request.auth, ApiToken) else None
    if token is not None:
        if slug and slug != token.org.slug:
            raise NotFound(ORG_NOT_FOUND, code="organization_not_found")
        member_role = role_in_org(user=user, org_id=token.org_id)
        if member_role is None:
            raise NotFound(ORG_NOT_FOUND, code="organization_not_found")
        return OrgAccess(org=token.org, role=Role.lowest(token.role, member_role), token=token)
    if slug:
        org = Organization.objects.filter(slug=slug).first()
    else:
        org_ids = org_ids_for_user(user)
        if len(org_ids) != 1:
            raise ValidationFailed(ORG_REQUIRED, code="organization_required")
        org = Organization.objects.filter(pk=org_ids[0]).first()
    role = role_in_org(user=user, org_id=org.pk) if org is not None else None
    if org is None or role is None:
        # Another organization's existence is not disclosed: unknown and not-a-member read the same.
        raise NotFound(ORG_NOT_FOUND, code="organization_not_found")
    return OrgAccess(org=org, role=role, token=None)


def request_actor(request: Any) -> Actor:
    """The actor of an API request. A token's actor carries the role this request's authentication
    read for the token's organization (`RequestActor`), so the services' role checks do not read the
    token, its owner and the membership a second time; a session user's actor carries nothing and
    is checked against the database as everywhere else (`fleetops.access.roles`)."""
    actor = Actor.from_request(request)
    if actor.type != ActorType.API_TOKEN:
        return actor
    access = resolve_org_access(request)
    return RequestActor(
        type=actor.type,
        id=actor.id,
        label=actor.label,
        user_id=actor.user_id,
        is_superuser=actor.is_superuser,
        interactive=actor.interactive,
        vouched=(access.org.pk, access.role),
    )
