"""The protocols API: protocols with statuses, cursors, lag and handoff; their state changes,
balances and owners with keyset pagination. Protocols belong to the organization that runs their
chain; another organization's protocol is a 404."""

from __future__ import annotations

from typing import Any

import django_filters
from django.db.models import QuerySet
from django.utils.functional import cached_property
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fleetops.access.context import OrgAccess
from fleetops.access.models import Role
from fleetops.api.filters import HeightRangeForm, IntegerFilter
from fleetops.api.views import OrgScopedMixin, SelectorListView
from migrations_app.models import ChangeKind, Protocol, ProtocolBalance, ProtocolNftOwner, ProtocolStateChange
from migrations_app.protocols import selectors
from migrations_app.protocols.api.serializers import (
    BalanceOutput,
    OwnerOutput,
    ProtocolOutput,
    StateChangeOutput,
)


class StateChangeFilter(django_filters.FilterSet):
    account = django_filters.CharFilter(max_length=200)
    asset = django_filters.CharFilter(max_length=200)
    kind = django_filters.ChoiceFilter(choices=ChangeKind.choices)
    height_min = IntegerFilter(min_value=0)
    height_max = IntegerFilter(min_value=0)

    class Meta:
        model = ProtocolStateChange
        form = HeightRangeForm
        fields: list[str] = []


class BalanceFilter(django_filters.FilterSet):
    account = django_filters.CharFilter(max_length=200)
    asset = django_filters.CharFilter(max_length=200)

    class Meta:
        model = ProtocolBalance
        fields: list[str] = []


class OwnerFilter(django_filters.FilterSet):
    owner = django_filters.CharFilter(max_length=200)
    asset = django_filters.CharFilter(max_length=200)

    class Meta:
        model = ProtocolNftOwner
        fields: list[str] = []


class ProtocolScopedMixin(OrgScopedMixin):
    kwargs: dict[str, Any]

    @cached_property
    def protocol(self) -> Protocol:
        return selectors.protocol_get(org=self.org_access.org, protocol_id=self.kwargs["protocol_id"])


class ProtocolRowsView(ProtocolScopedMixin, SelectorListView):
    """Parse the filters, then let the selector build the query from the cleaned values."""

    required_roles = {"GET": Role.VIEWER}

    def scoped_queryset(self, access: OrgAccess) -> QuerySet[Any]:
        return self.select(self.protocol, **self.cleaned_filters())

    def select(self, protocol: Protocol, **filters: Any) -> QuerySet[Any]:
        raise NotImplementedError


class ProtocolList(OrgScopedMixin, APIView):
    """The organization's protocols with their statuses, cursors, lag and handoff."""

    required_roles = {"GET": Role.VIEWER}

    @extend_schema(responses=ProtocolOutput(many=True))
    def get(self, request: Request) -> Response:
        protocols = selectors.protocol_list(org=self.org_access.org).order_by("id")[:200]
        return Response([ProtocolOutput.of(s) for s in selectors.protocol_statuses(protocols)])


class ProtocolDetail(ProtocolScopedMixin, APIView):
    required_roles = {"GET": Role.VIEWER}

    @extend_schema(responses=ProtocolOutput)
    def get(self, request: Request, protocol_id: str) -> Response:
        return Response(ProtocolOutput.of(selectors.protocol_status(protocol=self.protocol)))


class StateChangeList(ProtocolRowsView):
    """State changes, newest first (keyset on height, id); filter by account, asset, kind, heights."""

    queryset = ProtocolStateChange.objects.none()
    serializer_class = StateChangeOutput
    filterset_class = StateChangeFilter
    keyset_ordering = ("-height", "-id")

    def select(self, protocol: Protocol, **filters: Any) -> QuerySet[ProtocolStateChange]:
        return selectors.state_change_list(protocol=protocol, **filters)


class BalanceList(ProtocolRowsView):
    """SEP41 current state: balances by asset and account."""

    queryset = ProtocolBalance.objects.none()
    serializer_class = BalanceOutput
    filterset_class = BalanceFilter
    keyset_ordering = ("asset", "account")

    def select(self, protocol: Protocol, **filters: Any) -> QuerySet[ProtocolBalance]:
        return selectors.balance_list(protocol=protocol, **filters)


class OwnerList(ProtocolRowsView):
    """SEP50 current state: the owner of every token."""

    queryset = ProtocolNftOwner.objects.none()
    serializer_class = OwnerOutput
    filterset_class = OwnerFilter
    keyset_ordering = ("asset", "token_id")

    def select(self, protocol: Protocol, **filters: Any) -> QuerySet[ProtocolNftOwner]:
        return selectors.owner_list(protocol=protocol, **filters)
