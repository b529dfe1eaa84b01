"""The indexer's REST API: chain status, blocks / transactions / events / enrichment lists with
keyset pagination, and the operator actions. Chains belong to an organization; another
organization's chain is a 404.

Lists parse their filters with a FilterSet (which also documents them in the schema) and hand the
cleaned values to the selectors, so every query is one the indexes answer.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Any

import django_filters
from django.core.validators import RegexValidator
from django.db.models import BooleanField, QuerySet
from django.db.models.expressions import RawSQL
from django.utils.functional import cached_property
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fleetops.access.context import OrgAccess
from fleetops.access.models import Role
from fleetops.api.filters import HeightRangeForm, IntegerFilter
from fleetops.api.idempotency import HEADER as IDEMPOTENCY_HEADER
from fleetops.api.idempotency import idempotent
from fleetops.api.views import OrgScopedListView, OrgScopedMixin, SelectorListView
from indexer import selectors, services
from indexer.api.serializers import (
    EVENT_FIELDS,
    ChainActionInput,
    ChainActionOutput,
    ChainBlockOutput,
    ChainEventOutput,
    ChainOutput,
    ChainRollbackInput,
    ChainStatusOutput,
    ChainTransactionOutput,
    EnrichmentOutput,
    EnrichmentRequeueInput,
    EnrichmentRequeueOutput,
)
from indexer.models import Block, Chain, Enrichment, EnrichmentStatus, Event, Transaction

IDEMPOTENCY_PARAM = OpenApiParameter(IDEMPOTENCY_HEADER, str, OpenApiParameter.HEADER, required=False)
TX_HASH_INVALID = "tx_hash must be 64 hexadecimal characters"


# --- filters -----------------------------------------------------------------------------------------


class HeightRangeFilter(django_filters.FilterSet):
    height_min = IntegerFilter(field_name="height", lookup_expr="gte", min_value=0)
    height_max = IntegerFilter(field_name="height", lookup_expr="lte", min_value=0)

    class Meta:
        form = HeightRangeForm
        fields: list[str] = []


TX_HASH_FIELD = {"validators": [RegexValidator(r"^[0-9A-Fa-f]{64}$", TX_HASH_INVALID)]}


class BlockFilter(HeightRangeFilter):
    class Meta(HeightRangeFilter.Meta):
        model = Block


class TransactionFilter(HeightRangeFilter):
    hash = django_filters.CharFilter(field_name="hash", **TX_HASH_FIELD)

    class Meta(HeightRangeFilter.Meta):
        model = Transaction


class EventFilter(HeightRangeFilter):
    type = django_filters.CharFilter(field_name="type", max_length=200)
    tx_hash = django_filters.CharFilter(
        method="by_tx_hash",
        help_text="Events of the transaction with this hash (resolved to its height and index).",
        **TX_HASH_FIELD,
    )

    class Meta(HeightRangeFilter.Meta):
        model = Event

    def by_tx_hash(self, queryset: QuerySet[Event], name: str, value: str) -> QuerySet[Event]:
        return queryset  # documentation only: the view hands the value to selectors.event_list


class EnrichmentFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(choices=EnrichmentStatus.choices)

    class Meta:
        model = Enrichment
        fields: list[str] = []


# --- bases -------------------------------------------------------------------------------------------


class ChainScopedMixin(OrgScopedMixin):
    """Views under chains/<slug>/: the chain of the request's organization, or a 404."""

    kwargs: dict[str, Any]

    @cached_property
    def chain(self) -> Chain:
        return selectors.chain_get(org=self.org_access.org, slug=self.kwargs["slug"])


# (organization id, slug) -> chain id, per process: a list page then costs no query of its own for
# the chain. A chain id never moves to another organization or slug, so a hint is either right or
# names a chain that is gone; the page's guard (`ChainListView.scoped_queryset`) tells which.
_CHAIN_IDS: dict[tuple[int, str], int] = {}
# Table name from the model, values are parameters.
_CHAIN_GUARD = (
    f'EXISTS (SELECT 1 FROM "{Chain._meta.db_table}" '  # noqa: S608
    'WHERE "id" = %s AND "org_id" = %s AND "slug" = %s)'
)


