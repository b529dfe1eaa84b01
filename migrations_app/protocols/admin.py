"""Protocol migrations in the operator console.

Protocols show their statuses (with the three state machines drawn from their declarations, the
current state highlighted), cursors, lag to the indexed height, handoff time and who wrote which
heights (the write spans), with admin-role actions that call the services: classify again, start the
history migration, start the current-state migration (both run on a worker as Celery tasks). State
changes, balances and owners are read-only lists over big tables (no exact COUNT(*), no sorting off
the indexes); cursors are read-only.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import CharField, F, OuterRef, QuerySet, Subquery, Value
from django.db.models.functions import Concat
from django.http import HttpRequest, HttpResponse
from django.utils.html import format_html
from django.utils.safestring import SafeString

from fleetops.access.admin_mixins import (
    ObjectAction,
    ObjectActionForm,
    ObjectActionsMixin,
    OrgScopedAdminMixin,
    StateDiagramMixin,
)
from fleetops.access.models import Role
from fleetops.access.selectors import org_ids_for_user
from fleetops.admin_live import LiveObjectMixin
from fleetops.admin_site import BigTableAdminMixin
from fleetops.audit.actors import Actor
from migrations_app.models import (
    CLASSIFICATION_MACHINE,
    CURRENT_STATE_MACHINE,
    HISTORY_MACHINE,
    Cursor,
    MigrationStatus,
    Protocol,
    ProtocolBalance,
    ProtocolNftOwner,
    ProtocolStateChange,
)
from migrations_app.protocols import selectors, services
from migrations_app.protocols.history import DEFAULT_WINDOW_SIZE, MAX_WINDOW_SIZE

_TONES: dict[str, str] = {
    MigrationStatus.SUCCESS: "#2e7d32",
    MigrationStatus.IN_PROGRESS: "#1565c0",
    MigrationStatus.FAILED: "#c62828",
    MigrationStatus.NOT_STARTED: "#757575",
}


def status_badge(value: str) -> SafeString:
    return format_html(
        '<span style="color:#fff;background:{};padding:1px 6px;border-radius:3px">{}</span>',
        _TONES.get(value, "#757575"),
        value,
    )


class HistoryForm(ObjectActionForm):
    window_size = forms.IntegerField(
        min_value=1, max_value=MAX_WINDOW_SIZE, initial=DEFAULT_WINDOW_SIZE, help_text="Heights per commit."
    )


class CurrentStateForm(HistoryForm):
    start_height = forms.IntegerField(
        min_value=1, help_text="Balances / owners are built from this height on."
    )


def _classify(request: HttpRequest, protocol: Protocol, data: dict[str, Any]) -> str:
    services.protocol_classify_request(
        protocol=protocol, actor=Actor.for_user(request.user), reason=data["reason"]
    )
    return "Classification queued: a worker runs it; the status shows the outcome."


def _start_history(request: HttpRequest, protocol: Protocol, data: dict[str, Any]) -> str:
    queued = services.protocol_history_request(
        protocol=protocol,
        actor=Actor.for_user(request.user),
        reason=data["reason"],
        window_size=data["window_size"],
    )
    if not queued:
        return "Nothing to do: the history migration already succeeded."
    return "History migration queued: a worker runs it to the tip and hands off to live ingestion."


def _start_current_state(request: HttpRequest, protocol: Protocol, data: dict[str, Any]) -> str:
    queued = services.protocol_current_state_request(
        protocol=protocol,
        actor=Actor.for_user(request.user),
        reason=data["reason"],
        start_height=data["start_height"],
        window_size=data["window_size"],
    )
    return "Current-state migration queued." if queued else "Nothing to do: it already succeeded."


def _history_startable(p: Protocol) -> bool:
    return p.classification_status == MigrationStatus.SUCCESS and HISTORY_MACHINE.can(
        p.history_migration_status, MigrationStatus.IN_PROGRESS
    )


def _current_state_startable(p: Protocol) -> bool:
    return p.classification_status == MigrationStatus.SUCCESS and CURRENT_STATE_MACHINE.can(
        p.current_state_migration_status, MigrationStatus.IN_PROGRESS
    )


@admin.register(Protocol)
class ProtocolAdmin(
    LiveObjectMixin, StateDiagramMixin, ObjectActionsMixin, OrgScopedAdminMixin, admin.ModelAdmin
):
    change_form_template = "admin/migrations_app/protocol/change_form.html"
    # Migration status and write spans: refreshed in place (console.js) from one partial.
    live_template = "admin/migrations_app/protocol/live.html"
    live_name = "protocol"
    live_interval_seconds = 5
    org_field = "chain__org"
    state_machines = [CLASSIFICATION_MACHINE, HISTORY_MACHINE, CURRENT_STATE_MACHINE]
    list_display = [
        "protocol_id",
        "chain",
        "classification",
        "history",
        "stuck",
        "history_cursor",
        "lag",
        "handoff",
        "current_state",
    ]
    list_select_related = ["chain"]
    ordering = ["protocol_id", "chain__slug"]
    object_actions = (
        ObjectAction(
            "start_history",
            "Start history migration",
            Role.ADMIN,
            _start_history,
            form_class=HistoryForm,
            is_available=_history_startable,
        ),
        ObjectAction(
            "start_current_state",
            "Start current-state migration",
            Role.ADMIN,
            _start_current_state,
            form_class=CurrentStateForm,
            is_available=_current_state_startable,
        ),
        ObjectAction("classify", "Classify again", Role.ADMIN, _classify),
    )

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return [*(f.name for f in Protocol._meta.fields), "state_diagram"]

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return False  # protocol_setup registers protocols from the classifier registry

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # every change goes through a service (the object actions)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Protocol]:
        # Cursor and indexed height in the same query as the protocols: the cursor row is named after
        # chain and protocol exactly as `Protocol.history_cursor_name` names it (a test pins the two).
        cursor = Cursor.objects.filter(
            name=Concat(
                Value("protocol_"),
                OuterRef("chain__slug"),
                Value("_"),
                OuterRef("protocol_id"),
                Value("_history_cursor"),
                output_field=CharField(),
            )
        )
        return (
            super()
            .get_queryset(request)
            .annotate(
                cursor_height=Subquery(cursor.values("height")[:1]),
                cursor_moved_at=Subquery(cursor.values("updated_at")[:1]),
                indexed_height=F("chain__state__last_indexed_height"),
            )
        )

    @admin.display(description="Stuck")
    def stuck(self, obj: Protocol) -> str:
        why = selectors.history_stuck(obj, cursor_moved_at=getattr(obj, "cursor_moved_at", None))
        return format_html('<span class="fo-stuck" title="{}">stuck</span>', why) if why else ""

    @admin.display(description="Classification")
    def classification(self, obj: Protocol) -> SafeString:
        return status_badge(obj.classification_status)

    @admin.display(description="History")
    def history(self, obj: Protocol) -> SafeString:
        return status_badge(obj.history_migration_status)

    @admin.display(description="Current state")
    def current_state(self, obj: Protocol) -> SafeString:
        return status_badge(obj.current_state_migration_status)

    @admin.display(description="History cursor")
    def history_cursor(self, obj: Protocol) -> int | None:
        return getattr(obj, "cursor_height", None)

    @admin.display(description="Lag (blocks)")
    def lag(self, obj: Protocol) -> int | None:
        cursor, top = getattr(obj, "cursor_height", None), getattr(obj, "indexed_height", None)
        return None if cursor is None or top is None else max(0, top - cursor)

    @admin.display(description="Handed off")
    def handoff(self, obj: Protocol) -> str:
        if obj.history_handed_off_at is None:
            return "—"
        return f"at {obj.history_handoff_height}, {obj.history_handed_off_at:%Y-%m-%d %H:%M:%S}"

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        protocol = self.get_object(request, object_id)
        context = dict(extra_context or {})
        if protocol is not None:
            context.update(self.full_live_context(request, protocol))
        return super().change_view(request, object_id, form_url, context)

    def live_context(self, request: HttpRequest, obj: Any) -> dict[str, Any]:
        return {
            "status": selectors.protocol_status(protocol=obj),
            "spans": selectors.write_spans(protocol=obj),
            "stuck": selectors.history_stuck(obj, cursor_moved_at=getattr(obj, "cursor_moved_at", None)),
        }


class ProtocolRowsAdminMixin(OrgScopedAdminMixin):
    """Rows of a protocol: scoped by `protocol_id IN (the user's protocols)` (an index prefix)."""

    org_field = "protocol__chain__org"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        model: Any = getattr(self, "model")  # noqa: B009 - set by ModelAdmin
        qs = model._default_manager.get_queryset()
        if request.user.is_superuser:
            return qs
        ids = list(
            Protocol.objects.filter(chain__org_id__in=org_ids_for_user(request.user)).values_list(
                "id", flat=True
            )
        )
        return qs.filter(protocol_id__in=ids)


class ProtocolListFilter(admin.SimpleListFilter):
    """The protocols of the user's organizations only (a plain `"protocol"` filter would offer every
    organization's; `RelatedOnlyFieldListFilter` would run a DISTINCT over the big table)."""

    title = "protocol"
    parameter_name = "protocol__id__exact"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        protocols = Protocol.objects.order_by("protocol_id", "chain__slug")
        if not request.user.is_superuser:
            protocols = protocols.filter(chain__org_id__in=org_ids_for_user(request.user))
        rows = protocols.values_list("id", "protocol_id", "chain__slug")
        return [(str(pk), f"{pid} ({slug})") for pk, pid, slug in rows]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(protocol_id=value) if value else queryset


