"""The indexer in the operator console.

Chains show their state, sources (status badges with the degraded reasons), enrichment backlog and
a lag chart, with the admin-role actions (retry poison height, pause, resume, roll back to a height
with a confirmation page) and an operator-role re-queue; each calls its service.

Blocks, transactions, events and enrichment rows are read-only lists over tables of millions of
rows: no exact COUNT(*) (BigTableAdminMixin), no column sorting, search and filters only on the
columns the indexes lead with, and a fixed number of queries per page whatever its size.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db.models import OuterRef, QuerySet, Subquery, Value
from django.db.models.functions import Concat
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from fleetops.access.admin_mixins import (
    ObjectAction,
    ObjectActionForm,
    ObjectActionsMixin,
    OrgScopedAdminMixin,
)
from fleetops.access.models import Role
from fleetops.access.permissions import audit_denied
from fleetops.access.selectors import highest_role, org_ids_for_user, org_ids_with_role
from fleetops.admin_site import BigTableAdminMixin
from fleetops.audit.actors import Actor
from fleetops.lib import clock
from fleetops.lib.errors import DomainError
from fleetops.observability.models import Lease
from indexer import selectors, services
from indexer.ingest import lease_name
from indexer.models import (
    ENRICHMENT_REQUEUEABLE,
    Block,
    Chain,
    ConnectionStatus,
    Enrichment,
    Event,
    IndexerState,
    Mode,
    SourceHealth,
    SyncSource,
    Transaction,
)

LAG_CHART_HOURS = 6
HASH_RE = re.compile(r"^[0-9A-Fa-f]{64}$")

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


# --- org scoping for rows that belong to a chain ------------------------------------------------------


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


class ReadOnlyBigTableAdmin(BigTableAdminMixin, ChainRowsAdminMixin, admin.ModelAdmin):
    """Read-only, never counted exactly, never sorted by a column the indexes do not lead with."""

    list_select_related = ["chain"]
    list_filter = [ChainListFilter]
    sortable_by = ()
    search_fields = ["height"]
    # Ordering when one chain is selected (an index on (chain, ...) answers it); else newest id first.
    chain_ordering: tuple[str, ...] = ("-id",)

    def get_ordering(self, request: HttpRequest) -> Any:
        return list(self.chain_ordering) if request.GET.get("chain") else ["-id"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return [f.name for f in self.model._meta.fields]

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def search_by(self, term: str) -> dict[str, Any] | None:
        """The lookup for a search term, on indexed columns only; None matches nothing."""
        return {"height": int(term)} if term.isdigit() else None

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        lookup = self.search_by(term)
        if lookup is None:
            return queryset.none(), False
        # Name the chains so PostgreSQL probes the (chain, ...) index once per chain.
        ids = visible_chain_ids(request)
        if ids is None:
            ids = list(Chain.objects.values_list("id", flat=True))
        return queryset.filter(chain_id__in=ids, **lookup), False


def _by_hash_or_height(term: str) -> dict[str, Any] | None:
    if HASH_RE.match(term):
        return {"hash": term.upper()}
    return {"height": int(term)} if term.isdigit() else None


@admin.register(Block)
class BlockAdmin(ReadOnlyBigTableAdmin):
    list_display = ["height", "chain", "short_hash", "time", "proposer", "tx_count"]
    search_help_text = "A height, or a block hash (64 hex)."
    chain_ordering = ("chain_id", "-height")

    def search_by(self, term: str) -> dict[str, Any] | None:
        return _by_hash_or_height(term)

    @admin.display(description="Hash")
    def short_hash(self, obj: Block) -> str:
        return f"{obj.hash[:16]}…"


@admin.register(Transaction)
class TransactionAdmin(ReadOnlyBigTableAdmin):
    list_display = ["height", "index", "chain", "hash", "code", "gas_wanted", "gas_used"]
    search_help_text = "A height, or a transaction hash (64 hex)."
    chain_ordering = ("chain_id", "-height", "-index")

    def search_by(self, term: str) -> dict[str, Any] | None:
        return _by_hash_or_height(term)


@admin.register(Event)
class EventAdmin(ReadOnlyBigTableAdmin):
    list_display = ["id", "height", "chain", "phase", "tx_index", "event_index", "type", "short_attributes"]
    search_help_text = "A height, or an exact event type (e.g. transfer)."
    # (chain, id) is the event_chain_id index.
    chain_ordering = ("-id",)

    def search_by(self, term: str) -> dict[str, Any] | None:
        return {"height": int(term)} if term.isdigit() else {"type": term[:200]}

    @admin.display(description="Attributes")
    def short_attributes(self, obj: Event) -> str:
        parts = [
            f"{a.get('key')}={a.get('value')}" for a in (obj.attributes or [])[:4] if isinstance(a, dict)
        ]
        return ", ".join(parts)[:120]


# --- enrichment -------------------------------------------------------------------------------------


class RequeueForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 80}),
        max_length=services.TEXT_CAP,
        help_text="Recorded in the audit log with your name.",
    )


def requeue_selected(
    modeladmin: admin.ModelAdmin[Any], request: HttpRequest, queryset: QuerySet[Enrichment]
) -> HttpResponse | None:
    """Ask for a reason, then re-queue the selected failed / undecodable rows with one service call
    (one transaction, one audit row) per chain."""
    form = RequeueForm(request.POST if "apply" in request.POST else None)
    if "apply" in request.POST and form.is_valid():
        _requeue(modeladmin, request, queryset, form.cleaned_data["reason"])
        return None
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": "Re-queue enrichment",
        "objects": queryset[:100],
        "count": queryset[: services.REQUEUE_IDS_CAP + 1].count(),
        "form": form,
        "action_name": "requeue_selected",
        "selected_ids": list(queryset.values_list("pk", flat=True)[: services.REQUEUE_IDS_CAP]),
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "opts": modeladmin.model._meta,
        "required_role": Role.OPERATOR.label,
    }
    return TemplateResponse(request, "admin/fleetops/reason_action.html", context)


def _requeue(
    modeladmin: admin.ModelAdmin[Any], request: HttpRequest, queryset: QuerySet[Enrichment], reason: str
) -> None:
    allowed_orgs = org_ids_with_role(user=request.user, role=Role.OPERATOR)
    chains = Chain.objects.filter(id__in=queryset.values("chain_id")).select_related("org")
    actor = Actor.for_user(request.user)
    total, errors = 0, []
    for chain in chains:
        if allowed_orgs is not None and chain.org_id not in allowed_orgs:
            audit_denied(
                request,
                surface="admin",
                org=chain.org,
                required=Role.OPERATOR,
                have=highest_role(user=request.user),
                what=f"requeue enrichment of {chain.slug}",
            )
            errors.append(f"{chain.slug}: re-queueing needs the operator role; skipped.")
            continue
        ids = list(
            queryset.filter(chain=chain, status__in=ENRICHMENT_REQUEUEABLE).values_list("id", flat=True)[
                : services.REQUEUE_IDS_CAP
            ]
        )
        if not ids:
            continue
        try:
            total += services.enrichment_requeue(chain=chain, ids=ids, actor=actor, reason=reason)
        except DomainError as exc:
            errors.append(f"{chain.slug}: {exc.message}")
    modeladmin.message_user(request, f"Re-queued {total} enrichment rows (failed / undecodable only).")
    for error in errors:
        modeladmin.message_user(request, error, messages.ERROR)


requeue_selected.short_description = "Re-queue selected (failed / undecodable)"  # type: ignore[attr-defined]
requeue_selected.required_role = Role.OPERATOR  # type: ignore[attr-defined]


@admin.register(Enrichment)
class EnrichmentAdmin(ReadOnlyBigTableAdmin):
    list_display = [
        "id",
        "height",
        "chain",
        "phase",
        "event_index",
        "encoding",
        "status",
        "attempts",
        "next_attempt_at",
        "short_error",
        "updated_at",
    ]
    list_filter = ["status", ChainListFilter]
    actions = [requeue_selected]
    search_help_text = "A height."

    @admin.display(description="Last error")
    def short_error(self, obj: Enrichment) -> str:
        return obj.last_error[:100]


# --- sources ----------------------------------------------------------------------------------------


@admin.register(SyncSource)
class SyncSourceAdmin(ChainRowsAdminMixin, admin.ModelAdmin):
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

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return [f.name for f in SyncSource._meta.fields]

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


# --- chains -----------------------------------------------------------------------------------------


class RollbackForm(ObjectActionForm):
    to_height = forms.IntegerField(
        min_value=0,
        help_text="Every block, transaction and event above this height is deleted and re-ingested.",
    )


def _pause(request: HttpRequest, chain: Chain, data: dict[str, Any]) -> str:
    changed = services.indexer_pause(chain=chain, actor=Actor.for_user(request.user), reason=data["reason"])
    return "Paused: the writer stops at its next step." if changed else "Already paused."


def _resume(request: HttpRequest, chain: Chain, data: dict[str, Any]) -> str:
    changed = services.indexer_resume(chain=chain, actor=Actor.for_user(request.user), reason=data["reason"])
    return "Resumed: the writer ingests again at its next step." if changed else "Was not paused."


def _retry_poison(request: HttpRequest, chain: Chain, data: dict[str, Any]) -> str:
    services.indexer_retry_poison(chain=chain, actor=Actor.for_user(request.user), reason=data["reason"])
    return "Poison attempts cleared: the writer tries that height again at its next step."


def _rollback(request: HttpRequest, chain: Chain, data: dict[str, Any]) -> str:
    changed = services.indexer_request_rollback(
        chain=chain, to_height=data["to_height"], actor=Actor.for_user(request.user), reason=data["reason"]
    )
    if not changed:
        return f"A rollback to {data['to_height']} was already requested."
    return f"Rollback to height {data['to_height']} requested: the writer carries it out at its next step."


def _requeue_failed(request: HttpRequest, chain: Chain, data: dict[str, Any]) -> str:
    n = services.enrichment_requeue(
        chain=chain, ids=None, actor=Actor.for_user(request.user), reason=data["reason"]
    )
    return f"Re-queued {n} failed / undecodable enrichment rows."


def _state(chain: Chain) -> IndexerState | None:
    try:
        return chain.state
    except IndexerState.DoesNotExist:
        return None


def _has_poison(chain: Chain) -> bool:
    state = _state(chain)
    return state is not None and state.poison_height is not None


def _is_paused(chain: Chain) -> bool:
    state = _state(chain)
    return state is not None and state.paused


def _has_blocks(chain: Chain) -> bool:
    state = _state(chain)
    return state is not None and state.last_indexed_height is not None


def lag_chart(
    chain: Chain, *, hours: int = LAG_CHART_HOURS, width: int = 640, height: int = 160
) -> dict[str, Any] | None:
    """Lag (head - indexed, in blocks) over the last hours from ChainLagSample, as SVG points."""
    since = clock.now() - timedelta(hours=hours)
    samples = [
        (at, max((head or 0) - (indexed or 0), 0))
        for at, head, indexed in selectors.lag_samples(chain=chain, since=since)
        if head is not None
    ]
    if not samples:
        return None
    span = max((clock.now() - since).total_seconds(), 1.0)
    top = max(lag for _, lag in samples) or 1

    def x(at: Any) -> float:
        return round((at - since).total_seconds() / span * width, 1)

    def y(lag: int) -> float:
        return round(height - lag / (top * 1.1) * height, 1)

    return {
        "width": width,
        "height": height,
        "points": " ".join(f"{x(at)},{y(lag)}" for at, lag in samples),
        "max_lag": top,
        "last_lag": samples[-1][1],
        "hours": hours,
        "count": len(samples),
    }


@admin.register(Chain)
class ChainAdmin(ObjectActionsMixin, OrgScopedAdminMixin, admin.ModelAdmin):
    change_form_template = "admin/indexer/chain/change_form.html"
    list_display = ["slug", "chain_id", "org", "mode", "head", "indexed", "lag", "leader"]
    list_select_related = ["org", "state"]
    # Only the organizations of the chains listed: a plain "org" filter would name every tenant.
    list_filter = [("org", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["=slug", "=chain_id"]
    inlines = [SyncSourceInline]
    object_actions = (
        ObjectAction(
            "retry_poison", "Retry poison height", Role.ADMIN, _retry_poison, is_available=_has_poison
        ),
        ObjectAction("pause", "Pause ingest", Role.ADMIN, _pause, is_available=lambda c: not _is_paused(c)),
        ObjectAction("resume", "Resume ingest", Role.ADMIN, _resume, is_available=_is_paused),
        ObjectAction(
            "rollback",
            "Roll back to height",
            Role.ADMIN,
            _rollback,
            form_class=RollbackForm,
            is_available=_has_blocks,
            danger=True,
        ),
        ObjectAction("requeue_failed", "Re-queue failed enrichment", Role.OPERATOR, _requeue_failed),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Chain]:
        # The live leader in the same query as the chains: the lease row is named after the slug
        # exactly as `indexer.ingest.lease_name` names it (a test pins the two together).
        live = Lease.objects.filter(
            name=Concat(Value(lease_name(Chain(slug=""))), OuterRef("slug")), expires_at__gt=clock.now()
        )
        return super().get_queryset(request).annotate(leader_holder=Subquery(live.values("holder")[:1]))

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return [f.name for f in Chain._meta.fields]

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return False  # chains are created by indexer_demo_seed / the deploy, with their sources

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # every change goes through a service (the object actions)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="Mode")
    def mode(self, obj: Chain) -> SafeString:
        state = _state(obj)
        return mode_badge(state.mode if state else None, paused=bool(state and state.paused))

    @admin.display(description="Head")
    def head(self, obj: Chain) -> int | None:
        state = _state(obj)
        return state.head_height if state else None

    @admin.display(description="Indexed")
    def indexed(self, obj: Chain) -> int | None:
        state = _state(obj)
        return state.last_indexed_height if state else None

    @admin.display(description="Lag (blocks)")
    def lag(self, obj: Chain) -> int | None:
        return selectors.lag_of(_state(obj))

    @admin.display(description="Leader")
    def leader(self, obj: Chain) -> str:
        return getattr(obj, "leader_holder", None) or "none"

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        chain = self.get_object(request, object_id)
        context = dict(extra_context or {})
        if chain is not None:
            status = selectors.chain_status(chain=chain)
            context.update(
                status=status,
                mode_badge=mode_badge(status.mode if _state(chain) else None, paused=status.paused),
                chart=lag_chart(chain),
                chart_hours=LAG_CHART_HOURS,
            )
        return super().change_view(request, object_id, form_url, context)

    def object_action_view(self, request: HttpRequest, object_id: str, action_name: str) -> HttpResponse:
        """Roll back asks twice: the form (height and reason), then a page that names what is deleted."""
        if action_name == "rollback" and request.method == "POST" and "confirm" not in request.POST:
            chain = self.get_object(request, object_id)
            action = next(a for a in self.object_actions if a.name == "rollback")
            if chain is None:
                raise Http404("No such chain.")
            if action not in self.allowed_object_actions(request, chain):
                audit_denied(
                    request,
                    surface="admin",
                    org=chain.org,
                    required=action.required_role,
                    have=highest_role(user=request.user),
                    what=f"{action.name} on {chain}",
                )
                raise PermissionDenied(f"{action.label} needs the {action.required_role.label} role.")
            form = RollbackForm(request.POST)
            if form.is_valid():
                state = _state(chain)
                try:
                    if state is None:
                        raise DomainError(services.NOTHING_INDEXED.format(chain=chain.slug))
                    to_height = services.rollback_validate(
                        chain=chain, state=state, to_height=form.cleaned_data["to_height"]
                    )
                except DomainError as exc:
                    form.add_error(None, exc.message)
                else:
                    assert state is not None
                    assert state.last_indexed_height is not None
                    context = {
                        **self.admin_site.each_context(request),
                        "title": f"Roll back {chain} to height {to_height}?",
                        "object": chain,
                        "action": action,
                        "form": form,
                        "opts": self.model._meta,
                        "to_height": to_height,
                        "last_indexed_height": state.last_indexed_height,
                        "depth": state.last_indexed_height - to_height,
                    }
                    return TemplateResponse(request, "admin/indexer/chain/rollback_confirm.html", context)
            context = {
                **self.admin_site.each_context(request),
                "title": f"{action.label}: {chain}",
                "object": chain,
                "action": action,
                "form": form,
                "opts": self.model._meta,
            }
            return TemplateResponse(request, "admin/fleetops/object_action.html", context)
        return super().object_action_view(request, object_id, action_name)
