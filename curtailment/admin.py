from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import connection
from django.db.models import OuterRef, Q, QuerySet, Subquery
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from curtailment.models import (
    EVENT_MACHINE,
    EVENT_NON_TERMINAL,
    TARGET_NON_TERMINAL,
    TERMINATE_STATES,
    CurtailmentEvent,
    CurtailmentTarget,
    DesiredState,
    Device,
    DeviceSample,
    EventState,
    OrgCurtailmentConfig,
    Priority,
)
from curtailment.planning import TEXT_CAP, PlanRequest, StartRequest, curtailment_preview
from curtailment.selectors import event_stuck, target_rollup
from curtailment.services import (
    curtailment_config_update,
    curtailment_start,
    curtailment_stop,
    curtailment_terminate,
    curtailment_update,
)
from fleetops.access.admin_mixins import (
    ObjectAction,
    ObjectActionForm,
    ObjectActionsMixin,
    OrgScopedAdminMixin,
    StateDiagramMixin,
)
from fleetops.access.models import Organization, Role
from fleetops.access.permissions import audit_denied
from fleetops.access.selectors import highest_role, org_ids_with_role
from fleetops.admin_live import LiveObjectMixin
from fleetops.admin_site import BigTableAdminMixin
from fleetops.audit.actors import Actor
from fleetops.lib import clock
from fleetops.lib.charts import PALETTE, Band, Series, legend, line_chart
from fleetops.lib.errors import DomainError

TARGETS_PER_PAGE = 50


@admin.register(Device)
class DeviceAdmin(BigTableAdminMixin, OrgScopedAdminMixin, admin.ModelAdmin):
    list_display = [
        "identifier",
        "name",
        "site",
        "status",
        "pairing_status",
        "last_power_w",
        "last_sample_at",
        "locked_by",
    ]
    list_filter = ["status", "pairing_status", "site", "org"]
    search_fields = ["=identifier", "name"]
    list_select_related = ["org"]
    readonly_fields = [f.name for f in Device._meta.fields]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Device]:
        live = CurtailmentTarget.objects.filter(device=OuterRef("pk"), state__in=TARGET_NON_TERMINAL)
        return super().get_queryset(request).annotate(live_state=Subquery(live.values("state")[:1]))

    @admin.display(description="Curtailment lock")
    def locked_by(self, obj: Any) -> str:
        return f"locked ({obj.live_state})" if obj.live_state else ""


class ConfigForm(forms.ModelForm):
    gateway_url = forms.URLField(required=False, assume_scheme="http", help_text="e.g. http://gateway:8701")

    class Meta:
        model = OrgCurtailmentConfig
        fields = [
            "org",
            "gateway_url",
            "max_duration_default_sec",
            "candidate_min_power_w",
            "post_event_cooldown_sec",
            "restore_interval_cap_sec",
            "curtail_confirm_timeout_sec",
        ]


@admin.register(OrgCurtailmentConfig)
class OrgCurtailmentConfigAdmin(OrgScopedAdminMixin, admin.ModelAdmin):
    """Admins edit their organization's defaults; saving goes through the audited service."""

    form = ConfigForm
    add_role = Role.ADMIN
    change_role = Role.ADMIN
    list_display = [
        "org",
        "gateway_url",
        "max_duration_default_sec",
        "candidate_min_power_w",
        "post_event_cooldown_sec",
        "restore_interval_cap_sec",
    ]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return ["org"] if obj is not None else []

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        values = {k: v for k, v in form.cleaned_data.items() if k != "org"}
        saved = curtailment_config_update(org=obj.org, actor=Actor.for_user(request.user), values=values)
        obj.pk = saved.pk


def _stop(request: HttpRequest, event: CurtailmentEvent, data: dict[str, Any], *, force: bool) -> str:
    curtailment_stop(event=event, actor=Actor.for_user(request.user), force=force, reason=data["reason"])
    return "Restoring: the reconciler sends uncurtail commands in staggered batches."