class ReadOnlyRowsAdmin(BigTableAdminMixin, ProtocolRowsAdminMixin, admin.ModelAdmin):
    sortable_by = ()
    list_filter = [ProtocolListFilter]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return [f.name for f in self.model._meta.fields]

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ProtocolStateChange)
class ProtocolStateChangeAdmin(ReadOnlyRowsAdmin):
    list_display = [
        "protocol",
        "height",
        "tx_index",
        "event_index",
        "kind",
        "account",
        "counterparty",
        "asset",
        "amount",
        "token_id",
    ]
    search_fields = ["=account"]

    def get_ordering(self, request: HttpRequest) -> Any:
        return ["-height", "-id"] if request.GET.get("protocol__id__exact") else ["-id"]

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        if term.isdigit():
            return queryset.filter(height=int(term)), False
        return queryset.filter(account=term), False


@admin.register(ProtocolBalance)
class ProtocolBalanceAdmin(ReadOnlyRowsAdmin):
    list_display = ["protocol", "asset", "account", "amount", "height"]
    search_fields = ["=account"]


@admin.register(ProtocolNftOwner)
class ProtocolNftOwnerAdmin(ReadOnlyRowsAdmin):
    list_display = ["protocol", "asset", "token_id", "owner", "height"]
    search_fields = ["=owner"]


@admin.register(Cursor)
class CursorAdmin(admin.ModelAdmin):
    """Read-only: cursors move by compare-and-swap in the writers, and back only in a rollback."""

    list_display = ["name", "height", "updated_at"]

    def has_module_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.is_staff)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_superuser)

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
