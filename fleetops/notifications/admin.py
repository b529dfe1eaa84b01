"""Channels (admins manage them, viewers read them) and the read-only delivery log.

The webhook secret is write-only: no page shows it (not even to admins); admins type a new one
into "New secret", and leaving it blank keeps the current one. Channels are not deleted from the
console (that would drop their delivery log without an audit row): switch `enabled` off instead.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from fleetops.access.admin_mixins import OrgScopedAdminMixin, StateDiagramMixin
from fleetops.access.models import Role
from fleetops.access.selectors import organizations_for_user
from fleetops.audit.actors import Actor
from fleetops.notifications.models import DELIVERY_MACHINE, NotificationChannel, NotificationDelivery
from fleetops.notifications.registry import event_type_choices
from fleetops.notifications.services import notification_channel_save

EDITABLE_FIELDS = ["org", "name", "kind", "target", "new_secret", "enabled", "event_types"]
READ_FIELDS = ["org", "name", "kind", "target", "enabled", "subscribed", "has_secret"]


class OrgFilter(admin.SimpleListFilter):
    """The user's own organizations only: a plain "org" filter would name every tenant (and a
    related-only one would scan the delivery log for its distinct orgs)."""

    title = "organization"
    parameter_name = "org"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(str(o.pk), o.name) for o in organizations_for_user(user=request.user).order_by("name")[:200]]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(org_id=int(value)) if value and value.isdigit() else queryset


class ChannelForm(forms.ModelForm):
    event_types = forms.MultipleChoiceField(
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="The channel hears these event types and only these.",
    )
    new_secret = forms.CharField(
        required=False,
        strip=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="Webhooks: HMAC-SHA256 key. Write-only: leave blank to keep the current secret.",
    )

    class Meta:
        model = NotificationChannel
        fields = ["org", "name", "kind", "target", "enabled"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["event_types"]
        assert isinstance(field, forms.MultipleChoiceField)
        field.choices = event_type_choices()
        if self.instance.pk:
            self.fields["event_types"].initial = list(
                self.instance.subscriptions.values_list("event_type", flat=True)
            )


@admin.register(NotificationChannel)
class NotificationChannelAdmin(OrgScopedAdminMixin, admin.ModelAdmin):
    form = ChannelForm
    add_role = Role.ADMIN
    change_role = Role.ADMIN
    delete_role = None
    list_display = ["name", "kind", "target", "enabled", "subscribed", "org"]
    list_filter = ["kind", "enabled", OrgFilter]
    list_select_related = ["org"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        return super().get_queryset(request).prefetch_related("subscriptions")

    @admin.display(description="Event types")
    def subscribed(self, obj: NotificationChannel) -> str:
        return ", ".join(s.event_type for s in obj.subscriptions.all())

    @admin.display(description="Secret set", boolean=True)
    def has_secret(self, obj: NotificationChannel) -> bool:
        return bool(obj.secret)

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        # Never the `secret` column: editors get the write-only `new_secret`, readers a yes/no.
        return EDITABLE_FIELDS if self.has_change_permission(request, obj) else READ_FIELDS

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return ["org"] if obj is not None else []

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # disable the channel instead; deleting would drop its delivery log unaudited

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        data = form.cleaned_data
        values = {k: data[k] for k in ("name", "kind", "target", "enabled") if k in data}
        if data.get("new_secret"):
            values["secret"] = data["new_secret"]
        saved = notification_channel_save(
            org=obj.org,
            actor=Actor.for_user(request.user),
            channel=NotificationChannel.objects.get(pk=obj.pk) if change else None,
            values=values,
            event_types=list(data.get("event_types") or []),
        )
        obj.pk = saved.pk

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        pass  # subscriptions are written by the service in save_model


@admin.register(NotificationDelivery)
class NotificationDeliveryAdmin(StateDiagramMixin, OrgScopedAdminMixin, admin.ModelAdmin):
    """The notification log: what was sent where, when, and what went wrong."""

    state_machines = [DELIVERY_MACHINE]
    list_display = ["created_at", "event_type", "subject", "channel", "status", "attempts", "error", "org"]
    list_filter = ["status", "event_type", OrgFilter]
    list_select_related = ["channel", "org"]
    search_fields = ["subject", "=event_type"]
    readonly_fields = [*(f.name for f in NotificationDelivery._meta.fields), "state_diagram"]
    ordering = ["-id"]
    show_full_result_count = False
