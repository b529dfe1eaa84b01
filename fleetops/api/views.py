"""Shared bases for API views."""

from __future__ import annotations

from typing import Any

from rest_framework import generics

from fleetops.access.context import OrgAccess, resolve_org_access
from fleetops.audit.actors import Actor


class OrgScopedMixin:
    """Every queryset is filtered to the request's organization; another org's row is a 404."""

    request: Any

    @property
    def org_access(self) -> OrgAccess:
        return resolve_org_access(self.request)

    @property
    def actor(self) -> Actor:
        return Actor.from_request(self.request)


class OrgScopedListView(OrgScopedMixin, generics.ListAPIView):
    pass


class OrgScopedRetrieveView(OrgScopedMixin, generics.RetrieveAPIView):
    pass
