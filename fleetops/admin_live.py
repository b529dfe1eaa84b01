"""Live regions and fitted changelists for the console.

Live: a page region carries `data-live-url`; `fleetops/static/fleetops/console.js` fetches that
fragment every few seconds and swaps it in. The fragment is rendered from the same template partial
the page rendered first, by a view behind the same permission checks as the page (an object of
another organization is a 404 there too). Fragments carry `X-FleetOps-Fragment` so the script never
swaps a login or error page in, and a status line with the server time of the render
(`live_status.html`) that the script turns into "stale — last update …" when a refresh fails.

Fitted: `ColumnPriorityMixin` marks secondary changelist columns; below a container width they
collapse into a "Details" disclosure in the row (CSS container queries, no script), so nothing is
silently hidden at 1366 px.
"""

from __future__ import annotations

from typing import Any

from django.contrib.admin.templatetags.admin_list import result_list
from django.contrib.admin.utils import display_for_field, display_for_value, label_for_field, lookup_field
from django.core.exceptions import FieldDoesNotExist, PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.template.loader import render_to_string
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.text import capfirst

from fleetops.lib import clock

FRAGMENT_HEADER = "X-FleetOps-Fragment"
LIVE_STATUS_TEMPLATE = "admin/fleetops/live_status.html"


def fragment_response(html: str) -> HttpResponse:
    response = HttpResponse(html)
    response[FRAGMENT_HEADER] = "1"
    response["Cache-Control"] = "no-store"
    return response


def live_context() -> dict[str, Any]:
    """What every live partial needs for its status line."""
    return {"live_at": clock.now()}


class LiveObjectMixin:
    """A live region on a change page: set `live_template` and implement `live_context(request, obj)`;
    the change view gets the same context, and `<object_id>/live/` renders the partial alone."""

    live_template: str = ""
    live_name: str = ""
    live_interval_seconds: int = 5

    def live_context(self, request: HttpRequest, obj: Any) -> dict[str, Any]:
        raise NotImplementedError

    def get_urls(self) -> list[Any]:
        opts: Any = self.model._meta  # type: ignore[attr-defined]
        site: Any = self.admin_site  # type: ignore[attr-defined]
        return [
            path(
                "<path:object_id>/live/",
                site.admin_view(self.live_view),
                name=f"{opts.app_label}_{opts.model_name}_live",
            ),
            *super().get_urls(),  # type: ignore[misc]
        ]

    def full_live_context(self, request: HttpRequest, obj: Any) -> dict[str, Any]:
        return {
            **self.live_context(request, obj),
            **live_context(),
            "live_name": self.live_name,
            "live_interval": self.live_interval_seconds,
            "original": obj,
        }

    def live_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        obj = self.get_object(request, object_id)  # type: ignore[attr-defined]
        # Scoped queryset: another organization's object is not found, exactly as on the page.
        if obj is None:
            raise Http404("Not found.")
        if not self.has_view_permission(request, obj):  # type: ignore[attr-defined]
            raise PermissionDenied
        html = render_to_string(self.live_template, self.full_live_context(request, obj), request=request)
        return fragment_response(html)


class LiveChangelistMixin:
    """The rows of a changelist refresh in place: `live/?<the page's query>` renders the `<tbody>`
    rows for the same filters, search and page (template `admin/<app>/<model>/change_list_results.html`
    wraps them in the live region)."""

    live_interval_seconds: int = 10

    def get_urls(self) -> list[Any]:
        opts: Any = self.model._meta  # type: ignore[attr-defined]
        site: Any = self.admin_site  # type: ignore[attr-defined]
        return [
            path(
                "live/",
                site.admin_view(self.changelist_live_view),
                name=f"{opts.app_label}_{opts.model_name}_changelist_live",
            ),
            *super().get_urls(),  # type: ignore[misc]
        ]

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        cl = super().get_changelist_instance(request)  # type: ignore[misc]
        opts: Any = self.model._meta  # type: ignore[attr-defined]
        query = request.GET.copy()
        cl.live_url = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist_live") + (
            f"?{query.urlencode()}" if query else ""
        )
        cl.live_at = clock.now()
        cl.live_interval = self.live_interval_seconds
        return cl

    def changelist_live_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_or_change_permission(request):  # type: ignore[attr-defined]
            raise PermissionDenied
        cl = self.get_changelist_instance(request)
        cl.formset = None
        context = {**result_list(cl), **live_context(), "live_interval": self.live_interval_seconds}
        html = render_to_string("admin/fleetops/result_rows.html", context, request=request)
        return fragment_response(html)


