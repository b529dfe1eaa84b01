"""What the indexer's admin pages share: status badges and scoping rows by the user's chains."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from fleetops.access.admin_mixins import OrgScopedAdminMixin
from fleetops.access.selectors import org_ids_for_user
from indexer import selectors
from indexer.models import Chain, ConnectionStatus, Mode, SourceHealth, SyncSource

_TONES = {
    "ok": "#2e7d32",
    "info": "#1565c0",
    "warn": "#e65100",
    "fail": "#c62828",
    "muted": "#757575",
}
MODE_TONES: dict[str, str] = {
    Mode.NORMAL: "ok",
    Mode.CATCHING_UP: "info",
    Mode.IDLE: "muted",
    Mode.DEGRADED: "warn",
    Mode.HALTED: "fail",
}
STATUS_TONES = {
    ConnectionStatus.DISCONNECTED: "fail",
    ConnectionStatus.CONNECTING: "info",
    ConnectionStatus.SYNCING: "info",
    ConnectionStatus.CONNECTED: "ok",
    ConnectionStatus.CONNECTED_DEGRADED: "warn",
    ConnectionStatus.DISCONNECTING: "muted",
    ConnectionStatus.REFUSED: "fail",
}
HEALTH_TONES = {
    SourceHealth.HEALTHY: "ok",
    SourceHealth.DISCONNECTED: "muted",
    SourceHealth.DEGRADED: "warn",
    SourceHealth.DEAD: "fail",
    SourceHealth.RATE_LIMITED: "warn",
}


def badge(text: str, tone: str) -> SafeString:
    return format_html(
        '<span class="fo-badge fo-badge-{}" style="display:inline-block;padding:1px 8px;border-radius:10px;'
        'color:#fff;background:{};font-weight:600;white-space:nowrap">{}</span>',
        tone,
        _TONES.get(tone, _TONES["muted"]),
        text,
    )


def mode_badge(mode: str | None, *, paused: bool = False) -> SafeString:
    if mode is None:
        return badge("never ran", "muted")
    label = badge(mode, MODE_TONES.get(mode, "muted"))
    return format_html("{} {}", label, badge("paused", "warn")) if paused else label


def status_badge(source: SyncSource) -> SafeString:
    """`connected (degraded)` with its reasons, e.g. "historic range failed (partial data)"."""
    status = ConnectionStatus(source.connection_status)
    text = badge(str(status.label), STATUS_TONES.get(status, "muted"))
    if status == ConnectionStatus.REFUSED and source.refused_reason:
        return format_html('{}<br><small class="fo-reasons">{}</small>', text, source.refused_reason[:200])
    reasons = selectors.source_status(source).degraded_reasons if source.degraded_reasons else []
    if not reasons:
        return text
    return format_html(
        '{}<br><small class="fo-reasons">{}</small>',
        text,
        format_html_join("; ", "{}", ((r["label"],) for r in reasons)),
    )


def health_badge(source: SyncSource) -> SafeString:
    health = source.health
    return badge(str(health.label), HEALTH_TONES.get(health, "muted"))


def visible_chain_ids(request: HttpRequest) -> list[int] | None:
    """Ids of the chains of the user's organizations; None for superusers (every chain)."""
    if request.user.is_superuser:
        return None
    cached = getattr(request, "_indexer_chain_ids", None)
    if cached is None:
        cached = list(
            Chain.objects.filter(org_id__in=org_ids_for_user(request.user)).values_list("id", flat=True)
        )
        request._indexer_chain_ids = cached  # type: ignore[attr-defined]
    return list(cached)


class ChainListFilter(admin.SimpleListFilter):
    title = "chain"
    parameter_name = "chain"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        chains = Chain.objects.order_by("slug")
        ids = visible_chain_ids(request)
        if ids is not None:
            chains = chains.filter(id__in=ids)
        return [(str(pk), slug) for pk, slug in chains.values_list("id", "slug")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if not value:
            return queryset
        if not value.isdigit():
            return queryset.none()
        return queryset.filter(chain_id=int(value))


class ChainRowsAdminMixin(OrgScopedAdminMixin):
    """Rows of a chain: scoped by `chain_id IN (the user's chains)` (an index prefix, never a join)."""

    org_field = "chain__org"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        model: Any = getattr(self, "model")  # noqa: B009 - set by ModelAdmin
        qs = model._default_manager.get_queryset()
        ids = visible_chain_ids(request)
        return qs if ids is None else qs.filter(chain_id__in=ids)