UPDATE_FIELDS = ("title", "restore_batch_size", "restore_batch_interval_sec", "max_duration_seconds")


class UpdateForm(ObjectActionForm):
    """The event's current values, prefilled; only the fields that differ are sent to the service.
    `reason` is why (the audit log's), `title` is the event's own reason and stays unless edited."""

    title = forms.CharField(
        max_length=TEXT_CAP, required=False, help_text="The event's title; leave as is to keep it."
    )
    restore_batch_size = forms.IntegerField(required=False, min_value=0, max_value=10000)
    restore_batch_interval_sec = forms.IntegerField(required=False, min_value=0, max_value=3600)
    max_duration_seconds = forms.IntegerField(required=False, min_value=1, max_value=604800)
    field_order = [*UPDATE_FIELDS, "reason"]


def _update_initial(event: CurtailmentEvent) -> dict[str, Any]:
    return {
        "title": event.reason,
        "restore_batch_size": event.restore_batch_size,
        "restore_batch_interval_sec": event.restore_batch_interval_sec,
        "max_duration_seconds": event.max_duration_seconds,
    }


def _update(request: HttpRequest, event: CurtailmentEvent, data: dict[str, Any]) -> str:
    patch = {
        ("reason" if name == "title" else name): data[name]
        for name in UPDATE_FIELDS
        if data.get(name) not in (None, "")
    }
    before = {k: getattr(event, k) for k in patch}
    if all(before[k] == v for k, v in patch.items()):
        return "Nothing changed: every field already had that value."
    curtailment_update(
        event=event, actor=Actor.for_user(request.user), patch=patch, audit_reason=data["reason"]
    )
    return "Event updated; interval and maximum duration take effect at the next reconciler tick."


class TerminateForm(ObjectActionForm):
    target_state = forms.ChoiceField(choices=[(s, EVENT_MACHINE.label(s)) for s in TERMINATE_STATES])


def _terminate(request: HttpRequest, event: CurtailmentEvent, data: dict[str, Any]) -> str:
    _, transitioned = curtailment_terminate(
        event=event,
        actor=Actor.for_user(request.user),
        target_state=data["target_state"],
        reason=data["reason"],
    )
    return (
        "Event terminated: targets never sent a command are cancelled, the others restore_failed; "
        "your reason is in the audit log."
        if transitioned
        else "Already in that state."
    )


