"""Sync sources: their connection status (with the degraded reasons and the drawn
`CONNECTION_MACHINE`) and health. Read-only: the writer moves the status; sources are configured by
the deploy and take effect when `indexer_run` restarts."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.utils.safestring import SafeString

from fleetops.access.admin_mixins import StateDiagramMixin
from indexer.admin.common import ChainListFilter, ChainRowsAdminMixin, health_badge, status_badge
from indexer.models import CONNECTION_MACHINE, SyncSource


@admin.register(SyncSource)
class SyncSourceAdmin(StateDiagramMixin, ChainRowsAdminMixin, admin.ModelAdmin):
    list_display = [
        "name",
        "chain",
        "priority",
        "enabled",
        "status",
        "health",
        "consecutive_failures",
        "next_retry_at",
        "head_height",
        "latency_ms",
        "last_success_at",
    ]
    list_filter = ["connection_status", "enabled", ChainListFilter]
    list_select_related = ["chain"]
    ordering = ["chain_id", "priority", "name"]
    state_machines = [CONNECTION_MACHINE]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return [f.name for f in SyncSource._meta.fields] + ["state_diagram"]

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="Connection")
    def status(self, obj: SyncSource) -> SafeString:
        return status_badge(obj)

    @admin.display(description="Health")
    def health(self, obj: SyncSource) -> SafeString:
        return health_badge(obj)


SOURCE_INLINE_FIELDS = (
    "name",
    "priority",
    "enabled",
    "status",
    "health",
    "consecutive_failures",
    "next_retry_at",
    "head_height",
    "latency_ms",
    "last_error",
)


class SyncSourceInline(admin.TabularInline):
    """The chain's sources on its page; the chain admin already checked the user may see it."""

    model = SyncSource
    extra = 0
    can_delete = False
    fields = SOURCE_INLINE_FIELDS
    readonly_fields = SOURCE_INLINE_FIELDS
    ordering = ["priority", "name"]

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="Connection")
    def status(self, obj: SyncSource) -> SafeString:
        return status_badge(obj)

    @admin.display(description="Health")
    def health(self, obj: SyncSource) -> SafeString:
        return health_badge(obj)
