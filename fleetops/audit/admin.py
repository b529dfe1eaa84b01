from __future__ import annotations

import re
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.auth import get_user_model
from django.core.paginator import Paginator
from django.db.models import F, QuerySet, Value
from django.http import HttpRequest
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from fleetops.access.admin_mixins import OrgScopedAdminMixin
from fleetops.access.selectors import org_ids_for_user
from fleetops.admin_live import ColumnPriorityMixin
from fleetops.admin_site import BigTableAdminMixin
from fleetops.audit.models import ActorType, AuditEvent
from fleetops.audit.selectors import (
    audit_by_actor,
    audit_event_visible_to,
    audit_in_range,
    audit_recent_values,
    audit_search,
    search_words,
)
from fleetops.lib import clock

User = get_user_model()


SEARCH_HELP = (
    "Searches action, reason, actor and target (type, id and name) and request id. Every word must "
    "match, each as the start of a word: “roll” finds rollback and rolled back, “reorg” finds reorgs."
)
AT_FORMAT = "%Y-%m-%d %H:%M:%S"
SEARCH_COUNT_CAP = 5_000
RANGE_PRESETS = (
    ("15m", "Last 15 minutes"),
    ("1h", "Last hour"),
    ("24h", "Last 24 hours"),
    ("7d", "Last 7 days"),
)
_RELATIVE = re.compile(r"^(\d{1,4})([mhd])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}
BAD_TIME = "Not a time: {value!r} (use 2026-05-01 13:00:05, 2026-05-01, or 15m / 1h / 24h / 7d)."


def parse_time_bound(value: str) -> datetime:
    """A range bound from the URL: a relative span back from now (`1h`), or a date or date-time in
    the server's time zone."""
    value = value.strip()
    if match := _RELATIVE.match(value):
        return clock.now() - timedelta(**{_UNITS[match[2]]: int(match[1])})
    try:
        parsed = parse_datetime(value.replace(" ", "T"))
        if parsed is None and (day := parse_date(value)) is not None:
            parsed = datetime(day.year, day.month, day.day)  # noqa: DTZ001 - made aware below
    except ValueError:
        parsed = None
    if parsed is None:
        raise IncorrectLookupParameters(BAD_TIME.format(value=value))
    return timezone.make_aware(parsed) if timezone.is_naive(parsed) else parsed


class TimeRangeFilter(admin.ListFilter):
    """`since` and `until` (`at >= since`, `at < until`), with presets and a small form."""

    title = "time range"
    template = "admin/audit/time_range_filter.html"
    parameters = ("since", "until")

    def __init__(self, request: HttpRequest, params: dict[str, Any], model: Any, model_admin: Any) -> None:
        super().__init__(request, params, model, model_admin)
        for name in self.parameters:
            if name in params:
                value = params.pop(name)
                self.used_parameters[name] = value[-1] if isinstance(value, list) else value

    def has_output(self) -> bool:
        return True

    def expected_parameters(self) -> list[str | None]:
        return list(self.parameters)

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        bounds = {k: parse_time_bound(str(v)) for k, v in self.used_parameters.items() if v}
        return audit_in_range(queryset, since=bounds.get("since"), until=bounds.get("until"))

    def choices(self, changelist: Any) -> Any:
        # Read by the template after the choices: the form keeps the changelist's other parameters.
        self.form = {
            "keep": {k: v for k, v in changelist.params.items() if k not in self.parameters},
            "since": self.used_parameters.get("since", ""),
            "until": self.used_parameters.get("until", ""),
        }
        current = self.used_parameters.get("since", "")
        yield {
            "selected": not self.used_parameters,
            "query_string": changelist.get_query_string(remove=list(self.parameters)),
            "display": "Any time",
        }
        for value, label in RANGE_PRESETS:
            yield {
                "selected": current == value and not self.used_parameters.get("until"),
                "query_string": changelist.get_query_string({"since": value}, remove=["until"]),
                "display": label,
            }


def _recent(request: HttpRequest, model_admin: Any) -> dict[str, list[Any]]:
    """The newest rows' values, read once per request for every filter that offers them."""
    cached: dict[str, list[Any]] | None = getattr(request, "_fleetops_audit_recent", None)
    if cached is None:
        cached = audit_recent_values(model_admin.get_queryset(request))
        setattr(request, "_fleetops_audit_recent", cached)  # noqa: B010 - a per-request memo
    return cached


class CappedCountPaginator(Paginator):
    """A search or a time range counts at most SEARCH_COUNT_CAP + 1 matches: counting every match of
    a common word among millions of rows is what would make the page slow, not finding 50.

    A search with few matches then reads its page through the search index, not by walking the ids
    back: the planner cannot tell a rare word from a common one, and a walk that finds nothing
    computes the search document of every row (tens of seconds at millions of rows). The count is
    that index lookup; `id + 0` keeps the id order but not the id index."""

    searching = False

    @cached_property
    def count(self) -> int:
        # Unordered: an ordered LIMIT would walk the ids back (see above), this one is index lookups.
        matches: Any = self.object_list
        return int(matches.order_by()[: SEARCH_COUNT_CAP + 1].count())

    def page(self, number: Any) -> Any:
        if self.searching and self.count <= SEARCH_COUNT_CAP:
            matches: Any = self.object_list
            self.object_list = matches.order_by((F("id") + Value(0)).desc())
        return super().page(number)


class ActorFilter(admin.SimpleListFilter):
    """One actor: a member of the user's organizations (with what their API tokens did), or a
    scheduler/system process seen among the newest rows."""

    title = "actor"
    parameter_name = "actor"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        members = User.objects.filter(is_active=True).order_by("username")
        if not request.user.is_superuser:
            members = members.filter(memberships__org_id__in=org_ids_for_user(request.user)).distinct()
        people = [
            (f"{ActorType.USER}:{pk}", name) for pk, name in members.values_list("pk", "username")[:100]
        ]
        processes = _recent(request, model_admin)["process"]
        return [*people, *((f"process:{name}", name) for name in processes[:50])]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if not value or ":" not in value:
            return queryset
        kind, _, ident = value.partition(":")
        if kind == "process":
            return queryset.filter(actor_type__in=(ActorType.SCHEDULER, ActorType.SYSTEM), actor_id=ident)
        return audit_by_actor(queryset, actor_type=kind, actor_id=ident)


def _recent_values_filter(field: str, label: str) -> type[admin.SimpleListFilter]:
    class RecentValuesFilter(admin.SimpleListFilter):
        """Choices from the newest rows only (never a DISTINCT over the whole table)."""

        title = label
        parameter_name = f"{field}__exact"

        def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
            return [(v, v) for v in _recent(request, model_admin)[field]]

        def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
            return queryset.filter(**{field: self.value()}) if self.value() else queryset

    return RecentValuesFilter


@admin.register(AuditEvent)
class AuditEventAdmin(ColumnPriorityMixin, BigTableAdminMixin, OrgScopedAdminMixin, admin.ModelAdmin):
    """Read-only: the audit log is append-only in the database too."""

    # On a narrow changelist these move into the row's "Details" disclosure (the actor too on a
    # very narrow one); time, action, target and reason stay columns.
    secondary_columns = ("org", "actor_type", "target_type")
    collapse_below_px = 1150
    narrow_columns = ("actor_label",)
    narrow_below_px = 820

    list_display = [
        "id",
        "at_seconds",
        "org",
        "action",
        "actor_type",
        "actor_label",
        "target_type",
        "target_label",
        "reason",
    ]
    list_filter = [
        TimeRangeFilter,
        ActorFilter,
        _recent_values_filter("action", "action"),
        "actor_type",
        _recent_values_filter("target_type", "target type"),
        "org",
    ]
    list_select_related = ["org"]
    # Full-text over the indexed document (`audit_search`), not Django's per-field ILIKE.
    search_fields = ["action"]
    search_help_text = SEARCH_HELP
    date_hierarchy = None
    ordering = ["-id"]
    readonly_fields = [*(f.name for f in AuditEvent._meta.fields), "at_seconds"]

    @admin.display(description="At", ordering="at")
    def at_seconds(self, obj: AuditEvent) -> str:
        return timezone.localtime(obj.at).strftime(AT_FORMAT)

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return ["at_seconds" if name == "at" else name for name in (f.name for f in AuditEvent._meta.fields)]

    def get_paginator(
        self, request: HttpRequest, queryset: Any, per_page: int, *args: Any, **kwargs: Any
    ) -> Any:
        if request.GET.get("q") or request.GET.get("since") or request.GET.get("until"):
            paginator = CappedCountPaginator(queryset, per_page, *args, **kwargs)
            paginator.searching = bool(search_words(request.GET.get("q", "")))
            return paginator
        return super().get_paginator(request, queryset, per_page, *args, **kwargs)

    def get_ordering(self, request: HttpRequest) -> Any:
        # In a time range the newest rows come from the `at` index, not a walk back along the ids
        # to rows days old (ids follow time, but the planner does not know that).
        if request.GET.get("since") or request.GET.get("until"):
            return ["-at", "-id"]
        return super().get_ordering(request)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[AuditEvent], search_term: str
    ) -> tuple[QuerySet[AuditEvent], bool]:
        return audit_search(queryset, text=search_term), False

    def get_queryset(self, request: HttpRequest) -> QuerySet[AuditEvent]:
        return audit_event_visible_to(user=request.user)

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
