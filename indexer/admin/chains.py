"""Chains in the operator console: state (mode with the drawn `MODE_MACHINE`), sources, enrichment
backlog and a lag chart, with the admin-role actions (retry poison height, pause, resume, roll back
to a height with a confirmation page) and the operator-role re-queue and "Tune limits" (max in
flight, batch sizes, decode concurrency: live, from the writer's next step); each calls its service."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import Model, OuterRef, QuerySet, Subquery, Value
from django.db.models.functions import Concat
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils.safestring import SafeString

from fleetops.access.admin_mixins import (
    ObjectAction,
    ObjectActionForm,
    ObjectActionsMixin,
    OrgScopedAdminMixin,
    StateDiagramMixin,
)
from fleetops.access.models import Role
from fleetops.access.permissions import audit_denied
from fleetops.access.selectors import highest_role
from fleetops.admin_live import LiveObjectMixin
from fleetops.audit.actors import Actor
from fleetops.lib import clock
from fleetops.lib.charts import Marker, Series, line_chart
from fleetops.lib.errors import DomainError
from fleetops.observability.models import Lease
from indexer import selectors, services
from indexer.admin.common import mode_badge
from indexer.admin.sources import SyncSourceInline
from indexer.blocks import lease_name
from indexer.models import MODE_MACHINE, Chain, IndexerState
from indexer.retention import chain_set_retention

LAG_WINDOWS = {
    "1h": timedelta(hours=1),
    "6h": timedelta(hours=6),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
}
DEFAULT_LAG_WINDOW = "6h"


class RollbackForm(ObjectActionForm):
    to_height = forms.IntegerField(
        min_value=0,
        help_text="Every block, transaction and event above this height is deleted and re-ingested.",
    )


class LimitsForm(ObjectActionForm):
    max_in_flight = forms.IntegerField(min_value=1, max_value=256, required=False)
    catchup_batch_size = forms.IntegerField(min_value=1, max_value=5000, required=False)
    decode_concurrency = forms.IntegerField(min_value=1, max_value=64, required=False)
    enrichment_batch_size = forms.IntegerField(min_value=1, max_value=10_000, required=False)


class RetentionForm(ObjectActionForm):
    retain_heights = forms.IntegerField(
        min_value=1,
        required=False,
        help_text=(
            "Heights kept below the indexed tip; older height ranges are dropped a whole partition "
            "at a time by the hourly indexer.partitions task. Empty: keep forever."
        ),
    )


def _retention(request: HttpRequest, chain: Chain, data: dict[str, Any]) -> str:
    changed = chain_set_retention(
        chain=chain,
        retain_heights=data.get("retain_heights"),
        actor=Actor.for_user(request.user),
        reason=data["reason"],
    )
    if not changed:
        return "Nothing changed."
    kept = chain.retain_heights
    return f"Retention set: {'forever' if kept is None else f'{kept:,} heights below the tip'}."


def _limits(request: HttpRequest, chain: Chain, data: dict[str, Any]) -> str:
    changes = services.chain_update_settings(
        chain=chain,
        actor=Actor.for_user(request.user),
        reason=data["reason"],
        **{name: data.get(name) for name in services.CHAIN_SETTING_BOUNDS},
    )
    if not changes:
        return "Nothing changed."
    return (
        "Changed " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()) + " (from the next step)."
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


def lag_window(request: HttpRequest) -> str:
    """The lag chart's window from `?window=` (1h, 6h, 24h, 7d); anything else is the default."""
    value = request.GET.get("window", "")
    return value if value in LAG_WINDOWS else DEFAULT_LAG_WINDOW


def lag_chart(
    chain: Chain, *, window: str = DEFAULT_LAG_WINDOW, width: int = 720, height: int = 200
) -> dict[str, Any] | None:
    """Lag (head - indexed, in blocks) over the window from ChainLagSample, the worst lag per bucket
    (about 120 buckets whatever the window), with the chain's reorgs, rollbacks and halts marked at
    their time. Server-rendered SVG with a time axis."""
    span = LAG_WINDOWS.get(window, LAG_WINDOWS[DEFAULT_LAG_WINDOW])
    end = clock.now()
    since = end - span
    bucket = max(60, int(span.total_seconds() / 120))
    rows = selectors.lag_series(chain=chain, since=since, bucket_seconds=bucket)
    found = selectors.chain_markers(chain=chain, since=since)
    if not rows and not found:
        return None
    markers = [Marker(at=at, kind=kind, label=label) for at, kind, label in found]
    series = [Series("lag (blocks)", [(at, float(lag)) for at, lag, _ in rows])]
    chart = line_chart(
        series,
        start=since,
        end=end,
        width=width,
        height=height,
        markers=markers,
        label=f"lag in blocks between the chain head and the indexed height, last {window}",
    )
    return {
        "svg": chart.svg,
        "max_lag": max((lag for _, lag, _ in rows), default=0),
        "last_lag": rows[-1][1] if rows else None,
        "count": sum(n for _, _, n in rows),
        "bucket": bucket,
        "markers": markers,
    }


@admin.register(Chain)
class ChainAdmin(
    LiveObjectMixin, StateDiagramMixin, ObjectActionsMixin, OrgScopedAdminMixin, admin.ModelAdmin
):
    change_form_template = "admin/indexer/chain/change_form.html"
    # Indexer state, sources and the lag chart: refreshed in place (console.js) from one partial.
    live_template = "admin/indexer/chain/live.html"
    live_name = "chain"
    live_interval_seconds = 5
    list_display = ["slug", "chain_id", "org", "mode", "head", "indexed", "lag", "leader"]
    list_select_related = ["org", "state"]
    # Only the organizations of the chains listed: a plain "org" filter would name every tenant.
    list_filter = [("org", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["=slug", "=chain_id"]
    inlines = [SyncSourceInline]
    # The mode lives on the chain's IndexerState (one-to-one): drawn with it highlighted.
    state_machines = [MODE_MACHINE]
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
        ObjectAction("limits", "Tune limits", Role.OPERATOR, _limits, form_class=LimitsForm),
        ObjectAction("retention", "Set retention", Role.ADMIN, _retention, form_class=RetentionForm),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Chain]:
        # The live leader in the same query as the chains: the lease row is named after the slug
        # exactly as `indexer.blocks.lease_name` names it (a test pins the two together).
        live = Lease.objects.filter(
            name=Concat(Value(lease_name(Chain(slug=""))), OuterRef("slug")), expires_at__gt=clock.now()
        )
        return super().get_queryset(request).annotate(leader_holder=Subquery(live.values("holder")[:1]))

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return [f.name for f in Chain._meta.fields] + ["state_diagram"]

    @admin.display(description="Indexer mode")
    def state_diagram(self, obj: Model | None) -> SafeString:
        return super().state_diagram(_state(obj) if isinstance(obj, Chain) else None)

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
            context.update(self.full_live_context(request, chain))
        return super().change_view(request, object_id, form_url, context)

    def live_context(self, request: HttpRequest, obj: Any) -> dict[str, Any]:
        status = selectors.chain_status(chain=obj)
        window = lag_window(request)
        return {
            "status": status,
            "mode_badge": mode_badge(status.mode if _state(obj) else None, paused=status.paused),
            "chart": lag_chart(obj, window=window),
            "chart_window": window,
            "chart_windows": list(LAG_WINDOWS),
        }

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