@admin.register(CurtailmentEvent)
class CurtailmentEventAdmin(
    LiveObjectMixin,
    BigTableAdminMixin,
    StateDiagramMixin,
    ObjectActionsMixin,
    OrgScopedAdminMixin,
    admin.ModelAdmin,
):
    change_form_template = "curtailment/event_change_form.html"
    # State, stuck flag, targets, chart: refreshed in place (console.js) from the same partial.
    live_template = "curtailment/event_live.html"
    live_name = "curtailment-event"
    live_interval_seconds = 5
    state_machines = [EVENT_MACHINE]
    list_display = [
        "reason",
        "state",
        "stuck",
        "target_kw",
        "priority",
        "selected",
        "created_at",
        "started_at",
        "ended_at",
        "org",
    ]
    list_filter = ["state", "priority", "org"]
    list_select_related = ["org"]
    search_fields = ["=uuid", "reason", "=external_reference"]
    search_help_text = "Words of the reason (3 letters or more), an event id (UUID) or an external reference."
    ordering = ["-id"]
    readonly_fields = [
        *(f.name for f in CurtailmentEvent._meta.fields if f.name != "decision_snapshot"),
        "state_diagram",
    ]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "state",
                    "state_diagram",
                    "reason",
                    "org",
                    "target_kw",
                    "tolerance_kw",
                    "priority",
                    "created_at",
                    "started_at",
                    "ended_at",
                    "created_by",
                ]
            },
        ),
        (
            "Durations and restore",
            {
                "fields": [
                    "max_duration_seconds",
                    "allow_unbounded",
                    "min_curtailed_duration_sec",
                    "restore_batch_size",
                    "restore_batch_interval_sec",
                    "effective_batch_size",
                ]
            },
        ),
        (
            "Selection",
            {
                "classes": ["collapse"],
                "fields": [
                    "mode",
                    "strategy",
                    "level",
                    "scope_type",
                    "scope",
                    "include_maintenance",
                    "force_include_maintenance",
                ],
            },
        ),
        (
            "Attribution",
            {
                "classes": ["collapse"],
                "fields": [
                    "uuid",
                    "source_actor_type",
                    "source_actor_id",
                    "idempotency_key",
                    "external_source",
                    "external_reference",
                    "updated_at",
                ],
            },
        ),
    ]
    object_actions = (
        ObjectAction(
            "stop",
            "Stop",
            Role.OPERATOR,
            lambda r, e, d: _stop(r, e, d, force=False),
            is_available=lambda e: EVENT_MACHINE.can(e.state, EventState.RESTORING),
        ),
        ObjectAction(
            "force_stop",
            "Force stop",
            Role.ADMIN,
            lambda r, e, d: _stop(r, e, d, force=True),
            is_available=lambda e: e.state == EventState.ACTIVE,
            danger=True,
        ),
        ObjectAction(
            "update",
            "Update",
            Role.OPERATOR,
            _update,
            form_class=UpdateForm,
            is_available=lambda e: EVENT_MACHINE.can(e.state, e.state),
            initial=_update_initial,
        ),
        ObjectAction(
            "terminate",
            "Terminate",
            Role.ADMIN,
            _terminate,
            form_class=TerminateForm,
            is_available=lambda e: any(EVENT_MACHINE.can(e.state, s) for s in TERMINATE_STATES),
            danger=True,
        ),
    )

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[CurtailmentEvent], search_term: str
    ) -> tuple[QuerySet[CurtailmentEvent], bool]:
        """Every branch on an index (the admin's default `=uuid` compares UPPER(uuid::text) and reads
        every event): a UUID by the unique index; otherwise each word in the reason (trigram index
        `curtailevent_reason_trgm`) or the whole term as an external reference."""
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            return queryset.filter(uuid=uuid.UUID(term)), False
        except ValueError:
            pass
        words = Q()
        for word in term.split():
            words &= Q(reason__icontains=word)
        return queryset.filter(words | Q(external_reference=term)), False

    @admin.display(description="Devices")
    def selected(self, obj: CurtailmentEvent) -> int:
        return int(obj.decision_snapshot.get("selected_count", 0))

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return False  # events start from the start page, which previews first

    def get_urls(self) -> list[Any]:
        return [
            path(
                "start/",
                self.admin_site.admin_view(self.start_view),
                name="curtailment_curtailmentevent_start",
            ),
            *super().get_urls(),
        ]

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        event = self.get_object(request, object_id)
        context = dict(extra_context or {})
        if event is not None:
            context.update(self.full_live_context(request, event), snapshot=event.decision_snapshot)
        return super().change_view(request, object_id, form_url, context)

    def live_context(self, request: HttpRequest, obj: Any) -> dict[str, Any]:
        page = Paginator(CurtailmentTarget.objects.filter(event=obj).order_by("id"), TARGETS_PER_PAGE)
        return {
            "event": obj,
            "stuck": event_stuck(obj),
            "targets_page": page.get_page(request.GET.get("targets_page")),
            "rollup": target_rollup(event=obj),
            "chart": power_chart(obj),
        }

    @admin.display(description="Stuck")
    def stuck(self, obj: CurtailmentEvent) -> str:
        why = event_stuck(obj)
        return format_html('<span class="fo-stuck" title="{}">stuck</span>', why) if why else ""

    def start_view(self, request: HttpRequest) -> HttpResponse:
        return start_page(self, request)


