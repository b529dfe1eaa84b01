from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from fleetops.access.admin_mixins import OrgScopedAdminMixin
from fleetops.admin_site import BigTableAdminMixin
from fleetops.audit.models import AuditEvent
from fleetops.audit.selectors import audit_event_visible_to


@admin.register(AuditEvent)
class AuditEventAdmin(BigTableAdminMixin, OrgScopedAdminMixin, admin.ModelAdmin):
    """Read-only: the audit log is append-only in the database too."""

    list_display = [
        "id",
        "at",
        "org",
        "action",
        "actor_type",
        "actor_label",
        "target_type",
        "target_label",
        "reason",
    ]
    list_filter = ["action", "actor_type", "target_type", "org"]
    list_select_related = ["org"]
    search_fields = ["=target_id", "=request_id", "actor_label", "target_label"]
    date_hierarchy = None
    ordering = ["-id"]
    readonly_fields = [f.name for f in AuditEvent._meta.fields]

    def get_queryset(self, request: HttpRequest) -> QuerySet[AuditEvent]:
        return audit_event_visible_to(user=request.user)

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
