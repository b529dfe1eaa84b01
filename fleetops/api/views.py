"""Shared bases for API views."""

from __future__ import annotations

from typing import Any

import django_filters
from django.db.models import QuerySet
from django_filters.utils import translate_validation
from rest_framework import generics

from fleetops.access.context import OrgAccess, request_actor, resolve_org_access
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
        # Made from this request, dropped with it: the role it carries is this request's read.
        return request_actor(self.request)


class OrgScopedListView(OrgScopedMixin, generics.ListAPIView):
    pass


class SelectorListView(OrgScopedListView):
    """A list whose query parameters a FilterSet parses (and documents in the schema) and whose
    query a selector builds from the cleaned values, so every query is one the indexes answer.
    Bad parameters are a 400 in the error shape; empty ones are dropped."""

    filterset_class: type[django_filters.FilterSet]

    def cleaned_filters(self) -> dict[str, Any]:
        params = self.request.query_params
        if not any(key.startswith(name) for key in params for name in self.filterset_class.base_filters):
            # No filter named (a plain page): building and validating the FilterSet's form would
            # cost more than the page's query, for no value.
            return {}
        filterset = self.filterset_class(params, queryset=self.queryset)
        if not filterset.is_valid():
            raise translate_validation(filterset.errors)
        return {k: v for k, v in filterset.form.cleaned_data.items() if v not in (None, "")}

    def filter_queryset(self, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset  # the selector already applied the filters


class OrgScopedRetrieveView(OrgScopedMixin, generics.RetrieveAPIView):
    pass
