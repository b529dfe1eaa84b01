"""The protocols API: protocols with statuses, cursors, lag and handoff; their state changes,
balances and owners with keyset pagination. Protocols belong to the organization that runs their
chain; another organization's protocol is a 404.

A protocol is identified by (chain, protocol id): `/protocols/{chain}/{protocol_id}[/…]`. The older
`/protocols/{protocol_id}[/…]` still answers while the organization runs that protocol on one chain
only, and is a 409 (`ambiguous`, naming the chains) once it runs on several; it is deprecated in
the schema."""

from __future__ import annotations

from typing import Any

import django_filters
from django.db.models import QuerySet
from django.utils.functional import cached_property
from django_filters.utils import translate_validation
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
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


class ProtocolListFilter(django_filters.FilterSet):
    chain = django_filters.CharFilter(max_length=60, help_text="Only the protocols of this chain (slug).")

    class Meta:
        model = Protocol
        fields: list[str] = []


CHAIN_PARAM = OpenApiParameter(
    "chain", OpenApiTypes.STR, OpenApiParameter.PATH, description="Chain slug (`sim`, …)."
)
PROTOCOL_ID_PARAM = OpenApiParameter(
    "protocol_id", OpenApiTypes.STR, OpenApiParameter.PATH, description="Protocol id (`SEP41`, …)."
)
AMBIGUOUS = OpenApiResponse(
    description="`ambiguous`: the organization runs the protocol on several chains (named in the "
    "message); use `/api/v1/protocols/{chain}/{protocol_id}`."
)


class ProtocolScopedMixin(OrgScopedMixin):
    kwargs: dict[str, Any]

    @cached_property
    def protocol(self) -> Protocol:
        return selectors.protocol_get(
            org=self.org_access.org, protocol_id=self.kwargs["protocol_id"], chain=self.kwargs.get("chain")
        )


class ProtocolRowsView(ProtocolScopedMixin, SelectorListView):
    """Parse the filters, then let the selector build the query from the cleaned values."""

    required_roles = {"GET": Role.VIEWER}

    def scoped_queryset(self, access: OrgAccess) -> QuerySet[Any]:
        return self.select(self.protocol, **self.cleaned_filters())

    def select(self, protocol: Protocol, **filters: Any) -> QuerySet[Any]:
        raise NotImplementedError


class ProtocolList(OrgScopedMixin, APIView):
    """The organization's protocols with their statuses, cursors, lag and handoff, by protocol id
    and chain; `?chain=` keeps one chain's."""

    required_roles = {"GET": Role.VIEWER}

    @extend_schema(
        responses=ProtocolOutput(many=True),
        parameters=[
            OpenApiParameter(
                "chain", OpenApiTypes.STR, OpenApiParameter.QUERY, description="Only this chain's (slug)."
            )
        ],
    )
    def get(self, request: Request) -> Response:
        filters = ProtocolListFilter(request.query_params, queryset=Protocol.objects.none())
        if not filters.is_valid():
            raise translate_validation(filters.errors)
        chain = filters.form.cleaned_data.get("chain") or None
        protocols = selectors.protocol_list(org=self.org_access.org, chain=chain)
        protocols = protocols.order_by("protocol_id", "chain__slug")[:200]
        return Response([ProtocolOutput.of(s) for s in selectors.protocol_statuses(protocols)])


class ProtocolDetail(ProtocolScopedMixin, APIView):
    """One protocol on one chain: statuses, cursors, lag and handoff."""

    required_roles = {"GET": Role.VIEWER}

    @extend_schema(
        operation_id="protocols_chain_retrieve",
        responses=ProtocolOutput,
        parameters=[CHAIN_PARAM, PROTOCOL_ID_PARAM],
    )
    def get(self, request: Request, protocol_id: str, chain: str | None = None) -> Response:
        return Response(ProtocolOutput.of(selectors.protocol_status(protocol=self.protocol)))


def _canonical(operation_id: str) -> Any:
    """Schema of a `/protocols/{chain}/{protocol_id}[/…]` operation."""
    return extend_schema_view(
        get=extend_schema(operation_id=operation_id, parameters=[CHAIN_PARAM, PROTOCOL_ID_PARAM])
    )


@_canonical("protocols_chain_state_changes_list")
class StateChangeList(ProtocolRowsView):
    """State changes, newest first (keyset on height, id); filter by account, asset, kind, heights."""

    queryset = ProtocolStateChange.objects.none()
    serializer_class = StateChangeOutput
    filterset_class = StateChangeFilter
    keyset_ordering = ("-height", "-id")

    def select(self, protocol: Protocol, **filters: Any) -> QuerySet[ProtocolStateChange]:
        return selectors.state_change_list(protocol=protocol, **filters)


@_canonical("protocols_chain_balances_list")
class BalanceList(ProtocolRowsView):
    """SEP41 current state: balances by asset and account."""

    queryset = ProtocolBalance.objects.none()
    serializer_class = BalanceOutput
    filterset_class = BalanceFilter
    keyset_ordering = ("asset", "account")

    def select(self, protocol: Protocol, **filters: Any) -> QuerySet[ProtocolBalance]:
        return selectors.balance_list(protocol=protocol, **filters)


@_canonical("protocols_chain_owners_list")
class OwnerList(ProtocolRowsView):
    """SEP50 current state: the owner of every token."""

    queryset = ProtocolNftOwner.objects.none()
    serializer_class = OwnerOutput
    filterset_class = OwnerFilter
    keyset_ordering = ("asset", "token_id")

    def select(self, protocol: Protocol, **filters: Any) -> QuerySet[ProtocolNftOwner]:
        return selectors.owner_list(protocol=protocol, **filters)


# The protocol id alone (`/protocols/{protocol_id}[/…]`): the shape from before protocols were per
# chain, answered while the organization runs the protocol on one chain only.
_LEGACY: dict[str, Any] = {
    "deprecated": True,
    "parameters": [OpenApiParameter("chain", location=OpenApiParameter.PATH, exclude=True)],
}


@extend_schema_view(
    get=extend_schema(
        operation_id="protocols_retrieve",
        responses={200: ProtocolOutput, 409: AMBIGUOUS},
        **_LEGACY,
    )
)
class ProtocolDetailById(ProtocolDetail):
    """One protocol by its id alone (deprecated: `/protocols/{chain}/{protocol_id}`)."""


@extend_schema_view(
    get=extend_schema(
        operation_id="protocols_state_changes_list",
        responses={200: StateChangeOutput(many=True), 409: AMBIGUOUS},
        **_LEGACY,
    )
)
class StateChangeListById(StateChangeList):
    """State changes by protocol id alone (deprecated: `/protocols/{chain}/{protocol_id}/state-changes`)."""


@extend_schema_view(
    get=extend_schema(
        operation_id="protocols_balances_list",
        responses={200: BalanceOutput(many=True), 409: AMBIGUOUS},
        **_LEGACY,
    )
)
class BalanceListById(BalanceList):
    """Balances by protocol id alone (deprecated: `/protocols/{chain}/{protocol_id}/balances`)."""


@extend_schema_view(
    get=extend_schema(
        operation_id="protocols_owners_list",
        responses={200: OwnerOutput(many=True), 409: AMBIGUOUS},
        **_LEGACY,
    )
)
class OwnerListById(OwnerList):
    """Owners by protocol id alone (deprecated: `/protocols/{chain}/{protocol_id}/owners`)."""