# --- the power chart --------------------------------------------------------------------------------


def power_chart(event: CurtailmentEvent, *, width: int = 720, height: int = 220) -> dict[str, Any] | None:
    """Observed power of the event's devices (sum of per-device averages per bucket, from the
    stored telemetry), the power commanded (the baseline less every device commanded to curtail,
    back up as restore commands go out, from the targets' dispatch times) and the target band
    (baseline - target_kw, ± tolerance_kw). Two grouped queries; server-rendered SVG."""
    end = event.ended_at or clock.now()
    start = event.created_at - timedelta(minutes=2)
    span = max((end - start).total_seconds(), 60.0)
    bucket = max(15, int(span / 120))
    targets = CurtailmentTarget._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT b, SUM(p) FROM (
                SELECT date_bin(%s::interval, s.taken_at, %s::timestamptz) AS b, s.device_id,
                       AVG(s.power_w) AS p
                FROM {DeviceSample._meta.db_table} s
                JOIN {targets} t ON t.device_id = s.device_id AND t.event_id = %s
                WHERE s.taken_at BETWEEN %s AND %s
                GROUP BY 1, 2
            ) per_device GROUP BY b ORDER BY b
            """,  # noqa: S608 - table names from the models
            [f"{bucket} seconds", start, event.pk, start, end],
        )
        observed = cursor.fetchall()
        # Baseline of the devices by phase and by the bucket of their last command.
        cursor.execute(
            f"""
            SELECT desired_state, date_bin(%s::interval, last_dispatched_at, %s::timestamptz),
                   COALESCE(SUM(baseline_power_w), 0)
            FROM {targets} WHERE event_id = %s GROUP BY 1, 2
            """,  # noqa: S608 - table name from the model
            [f"{bucket} seconds", start, event.pk],
        )
        commands = cursor.fetchall()
    baseline = sum(float(w) for _, _, w in commands)
    if not observed and not commands:
        return None
    commanded = commanded_power(event, commands=commands, start=start, baseline_w=baseline)
    series = [
        Series("observed", [(at, (p or 0) / 1000) for at, p in observed], color=PALETTE[0]),
        Series("commanded", commanded, color=PALETTE[1], step=True, dashed=True),
        Series("baseline", [(start, baseline / 1000), (end, baseline / 1000)], color="#999", dashed=True),
    ]
    goal = (baseline / 1000) - event.target_kw
    bands = [
        Band(
            max(goal - event.tolerance_kw, 0.0),  # power is never below zero
            max(goal + event.tolerance_kw, 0.0),
            f"target {goal:.1f} kW ± {event.tolerance_kw:g}",
        )
    ]
    chart = line_chart(
        series,
        start=start,
        end=end,
        width=width,
        height=height,
        unit=" kW",
        bands=bands,
        label="observed and commanded power of the event's devices, with the target band",
    )
    return {
        "svg": chart.svg,
        "legend": legend(series, bands),
        "baseline_kw": round(baseline / 1000, 1),
        "bucket": bucket,
    }


def commanded_power(
    event: CurtailmentEvent, *, commands: Sequence[tuple[str, Any, float]], start: Any, baseline_w: float
) -> list[tuple[Any, float | None]]:
    """A step series in kW: the baseline until the first curtail command, less each device's
    baseline from its curtail command on, plus it back from its restore command on. A device now in
    the restore phase had its curtail command overwritten by the restore one: its curtail counts
    from the event's start (activation, or creation while pending)."""
    steps: dict[Any, float] = {}
    curtail_from = event.started_at or event.created_at
    for desired, at, watts in commands:
        if desired == DesiredState.CURTAILED:
            if at is not None:
                steps[at] = steps.get(at, 0.0) - float(watts)
        else:
            steps[curtail_from] = steps.get(curtail_from, 0.0) - float(watts)
            if at is not None:
                steps[at] = steps.get(at, 0.0) + float(watts)
    level = baseline_w
    points: list[tuple[Any, float | None]] = [(start, level / 1000)]
    for at in sorted(steps):
        level += steps[at]
        points.append((at, max(level, 0.0) / 1000))
    return points


