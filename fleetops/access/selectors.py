from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from fleetops.access.models import Membership, Organization, Role


def org_ids_for_user(user: Any) -> list[int]:
    if not getattr(user, "is_authenticated", False):
        return []
    cached = getattr(user, "_fleetops_org_roles", None)
    if cached is None:
        cached = dict(Membership.objects.filter(user=user).values_list("org_id", "role"))
        user._fleetops_org_roles = cached
    return list(cached)


def pin_role(*, user: Any, org_id: int, role: str | None) -> None:
    """Keep the user's role in one organization, read along with something else (the API token's
    query reads the owner's membership in the token's organization), for `role_in_org`."""
    user._fleetops_pinned_role = (org_id, role)


def role_in_org(*, user: Any, org_id: int) -> Role | None:
    """The user's role in one organization (superusers are admins everywhere)."""
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return None
    if user.is_superuser:
        return Role.ADMIN
    pinned = getattr(user, "_fleetops_pinned_role", None)
    if pinned is not None and pinned[0] == org_id:
        return Role(pinned[1]) if pinned[1] else None
    org_ids_for_user(user)
    role = user._fleetops_org_roles.get(org_id)
    return Role(role) if role else None


def highest_role(*, user: Any) -> Role | None:
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return None
    if user.is_superuser:
        return Role.ADMIN
    org_ids_for_user(user)
    roles = list(user._fleetops_org_roles.values())
    return Role(max(roles, key=Role.rank)) if roles else None


def org_ids_with_role(*, user: Any, role: str) -> list[int] | None:
    """Org ids where the user holds at least `role`; None means "all" (superuser)."""
    if user.is_superuser:
        return None
    org_ids_for_user(user)
    return [org_id for org_id, r in user._fleetops_org_roles.items() if Role.at_least(r, role)]


def organizations_for_user(*, user: Any) -> QuerySet[Organization]:
    if getattr(user, "is_superuser", False):
        return Organization.objects.all()
    return Organization.objects.filter(id__in=org_ids_for_user(user))
