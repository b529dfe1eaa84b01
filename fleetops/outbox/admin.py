"""Outbox messages in the console: read-only, for staff (what a request queued, whether the broker
took it, the last error while it did not)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from fleetops.admin_site import BigTableAdminMixin
from fleetops.outbox.models import OutboxMessage

# The task filter offers the task names among this many newest messages (never a DISTINCT over
# the whole table, which grows by every kick ever sent).
TASK_CHOICES_WINDOW = 2_000


class RecentTaskFilter(admin.SimpleListFilter):
    title = "task"
    parameter_name = "task__exact"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        newest = OutboxMessage.objects.order_by("-id").values_list("task", flat=True)[:TASK_CHOICES_WINDOW]
        return [(name, name) for name in sorted(set(newest))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(task=self.value()) if self.value() else queryset


@admin.register(OutboxMessage)
class OutboxMessageAdmin(BigTableAdminMixin, admin.ModelAdmin):
    list_display = ["id", "task", "status", "attempts", "created_at", "available_at", "sent_at", "request_id"]
    list_filter = ["status", RecentTaskFilter]
    search_fields = ["=request_id"]
    search_help_text = "The request id of the audit row that queued the message (exact)."
    readonly_fields = [f.name for f in OutboxMessage._meta.fields]

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        """The exact request id, on its index (the admin's `=` lookup compares UPPER(request_id) and
        reads every message)."""
        term = search_term.strip()
        return (queryset.filter(request_id=term) if term else queryset), False

    def has_module_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.is_active and request.user.is_staff)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_active and request.user.is_staff)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
