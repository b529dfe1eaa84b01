"""Blocks, transactions, events and enrichment rows: read-only lists over tables of millions of
rows. No exact COUNT(*) (BigTableAdminMixin), no column sorting, search and filters only on the
columns the indexes lead with, and a fixed number of queries per page whatever its size. The one
write is the operator's re-queue of failed / undecodable enrichment rows (`enrichment_requeue`)."""

from __future__ import annotations

import re
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from fleetops.access.admin_mixins import ReasonField, StateDiagramMixin
from fleetops.access.models import Role
from fleetops.access.permissions import audit_denied
from fleetops.access.selectors import highest_role, org_ids_with_role
from fleetops.admin_live import ColumnPriorityMixin
from fleetops.admin_site import BigTableAdminMixin
from fleetops.audit.actors import Actor
from fleetops.lib.errors import DomainError
from indexer import services
from indexer.admin.common import ChainListFilter, ChainRowsAdminMixin, visible_chain_ids
from indexer.models import (
    ENRICHMENT_MACHINE,
    ENRICHMENT_REQUEUEABLE,
    Block,
    Chain,
    Enrichment,
    Event,
    Transaction,
)

HASH_RE = re.compile(r"^[0-9A-Fa-f]{64}$")


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
class EventAdmin(ColumnPriorityMixin, ReadOnlyBigTableAdmin):
    list_display = ["id", "height", "chain", "phase", "tx_index", "event_index", "type", "short_attributes"]
    # On a narrow changelist these move into the row's "Details" disclosure.
    secondary_columns = ("tx_index", "event_index")
    collapse_below_px = 1000
    narrow_columns = ("chain", "phase")
    narrow_below_px = 760
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


class RequeueForm(forms.Form):
    reason = ReasonField()


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
class EnrichmentAdmin(ColumnPriorityMixin, StateDiagramMixin, ReadOnlyBigTableAdmin):
    state_machines = [ENRICHMENT_MACHINE]
    # On a narrow changelist these move into the row's "Details" disclosure.
    secondary_columns = ("chain", "phase", "event_index", "encoding", "next_attempt_at", "updated_at")
    collapse_below_px = 1100
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

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return [*super().get_readonly_fields(request, obj), "state_diagram"]

    @admin.display(description="Last error")
    def short_error(self, obj: Enrichment) -> str:
        return obj.last_error[:100]