# --- the start page --------------------------------------------------------------------------------


class StartForm(forms.Form):
    org = forms.ModelChoiceField(queryset=Organization.objects.none(), to_field_name="slug")
    target_kw = forms.FloatField(label="Target kW", min_value=0.001)
    tolerance_kw = forms.FloatField(label="Tolerance kW", min_value=0, initial=0, required=False)
    device_identifiers = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="Empty = the whole organization; or device identifiers, comma or newline separated.",
    )
    priority = forms.ChoiceField(choices=Priority.choices, initial=Priority.NORMAL)
    reason = forms.CharField(max_length=TEXT_CAP, help_text="The event's title.")
    max_duration_seconds = forms.IntegerField(
        required=False, min_value=0, max_value=604800, help_text="Empty = the organization default."
    )
    restore_batch_interval_sec = forms.IntegerField(required=False, min_value=0, max_value=3600, initial=30)
    min_curtailed_duration_sec = forms.IntegerField(required=False, min_value=0, initial=0)


def _plan_kwargs(data: dict[str, Any]) -> dict[str, Any]:
    ids = tuple(
        i.strip() for i in (data.get("device_identifiers") or "").replace("\n", ",").split(",") if i.strip()
    )
    return {
        "target_kw": data["target_kw"],
        "tolerance_kw": data.get("tolerance_kw") or 0.0,
        "scope_type": "device_list" if ids else "whole_org",
        "device_identifiers": ids,
        "priority": data["priority"],
    }


START_NEEDS_OPERATOR = "Starting an event needs the operator role."


def start_page(model_admin: CurtailmentEventAdmin, request: HttpRequest) -> HttpResponse:
    """Fill the form, preview the plan (also live, through the preview API), then confirm."""
    allowed = org_ids_with_role(user=request.user, role=Role.OPERATOR)
    orgs = Organization.objects.all() if allowed is None else Organization.objects.filter(id__in=allowed)
    if not orgs.exists():
        audit_denied(
            request,
            surface="admin",
            org=None,
            required=Role.OPERATOR,
            have=highest_role(user=request.user),
            what="curtailment.start (start page)",
        )
        raise PermissionDenied(START_NEEDS_OPERATOR)
    form = StartForm(request.POST or None)
    form.fields["org"].queryset = orgs  # type: ignore[attr-defined]
    if orgs.count() == 1:
        form.fields["org"].initial = orgs.first()
    plan, error = None, None
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        org = data["org"]
        actor = Actor.for_user(request.user)
        try:
            if "confirm" in request.POST:
                result = curtailment_start(
                    org=org,
                    actor=actor,
                    req=StartRequest(
                        **_plan_kwargs(data),
                        reason=data["reason"],
                        max_duration_seconds=data.get("max_duration_seconds") or 0,
                        restore_batch_interval_sec=data.get("restore_batch_interval_sec") or 0,
                        min_curtailed_duration_sec=data.get("min_curtailed_duration_sec") or 0,
                    ),
                )
                model_admin.message_user(
                    request, "Event started; the reconciler dispatches it at its next tick."
                )
                return redirect(reverse("admin:curtailment_curtailmentevent_change", args=[result.event.pk]))
            plan = curtailment_preview(org=org, actor=actor, req=PlanRequest(**_plan_kwargs(data)))
        except DomainError as exc:
            error = exc.message
    context = {
        **model_admin.admin_site.each_context(request),
        "title": "Start a curtailment event",
        "opts": CurtailmentEvent._meta,
        "form": form,
        "plan": plan,
        "error": error,
        "live_states": EVENT_NON_TERMINAL,
    }
    return TemplateResponse(request, "curtailment/start.html", context)
