"""Channels (admins manage them, viewers read them) and the read-only delivery log."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.http import HttpRequest

from fleetops.access.admin_mixins import OrgScopedAdminMixin
from fleetops.access.models import Role
from fleetops.audit.actors import Actor
from fleetops.notifications.models import NotificationChannel, NotificationDelivery
from fleetops.notifications.registry import event_type_choices
from fleetops.notifications.services import notification_channel_save


class ChannelForm(forms.ModelForm):
    event_types = forms.MultipleChoiceField(
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="The channel hears these event types and only these.",
    )
    secret = forms.CharField(
        required=False, widget=forms.PasswordInput(render_value=True), help_text="Webhooks: HMAC-SHA256 key."
    )

    class Meta:
        model = NotificationChannel
        fields = ["org", "name", "kind", "target", "secret", "enabled"]

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
    delete_role = Role.ADMIN
    list_display = ["name", "kind", "target", "enabled", "subscribed", "org"]
    list_filter = ["kind", "enabled", "org"]

    @admin.display(description="Event types")
    def subscribed(self, obj: NotificationChannel) -> str:
        return ", ".join(obj.subscriptions.values_list("event_type", flat=True))

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return ["org"] if obj is not None else []

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        data = form.cleaned_data
        saved = notification_channel_save(
            org=obj.org,
            actor=Actor.for_user(request.user),
            channel=NotificationChannel.objects.get(pk=obj.pk) if change else None,
            values={k: data[k] for k in ("name", "kind", "target", "secret", "enabled") if k in data},
            event_types=list(data.get("event_types") or []),
        )
        obj.pk = saved.pk

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        pass  # subscriptions are written by the service in save_model


@admin.register(NotificationDelivery)
class NotificationDeliveryAdmin(OrgScopedAdminMixin, admin.ModelAdmin):
    """The notification log: what was sent where, when, and what went wrong."""

    list_display = ["created_at", "event_type", "subject", "channel", "status", "attempts", "error", "org"]
    list_filter = ["status", "event_type", "org"]
    list_select_related = ["channel", "org"]
    search_fields = ["subject", "=event_type"]
    readonly_fields = [f.name for f in NotificationDelivery._meta.fields]
    ordering = ["-id"]
    show_full_result_count = False
