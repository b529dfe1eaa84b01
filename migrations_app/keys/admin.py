"""The key console: status badges, stuck-keys filter, paginated history and transactions, the
Migrate… and Retry actions (operator+, reason required), address groups and the org config.

Imported from `MigrationsAppConfig.ready()` (the app's own `admin.py` belongs to the protocols).
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.paginator import Paginator
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils.html import format_html

from fleetops.access.admin_mixins import (
    ObjectAction,
    ObjectActionsMixin,
    OrgScopedAdminMixin,
    ReasonField,
    ReasonForm,
    StateDiagramMixin,
    counted,
)
from fleetops.access.models import Organization, Role
from fleetops.access.selectors import org_ids_for_user, org_ids_with_role
from fleetops.admin_live import ColumnPriorityMixin, LiveChangelistMixin
from fleetops.admin_site import BigTableAdminMixin
from fleetops.audit.actors import Actor
from fleetops.lib import clock
from fleetops.lib.errors import DomainError
from migrations_app.keys.common import MAX_KEY_IDS
from migrations_app.keys.selectors import (
    KeyFilter,
    key_overdue,
    migration_label,
    overdue_keys,
    stuck_keys,
)
from migrations_app.keys.services import (
    address_group_delete,
    address_group_save,
    key_config_update,
    key_migrate_to_group,
    key_migration_retry,
    keys_migration_retry,
)
from migrations_app.models.keys import (
    KEY_MIGRATION_MACHINE,
    KEY_MIGRATION_RETRYABLE,
    AddressGroup,
    BroadcastState,
    Key,
    KeyMigrationStatus,
    OrgKeyConfig,
    RemediationEntry,
    StakeTransaction,
    StakeTxStatus,
)

BADGE_COLOURS: dict[str, str] = {
    KeyMigrationStatus.NONE: "#999",
    KeyMigrationStatus.SCHEDULED: "#2b6cb0",
    KeyMigrationStatus.RETRYING: "#c05621",
    KeyMigrationStatus.SUCCEEDED: "#2f855a",
    KeyMigrationStatus.FAILED: "#c53030",
}
MIGRATE_PREVIEW_IDS = 200
HISTORY_PER_PAGE = 20


class StuckFilter(admin.SimpleListFilter):
    title = "stuck"
    parameter_name = "stuck"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            ("yes", "Scheduled/retrying past the threshold"),
            ("overdue", "Past next attempt + grace (not picked up)"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Key]) -> QuerySet[Key]:
        if self.value() == "overdue":
            return overdue_keys(queryset)
        return stuck_keys(queryset) if self.value() == "yes" else queryset


class GroupFilter(admin.SimpleListFilter):
    """Address groups of the user's organizations only (another org's names are not shown)."""

    title = "address group"
    parameter_name = "address_group"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        groups = AddressGroup.objects.all()
        if not request.user.is_superuser:
            groups = groups.filter(org_id__in=org_ids_for_user(request.user))
        return [(str(g.pk), g.name) for g in groups.order_by("name")[:200]]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Key]) -> QuerySet[Key]:
        value = self.value()
        return queryset.filter(address_group_id=int(value)) if value and value.isdigit() else queryset


def stake_tx_outcome(tx: StakeTransaction) -> str:
    """One wording for a stake transaction: its verdict once it has one (the broadcast state means
    nothing then), else where the broadcast is; an unknown outcome is looked up."""
    if tx.status == StakeTxStatus.SUCCESS:
        at = f" at height {tx.landed_height}" if tx.landed_height is not None else ""
        return f"Succeeded on chain{at}"
    if tx.status == StakeTxStatus.FAILURE:
        if tx.landed_height is not None:
            return f"Failed on chain at height {tx.landed_height} (code {tx.code})"
        # Every broadcast row has its hash (committed before the call), so the hash cannot tell a
        # refusal apart: a code with no landing and no `sent` is the node's CheckTx answer.
        if tx.code is not None and tx.broadcast_state != BroadcastState.SENT:
            return f"Rejected by the node at CheckTx (code {tx.code}); never on chain"
        if tx.code is not None:
            return f"Failed (code {tx.code})"
        return "Failed: not on chain by its timeout height"
    return f"Pending: {BroadcastState(tx.broadcast_state).label}"


class MigrateForm(forms.Form):
    target_group = forms.ModelChoiceField(queryset=AddressGroup.objects.none())
    reason = ReasonField()
    key_ids = forms.CharField(widget=forms.HiddenInput)

    def frozen_ids(self) -> list[int]:
        return [int(x) for x in self.cleaned_data["key_ids"].split(",") if x.strip().isdigit()]


def migrate_keys(modeladmin: KeyAdmin, request: HttpRequest, queryset: QuerySet[Key]) -> HttpResponse | None:
    """Migrate…: preview the exact keys (count and ids), then move exactly those ids."""
    allowed = org_ids_with_role(user=request.user, role=Role.OPERATOR)
    groups = (
        AddressGroup.objects.all() if allowed is None else AddressGroup.objects.filter(org_id__in=allowed)
    )
    if "apply" in request.POST:
        form = MigrateForm(request.POST)
        form.fields["target_group"].queryset = groups  # type: ignore[attr-defined]
        if form.is_valid():
            target: AddressGroup = form.cleaned_data["target_group"]
            frozen = form.frozen_ids()
            same_org = list(
                Key.objects.filter(pk__in=frozen, org_id=target.org_id).values_list("pk", flat=True)
            )
            if skipped := len(frozen) - len(same_org):
                modeladmin.message_user(
                    request,
                    f"{skipped} key(s) belong to another organization than {target}; skipped.",
                    messages.WARNING,
                )
            try:
                result = key_migrate_to_group(
                    org=target.org,
                    actor=Actor.for_user(request.user),
                    target_group_id=target.pk,
                    flt=KeyFilter(key_ids=tuple(same_org)),
                    reason=form.cleaned_data["reason"],
                )
            except DomainError as exc:
                modeladmin.message_user(request, exc.message, messages.ERROR)
                return None
            modeladmin.message_user(
                request,
                f"Migrated {result.count} key(s) to {target.name}; their re-stake is scheduled"
                + (
                    f" ({result.excluded_retired} retired key(s) excluded)."
                    if result.excluded_retired
                    else "."
                ),
            )
            return None
        frozen_text = request.POST.get("key_ids", "")
    else:
        form = MigrateForm()
        form.fields["target_group"].queryset = groups  # type: ignore[attr-defined]
        frozen_text = ""
    ids = (
        [int(x) for x in frozen_text.split(",") if x.isdigit()]
        if frozen_text
        else sorted(queryset.filter(retired_at__isnull=True).values_list("pk", flat=True))
    )
    if not frozen_text:
        form.initial["key_ids"] = ",".join(map(str, ids))
    preview = list(Key.objects.filter(pk__in=ids[:MIGRATE_PREVIEW_IDS]).select_related("address_group"))
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": "Migrate keys to another address group",
        "count": len(ids),
        "ids": ids,
        "preview": preview,
        "more": max(0, len(ids) - len(preview)),
        "form": form,
        "action_name": "migrate_keys",
        "selected_ids": list(queryset.values_list("pk", flat=True)[:10_000]),
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "opts": Key._meta,
    }
    return TemplateResponse(request, "admin/migrations_app/keys/migrate_confirm.html", context)


migrate_keys.short_description = "Migrate… to another address group"  # type: ignore[attr-defined]
migrate_keys.required_role = Role.OPERATOR  # type: ignore[attr-defined]


RETRY_DESCRIPTION = "Retry migration (failed or retrying keys)"


def retry_keys(modeladmin: KeyAdmin, request: HttpRequest, queryset: QuerySet[Key]) -> HttpResponse | None:
    """Retry…: asks for a reason, then retries the selected keys in bulk through
    `keys_migration_retry` (one call per organization and 10,000 keys: one set-based UPDATE and one
    audit INSERT per batch). The service checks the role per organization and audits a refusal."""
    if "apply" in request.POST:
        form = ReasonForm(request.POST)
        if form.is_valid():
            _retry_in_bulk(modeladmin, request, queryset, form.cleaned_data["reason"])
            return None
    else:
        form = ReasonForm()
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": RETRY_DESCRIPTION,
        "objects": queryset[:100],
        "count": queryset.count(),
        "form": form,
        "action_name": "retry_keys",
        "selected_ids": list(queryset.values_list("pk", flat=True)),
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "opts": Key._meta,
        "required_role": Role.OPERATOR.label,
    }
    return TemplateResponse(request, "admin/fleetops/reason_action.html", context)


def _retry_in_bulk(modeladmin: KeyAdmin, request: HttpRequest, queryset: QuerySet[Key], reason: str) -> None:
    by_org: dict[int, list[int]] = {}
    for org_id, pk in queryset.order_by("org_id", "pk").values_list("org_id", "pk"):
        by_org.setdefault(org_id, []).append(pk)
    orgs = Organization.objects.in_bulk(list(by_org))
    actor = Actor.for_user(request.user)
    retried, skipped, errors = 0, 0, []
    for org_id, ids in by_org.items():
        for start in range(0, len(ids), MAX_KEY_IDS):
            try:
                result = keys_migration_retry(
                    org=orgs[org_id], actor=actor, key_ids=ids[start : start + MAX_KEY_IDS], reason=reason
                )
            except DomainError as exc:
                errors.append(f"{orgs[org_id]}: {exc.message}")
                break
            retried += len(result.retried)
            skipped += len(result.skipped)
    modeladmin.message_user(
        request, f"{RETRY_DESCRIPTION}: {counted(retried, Key._meta)} changed, {skipped} unchanged."
    )
    for error in errors[:20]:
        modeladmin.message_user(request, error, messages.ERROR)


retry_keys.short_description = RETRY_DESCRIPTION  # type: ignore[attr-defined]
retry_keys.required_role = Role.OPERATOR  # type: ignore[attr-defined]


def _retry_object(request: HttpRequest, key: Key, data: dict[str, Any]) -> str:
    key_migration_retry(key=key, actor=Actor.for_user(request.user), reason=data["reason"])
    return "Retry scheduled: attempts reset, the history is kept."


@admin.register(Key)
class KeyAdmin(
    LiveChangelistMixin,
    ColumnPriorityMixin,
    BigTableAdminMixin,
    StateDiagramMixin,
    ObjectActionsMixin,
    OrgScopedAdminMixin,
    admin.ModelAdmin,
):
    change_form_template = "admin/migrations_app/key/change_form.html"
    list_display = [
        "address",
        "address_group",
        "state",
        "migration_badge",
        "stuck",
        "attempts",
        "migration_next_attempt_at",
        "last_error",
        "migration_manual_retries",
    ]
    # On a narrow changelist these move into the row's "Details" disclosure (never hidden): group
    # and state first, then next attempt, last error and manual retries; the address, the badge,
    # the stuck flag and the attempts stay columns.
    secondary_columns = ("address_group", "state")
    collapse_below_px = 1400
    narrow_columns = ("migration_next_attempt_at", "last_error", "migration_manual_retries")
    narrow_below_px = 900
    list_filter = ["migration_status", StuckFilter, GroupFilter, "state"]
    list_select_related = ["address_group"]
    search_fields = ["=address", "=owner_address", "=public_key"]
    search_help_text = "An address, an owner address or a public key (exact)."
    ordering = ["-id"]
    state_machines = [KEY_MIGRATION_MACHINE]
    readonly_fields = [f.name for f in Key._meta.fields] + ["migration_badge", "state_diagram"]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "address",
                    "public_key",
                    "owner_address",
                    "org",
                    "address_group",
                    "state",
                    "retired_at",
                ]
            },
        ),
        (
            "Migration",
            {
                "fields": [
                    "migration_badge",
                    "state_diagram",
                    "migration_status",
                    "migration_attempts",
                    "migration_max_attempts",
                    "migration_next_attempt_at",
                    "migration_last_error",
                    "migration_manual_retries",
                    "migration_round",
                    "migration_scheduled_at",
                    "migration_updated_at",
                ]
            },
        ),
    ]
    # History and transactions are paginated tables on the change page (HISTORY_PER_PAGE rows), not
    # inlines: a key with years of retries must not render thousands of rows nor stretch the page.
    actions = [migrate_keys, retry_keys]
    object_actions = (
        ObjectAction(
            "retry",
            "Retry migration",
            Role.OPERATOR,
            _retry_object,
            is_available=lambda k: k.migration_status in KEY_MIGRATION_RETRYABLE and k.retired_at is None,
        ),
    )

    @admin.display(description="Migration", ordering="migration_status")
    def migration_badge(self, obj: Key) -> str:
        return format_html(
            '<span style="background:{};color:#fff;padding:2px 6px;border-radius:3px;'
            'white-space:nowrap">{}</span>',
            BADGE_COLOURS.get(obj.migration_status, "#999"),
            migration_label(obj, now=clock.now()),
        )

    @admin.display(description="Stuck")
    def stuck(self, obj: Key) -> str:
        why = key_overdue(obj)
        return format_html('<span class="fo-stuck" title="{}">stuck</span>', why) if why else ""

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        key = self.get_object(request, object_id)
        context = dict(extra_context or {})
        if key is not None:
            history = Paginator(RemediationEntry.objects.filter(key=key).order_by("-id"), HISTORY_PER_PAGE)
            txs = Paginator(StakeTransaction.objects.filter(key=key).order_by("-id"), HISTORY_PER_PAGE)
            tx_page = txs.get_page(request.GET.get("tx_page"))
            tx_page.object_list = list(tx_page.object_list)
            for tx in tx_page.object_list:
                setattr(tx, "outcome_text", stake_tx_outcome(tx))  # noqa: B010 - read by the template
            context.update(
                history_page=history.get_page(request.GET.get("history_page")),
                tx_page=tx_page,
                stuck=key_overdue(key),
            )
        return super().change_view(request, object_id, form_url, context)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Key], search_term: str
    ) -> tuple[QuerySet[Key], bool]:
        """Exact matches on the indexed columns (a case-insensitive `=` lookup compares UPPER(...) and
        reads every key); bech32 addresses and hex keys are stored lower-case, so the term is tried
        as typed and lower-cased."""
        term = search_term.strip()
        if not term:
            return queryset, False
        terms = sorted({term, term.lower()})
        matches = Q(address__in=terms) | Q(owner_address__in=terms) | Q(public_key__in=terms)
        return queryset.filter(matches), False

    @admin.display(description="Attempts")
    def attempts(self, obj: Key) -> str:
        return f"{obj.migration_attempts}/{obj.migration_max_attempts}" if obj.migration_max_attempts else "—"

    @admin.display(description="Last error")
    def last_error(self, obj: Key) -> str:
        return obj.migration_last_error[:80]

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return False


@admin.register(AddressGroup)
class AddressGroupAdmin(OrgScopedAdminMixin, admin.ModelAdmin):
    add_role = Role.ADMIN
    change_role = Role.ADMIN
    delete_role = Role.ADMIN
    list_display = ["name", "services", "relay_miner", "region", "private", "key_count"]
    search_fields = ["name"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        return super().get_queryset(request).annotate(n_keys=Count("keys"))

    @admin.display(description="Keys", ordering="n_keys")
    def key_count(self, obj: AddressGroup) -> int:
        return obj.n_keys  # type: ignore[attr-defined]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return ["org"] if obj is not None else []

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        values = {k: v for k, v in form.cleaned_data.items() if k != "org"}
        saved = address_group_save(
            org=obj.org,
            actor=Actor.for_user(request.user),
            group=AddressGroup.objects.get(pk=obj.pk) if change else None,
            values=values,
        )
        obj.pk = saved.pk

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        address_group_delete(group=obj, actor=Actor.for_user(request.user))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        """Bulk delete goes through the service per group too: same role check, same audit row;
        a group that cannot go (it still has keys) is reported and kept."""
        actor = Actor.for_user(request.user)
        for group in queryset.order_by("pk"):
            try:
                address_group_delete(group=group, actor=actor)
            except DomainError as exc:
                self.message_user(request, f"{group}: {exc.message}", messages.ERROR)

    def delete_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        try:
            return super().delete_view(request, object_id, extra_context)
        except DomainError as exc:
            from django.shortcuts import redirect

            self.message_user(request, exc.message, messages.ERROR)
            return redirect("admin:migrations_app_addressgroup_change", object_id)


@admin.register(OrgKeyConfig)
class OrgKeyConfigAdmin(OrgScopedAdminMixin, admin.ModelAdmin):
    """Admins point their organization's re-stakes at a chain; saving goes through the service."""

    add_role = Role.ADMIN
    change_role = Role.ADMIN
    list_display = ["org", "rpc_url", "max_attempts", "updated_at"]
    fields = ["org", "rpc_url", "max_attempts"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return ["org"] if obj is not None else []

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        values = {k: v for k, v in form.cleaned_data.items() if k != "org"}
        saved = key_config_update(
            org=obj.org,
            actor=Actor.for_user(request.user),
            values=values,
        )
        obj.pk = saved.pk
