"""Shared bases for API views."""

from __future__ import annotations

from typing import Any

from rest_framework import generics

from fleetops.access.context import OrgAccess, resolve_org_access
from fleetops.audit.actors import Actor


class OrgScopedMixin:
    """Every queryset is filtered to the request's organization; another org's row is a 404.

    List/detail views set `queryset = Model.objects.none()` (it only tells the schema generator
    the model) and implement `scoped_queryset(access)`.
    """

    request: Any
    queryset: Any = None

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):
            return self.queryset
        return self.scoped_queryset(self.org_access)

    def scoped_queryset(self, access: OrgAccess) -> Any:
        raise NotImplementedError

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
