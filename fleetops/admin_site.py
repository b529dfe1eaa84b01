"""The operator console: Django's admin with an ops dashboard as its index page."""

from __future__ import annotations

import logging
from functools import cached_property, wraps
from typing import Any

from django.contrib.admin import AdminSite
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import connection
from django.http import Http404, HttpRequest, HttpResponse
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import path

from fleetops.access.admin_mixins import denied_page
from fleetops.admin_live import fragment_response, live_context
from fleetops.observability import registry

log = logging.getLogger(__name__)

# Below this many rows an exact count is cheap and nicer to read; above it use the planner's estimate.
EXACT_COUNT_BELOW = 10_000
# A filtered changelist counts at most this many rows and shows "10,000+" beyond.
FILTERED_COUNT_CAP = 10_000


class FleetOpsAdminSite(AdminSite):
    site_header = "FleetOps"
    site_title = "FleetOps"
    index_title = "Operations dashboard"
    index_template = "admin/fleetops_index.html"

    def index(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> TemplateResponse:
        rendered = [render_card(card, request) for card in registry.cards()]
        context = {"dashboard_cards": rendered, **live_context(), **(extra_context or {})}
        return super().index(request, context)

    def admin_view(self, view: Any, cacheable: bool = False) -> Any:
        """Every console view: a refusal renders inside the admin's layout with the role it needs."""
        inner = super().admin_view(view, cacheable)

        @wraps(inner)
        def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            try:
                response: HttpResponse = inner(request, *args, **kwargs)
                return response
            except PermissionDenied as exc:
                return denied_page(self, request, exc)

        return guarded

    def get_urls(self) -> list[Any]:
        return [
            path("live/card/<slug:key>/", self.admin_view(self.card_live_view), name="live_card"),
            *super().get_urls(),
        ]

    def card_live_view(self, request: HttpRequest, key: str) -> HttpResponse:
        """One dashboard card's body, from the same partial as the index (console.js swaps it in).
        Cards scope their own queries to the user's organizations, as on the index."""
        card = next((c for c in registry.cards() if c.key == key), None)
        if card is None:
            raise Http404("No such card.")
        html = render_to_string(
            "admin/fleetops/card_body.html",
            {"card": render_card(card, request), **live_context()},
            request=request,
        )
        return fragment_response(html)


def render_card(card: registry.DashboardCard, request: HttpRequest) -> dict[str, Any]:
    try:
        body: str = render_to_string(card.template, card.context(request), request=request)
        trends = card.trends(request) if card.trends else []
        failed = False
    except Exception:
        # One broken card must not take the console down with it.
        log.exception("dashboard card %s failed", card.key)
        body, trends, failed = "", [], True
    return {"key": card.key, "title": card.title, "body": body, "trends": trends, "failed": failed}


def estimated_row_count(table: str) -> int:
    """The planner's estimate from pg_class; -1 when the table was never analyzed."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass", [table])
        row = cursor.fetchone()
    return int(row[0]) if row else -1


class EstimatedCountPaginator(Paginator):
    """Never an exact COUNT(*) over a big table: unfiltered lists use pg_class's estimate, filtered
    lists count at most FILTERED_COUNT_CAP + 1 rows."""

    @cached_property
    def count(self) -> int:
        qs: Any = self.object_list
        query = getattr(qs, "query", None)
        if query is None:
            return len(qs)
        if not query.where:
            estimate = estimated_row_count(qs.model._meta.db_table)
            if estimate >= EXACT_COUNT_BELOW:
                return estimate
        # Unordered: with the list's ORDER BY -id inside the LIMITed subquery, the planner walks the
        # primary key backwards through every non-matching row until the cap is reached.
        return int(qs.order_by()[: FILTERED_COUNT_CAP + 1].count())


class BigTableAdminMixin:
    """For changelists over tables that grow without bound."""

    paginator: Any = EstimatedCountPaginator
    show_full_result_count = False
    list_per_page = 50
