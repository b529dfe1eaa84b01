"""Sync sources: their connection status (with the degraded reasons, the refusal reason and the
drawn `CONNECTION_MACHINE`) and health. The writer moves the status; operators (operator role)
change a source's priority or enable/disable it, and re-enable a refused one, each through its
audited service. A running `indexer_run` follows within one step, without a restart."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.http import HttpRequest
from django.utils.safestring import SafeString

from fleetops.access.admin_mixins import ObjectAction, ObjectActionForm, ObjectActionsMixin, StateDiagramMixin
from fleetops.access.models import Role
from fleetops.audit.actors import Actor
from indexer import services
from indexer.admin.common import ChainListFilter, ChainRowsAdminMixin, health_badge, status_badge
from indexer.models import CONNECTION_MACHINE, ConnectionStatus, DegradedReason, SyncSource
from indexer.source_status import source_clear_degraded, source_reenable


class SourceSettingsForm(ObjectActionForm):
    priority = forms.IntegerField(
        min_value=services.SOURCE_PRIORITY_BOUNDS[0],
        max_value=services.SOURCE_PRIORITY_BOUNDS[1],
        required=False,
        help_text="Lower is preferred. Empty: unchanged.",
    )
    enabled = forms.TypedChoiceField(
        choices=[("", "unchanged"), ("true", "enabled"), ("false", "disabled")],
        coerce=lambda v: v == "true",
        empty_value=None,
        required=False,
        help_text="A disabled source is no longer asked (disconnecting, then disconnected).",
    )


def _settings(request: HttpRequest, source: SyncSource, data: dict[str, Any]) -> str:
    changes = services.source_update_settings(
        source=source,
        actor=Actor.for_user(request.user),
        reason=data["reason"],
        priority=data.get("priority"),
        enabled=data.get("enabled"),
    )
    if not changes:
        return "Nothing changed."
    return (
        "Changed " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()) + " (from the next step)."
    )


def _reenable(request: HttpRequest, source: SyncSource, data: dict[str, Any]) -> str:
    source_reenable(source=source, actor=Actor.for_user(request.user), reason=data["reason"])
    return "Re-enabled: the writer tries the source again after its next step."


def _clear(request: HttpRequest, source: SyncSource, data: dict[str, Any]) -> str:
    source_clear_degraded(source=source, actor=Actor.for_user(request.user), reason=data["reason"])
    return "Historic range failure cleared."


@admin.register(SyncSource)
class SyncSourceAdmin(StateDiagramMixin, ObjectActionsMixin, ChainRowsAdminMixin, admin.ModelAdmin):
    change_form_template = "admin/fleetops/change_form_actions.html"
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
    object_actions = (
        ObjectAction("settings", "Change priority / enabled", Role.OPERATOR, _settings, SourceSettingsForm),
        ObjectAction(
            "reenable",
            "Re-enable (refused)",
            Role.OPERATOR,
            _reenable,
            is_available=lambda s: s.connection_status == ConnectionStatus.REFUSED,
        ),
        ObjectAction(
            "clear_degraded",
            "Clear historic range failure",
            Role.OPERATOR,
            _clear,
            is_available=lambda s: DegradedReason.HISTORIC_RANGE_FAILED in (s.degraded_reasons or []),
        ),
    )

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