class ChainListView(ChainScopedMixin, SelectorListView):
    """Parse the filters, then let the selector build the query from the cleaned values.

    The chain is scoped inside the page's own query: its id comes from the process's hint, and an
    `EXISTS (chain with that id, organization and slug)` guard (a one-time filter for PostgreSQL)
    makes a wrong hint an empty page instead of another chain's rows. Only an empty page looks the
    chain up (404, or a fresh hint and the page again), so the chain costs no query of its own.
    """

    _hinted: int | None = None  # the chain id the page was read with, from the hint
    # Rows as dicts of these fields, sent as they are instead of through the serializer (events).
    values: tuple[str, ...] = ()

    def scoped_queryset(self, access: OrgAccess) -> QuerySet[Any]:
        slug = self.kwargs["slug"]
        chain_id = _CHAIN_IDS.get((access.org.pk, slug))
        if chain_id is None or "chain" in self.__dict__:
            _CHAIN_IDS[(access.org.pk, slug)] = self.chain.pk
            return self.select(self.chain, **self.cleaned_filters())
        self._hinted = chain_id
        rows = self.select(Chain(pk=chain_id, org_id=access.org.pk, slug=slug), **self.cleaned_filters())
        # Written out: the ORM's compilation of the same Exists() cost more than the guard itself.
        guard = RawSQL(  # noqa: S611
            _CHAIN_GUARD, [chain_id, access.org.pk, slug], output_field=BooleanField()
        )
        return rows.filter(guard)

    def select(self, chain: Chain, **filters: Any) -> QuerySet[Any]:
        raise NotImplementedError

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        rows = self._page()
        hinted = self._hinted
        if not rows and hinted is not None and self.chain.pk != hinted:
            # Empty, and the hint named a chain that is gone (a chain that is gone altogether is a
            # 404 from `self.chain`): read the page again with the chain of that slug now.
            rows = self._page()
        data = rows if self.values else self.get_serializer(rows, many=True).data
        return self.get_paginated_response(data)

    def _page(self) -> builtins.list[Any]:
        self._hinted = None
        rows = self.get_queryset()
        page = self.paginate_queryset(rows.values(*self.values) if self.values else rows)
        assert page is not None  # the keyset pagination always paginates
        return page


# --- chains ------------------------------------------------------------------------------------------


class ChainList(OrgScopedListView):
    """The organization's chains with the headline of their indexer state."""

    queryset = Chain.objects.none()
    serializer_class = ChainOutput
    keyset_ordering = ("slug",)
    required_roles = {"GET": Role.VIEWER}

    def scoped_queryset(self, access: OrgAccess) -> QuerySet[Chain]:
        return selectors.chain_list(org=access.org)


class ChainStatusView(ChainScopedMixin, APIView):
    """Head, indexed height, lag, mode, leader, poison height, sources with their connection status
    and health, and the enrichment backlog by status."""

    required_roles = {"GET": Role.VIEWER}

    @extend_schema(responses=ChainStatusOutput)
    def get(self, request: Request, slug: str) -> Response:
        return Response(ChainStatusOutput(selectors.chain_status(chain=self.chain)).data)


class BlockList(ChainListView):
    """Blocks, newest first (keyset on height)."""

    queryset = Block.objects.none()
    serializer_class = ChainBlockOutput
    filterset_class = BlockFilter
    keyset_ordering = ("-height",)
    required_roles = {"GET": Role.VIEWER}

    def select(self, chain: Chain, **filters: Any) -> QuerySet[Block]:
        return selectors.block_list(chain=chain, **filters)


class TransactionList(ChainListView):
    """Transactions, newest first (keyset on height, index)."""

    queryset = Transaction.objects.none()
    serializer_class = ChainTransactionOutput
    filterset_class = TransactionFilter
    keyset_ordering = ("-height", "-index")
    required_roles = {"GET": Role.VIEWER}

    def select(self, chain: Chain, **filters: Any) -> QuerySet[Transaction]:
        if "hash" in filters:
            filters["tx_hash"] = filters.pop("hash")
        return selectors.tx_list(chain=chain, **filters)