def _container_css(
    name: str, columns: list[str], below_px: int, narrow: list[str], narrow_below_px: int
) -> str:
    """Wide: every column, no Details. Below `below_px`: `columns` move into Details. Below
    `narrow_below_px`: `narrow` move there too (their Details entries show only then)."""

    def cells(names: list[str]) -> str:
        return ", ".join(f"#changelist .column-{c}, #changelist .field-{c}" for c in names)

    def entries(names: list[str]) -> str:
        return ", ".join(f"#changelist .fo-d-{c}" for c in names)

    css = f"{cells([name])} {{ display: none; }}\n"
    css += f"@container fo-changelist (max-width: {below_px}px) {{\n"
    css += f"  {cells(columns)} {{ display: none; }}\n"
    css += f"  {cells([name])} {{ display: table-cell; }}\n"
    if narrow:
        css += f"  {entries(narrow)} {{ display: none; }}\n"
    css += "}\n"
    if narrow:
        css += f"@container fo-changelist (max-width: {narrow_below_px}px) {{\n"
        css += f"  {cells(narrow)} {{ display: none; }}\n"
        css += f"  {entries(narrow)} {{ display: block; }}\n"
        css += "}\n"
    return css


class ColumnPriorityMixin:
    """`secondary_columns` (names in `list_display`) collapse into one "Details" column holding a
    disclosure with their label and value when the changelist is narrower than `collapse_below_px`
    (measured on the changelist itself, so the filter sidebar and the nav are accounted for);
    `narrow_columns` follow them below `narrow_below_px`. The columns left are the ones a row is
    read by; nothing disappears without a place to find it."""

    secondary_columns: tuple[str, ...] = ()
    collapse_below_px: int = 1100
    narrow_columns: tuple[str, ...] = ()
    narrow_below_px: int = 800
    change_list_template: Any = "admin/fleetops/change_list_fitted.html"

    def get_list_display(self, request: HttpRequest) -> Any:
        columns = list(super().get_list_display(request))  # type: ignore[misc]
        if (self.secondary_columns or self.narrow_columns) and "row_details" not in columns:
            columns.append("row_details")
        return columns

    def row_details(self, obj: Any) -> SafeString:
        rows = []
        model_admin: Any = self
        for name in (*self.secondary_columns, *self.narrow_columns):
            try:
                label = label_for_field(name, obj.__class__, model_admin)
                field, attr, value = lookup_field(name, obj, model_admin)
            except (AttributeError, FieldDoesNotExist):
                continue
            # Shown as the changelist's own cell would show it (dates, choices, booleans).
            if field is None or getattr(field, "auto_created", False):
                boolean = getattr(attr, "boolean", False)
                shown = display_for_value(value, "—", boolean)
            elif getattr(field, "remote_field", None) is not None:
                shown = "—" if value is None else str(value)
            else:
                shown = display_for_field(value, field, "—")
            rows.append((name, capfirst(str(label)), "—" if shown in (None, "") else shown))
        return format_html(
            '<details class="fo-row-details" data-live-key="row-{}">'
            "<summary>more</summary><dl>{}</dl></details>",
            obj.pk,
            format_html_join("", '<dt class="fo-d-{0}">{1}</dt><dd class="fo-d-{0}">{2}</dd>', rows),
        )

    row_details.short_description = "Details"  # type: ignore[attr-defined]

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        context = dict(extra_context or {})
        context["fo_column_css"] = _container_css(
            "row_details",
            list(self.secondary_columns),
            self.collapse_below_px,
            list(self.narrow_columns),
            self.narrow_below_px,
        )
        return super().changelist_view(request, context)  # type: ignore[misc]
