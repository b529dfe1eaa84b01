"""The operator console: Django's admin with an ops dashboard as its index page."""

from __future__ import annotations

import logging
from functools import cached_property
from typing import Any

from django.contrib.admin import AdminSite
from django.core.paginator import Paginator
from django.db import connection
from django.http import HttpRequest
from django.template.loader import render_to_string
from django.template.response import TemplateResponse

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
        rendered = []
        for card in registry.cards():
            try:
                body: str = render_to_string(card.template, card.context(request), request=request)
                failed = False
            except Exception:
                # One broken card must not take the console down with it.
                log.exception("dashboard card %s failed", card.key)
                body, failed = "", True
            rendered.append({"key": card.key, "title": card.title, "body": body, "failed": failed})
        context = {"dashboard_cards": rendered, **(extra_context or {})}
        return super().index(request, context)


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
        return int(qs[: FILTERED_COUNT_CAP + 1].count())


class BigTableAdminMixin:
    """For changelists over tables that grow without bound."""

    paginator: Any = EstimatedCountPaginator
    show_full_result_count = False
    list_per_page = 50