class EventList(ChainListView):
    """Events, newest first (keyset on id, stable while the writer inserts)."""

    queryset = Event.objects.none()
    serializer_class = ChainEventOutput
    filterset_class = EventFilter
    keyset_ordering = ("-id",)
    required_roles = {"GET": Role.VIEWER}
    # The hot read: rows straight from `.values()` into the response shape ChainEventOutput
    # documents (the schema still comes from it), instead of model instances through DRF's
    # field-by-field serialization, which cost ~10x the query on a 50-row page.
    values = EVENT_FIELDS

    def select(self, chain: Chain, **filters: Any) -> QuerySet[Event]:
        return selectors.event_list(chain=chain, **filters)

    def _page(self) -> builtins.list[Any]:
        if self.cleaned_filters():
            return super()._page()
        # Unfiltered, the page B5 walks: the keyset query written out (selectors.event_page_rows),
        # with the same chain hint and guard as `scoped_queryset`.
        access, slug = self.org_access, self.kwargs["slug"]
        chain_id = _CHAIN_IDS.get((access.org.pk, slug))
        guard: tuple[int, str] | None = (access.org.pk, slug)
        if chain_id is None or "chain" in self.__dict__:
            chain_id = _CHAIN_IDS[(access.org.pk, slug)] = self.chain.pk
            guard = None
        self._hinted = chain_id if guard else None

        def fetch(after: builtins.list[Any] | None, limit: int) -> builtins.list[Any]:
            return selectors.event_page_rows(
                chain_id=chain_id, before_id=after[0] if after else None, limit=limit, guard=guard
            )

        assert self.paginator is not None
        return self.paginator.paginate_rows(fetch, Event, self.request, view=self)  # type: ignore[attr-defined]


class EnrichmentList(ChainListView):
    """Enrichment rows, newest first; filter by status to see the backlog or the failures."""

    queryset = Enrichment.objects.none()
    serializer_class = EnrichmentOutput
    filterset_class = EnrichmentFilter
    keyset_ordering = ("-id",)
    required_roles = {"GET": Role.VIEWER}

    def select(self, chain: Chain, **filters: Any) -> QuerySet[Enrichment]:
        return selectors.enrichment_list(chain=chain, **filters)


# --- actions -----------------------------------------------------------------------------------------


class _ChainAction(ChainScopedMixin, APIView):
    required_roles = {"POST": Role.ADMIN}

    def respond(self, changed: bool) -> Response:
        # Read the chain again: the one loaded for the action carries the state from before it.
        chain = selectors.chain_get(org=self.org_access.org, slug=self.kwargs["slug"])
        return Response(ChainActionOutput.of(changed, selectors.chain_status(chain=chain)))


class _ReasonAction(_ChainAction):
    """An admin action whose only input is the reason: validate it, call `service`, answer with
    whether anything changed and the chain's status after."""

    service: Callable[..., bool]

    @extend_schema(request=ChainActionInput, responses=ChainActionOutput, parameters=[IDEMPOTENCY_PARAM])
    @idempotent()
    def post(self, request: Request, slug: str) -> Response:
        data = ChainActionInput(data=request.data)
        data.is_valid(raise_exception=True)
        service = type(self).service  # a plain function, not a method of the view
        changed = service(chain=self.chain, actor=self.actor, reason=data.validated_data["reason"])
        return self.respond(changed)


class ChainPause(_ReasonAction):
    """Stop ingest at the writer's next step (admin)."""

    service = services.indexer_pause


class ChainResume(_ReasonAction):
    """Let the writer ingest again (admin)."""

    service = services.indexer_resume


class ChainRetryPoison(_ReasonAction):
    """Clear the poison attempts so the writer tries the poison height again (admin)."""

    service = services.indexer_retry_poison


class ChainRollback(_ChainAction):
    """Request a rollback to `to_height` (admin); the writer carries it out on its next step."""

    @extend_schema(request=ChainRollbackInput, responses=ChainActionOutput, parameters=[IDEMPOTENCY_PARAM])
    @idempotent()
    def post(self, request: Request, slug: str) -> Response:
        data = ChainRollbackInput(data=request.data)
        data.is_valid(raise_exception=True)
        changed = services.indexer_request_rollback(
            chain=self.chain,
            to_height=data.validated_data["to_height"],
            actor=self.actor,
            reason=data.validated_data["reason"],
        )
        return self.respond(changed)


class EnrichmentRequeue(ChainScopedMixin, APIView):
    """failed / undecodable -> pending for the given ids, or all of them (operator)."""

    required_roles = {"POST": Role.OPERATOR}

    @extend_schema(
        request=EnrichmentRequeueInput, responses=EnrichmentRequeueOutput, parameters=[IDEMPOTENCY_PARAM]
    )
    @idempotent()
    def post(self, request: Request, slug: str) -> Response:
        data = EnrichmentRequeueInput(data=request.data)
        data.is_valid(raise_exception=True)
        requeued = services.enrichment_requeue(
            chain=self.chain,
            ids=data.validated_data["ids"],
            actor=self.actor,
            reason=data.validated_data["reason"],
        )
        return Response({"requeued": requeued})
