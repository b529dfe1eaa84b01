from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from fleetops.observability.models import Heartbeat, Lease


class _ReadOnlyStaff(admin.ModelAdmin):
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


@admin.register(Heartbeat)
class HeartbeatAdmin(_ReadOnlyStaff):
    list_display = ["name", "last_beat_at", "last_success_at", "last_duration_seconds", "beats", "failures"]
    search_fields = ["name"]


@admin.register(Lease)
class LeaseAdmin(_ReadOnlyStaff):
    list_display = ["name", "holder", "token", "acquired_at", "renewed_at", "expires_at"]
