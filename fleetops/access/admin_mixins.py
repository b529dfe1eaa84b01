"""Admin building blocks: organization scoping, role gates, and actions that ask for a reason.

A staff user sees only rows of organizations they belong to and only the actions their role there
allows; another organization's row is "not found", never "forbidden".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from typing import Any, ClassVar

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db.models import Model, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils.html import format_html_join
from django.utils.safestring import SafeString, mark_safe

from fleetops.access.models import Organization, Role
from fleetops.access.permissions import audit_denied
from fleetops.access.roles import denials_outlive_rollback
from fleetops.access.selectors import highest_role, org_ids_for_user, org_ids_with_role, role_in_org
from fleetops.audit.actors import Actor
from fleetops.lib.diagram import svg
from fleetops.lib.errors import DomainError
from fleetops.lib.machine import Machine
from fleetops.lib.reason import REASON_MAX_LENGTH, clean_reason


def _org_id_of(obj: Model, org_field: str) -> int | None:
    path = org_field.split("__")
    target: Any = reduce(getattr, path[:-1], obj)
    return getattr(target, f"{path[-1]}_id", None) if target is not None else None


class OrgScopedAdminMixin:
    """Scope a ModelAdmin to the user's organizations and gate it by role.

    Set `org_field` to the lookup path of the organization (`"org"`, `"event__org"`), and the
    minimum role for each permission; `None` means nobody but superusers.
    """

    org_field = "org"
    view_role: Role | None = Role.VIEWER
    add_role: Role | None = None
    change_role: Role | None = None
    delete_role: Role | None = None

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        qs = super().get_queryset(request)  # type: ignore[misc]
        if request.user.is_superuser:
            return qs
        return qs.filter(**{f"{self.org_field}__in": org_ids_for_user(request.user)})

    def _role(self, request: HttpRequest, obj: Model | None) -> Role | None:
        if obj is None:
            return highest_role(user=request.user)
        org_id = _org_id_of(obj, self.org_field)
        return role_in_org(user=request.user, org_id=org_id) if org_id is not None else None

    def _allows(self, request: HttpRequest, required: Role | None, obj: Model | None = None) -> bool:
        if request.user.is_superuser:
            return True
        return required is not None and Role.at_least(self._role(request, obj), required)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return self._allows(request, self.view_role)

    def has_view_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return self._allows(request, self.view_role, obj) or self.has_change_permission(request, obj)

    def has_add_permission(self, request: HttpRequest, *args: Any) -> bool:
        return self._allows(request, self.add_role)

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return self._allows(request, self.change_role, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return self._allows(request, self.delete_role, obj)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)  # type: ignore[misc]
        if request.user.is_superuser:
            return dict(actions)
        mine = highest_role(user=request.user)
        return {
            name: entry
            for name, entry in actions.items()
            if Role.at_least(mine, getattr(entry[0], "required_role", Role.ADMIN))
        }

    # Django runs add/change/delete POSTs inside one transaction; a service refusal raised there
    # would roll its `access.denied` row back with the refused change, so those rows are written
    # after the view's transaction ends.
    def changeform_view(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        with denials_outlive_rollback():
            return super().changeform_view(request, *args, **kwargs)  # type: ignore[misc]

    def delete_view(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        with denials_outlive_rollback():
            return super().delete_view(request, *args, **kwargs)  # type: ignore[misc]

    def changelist_view(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        with denials_outlive_rollback():
            return super().changelist_view(request, *args, **kwargs)  # type: ignore[misc]

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.related_model is Organization and not request.user.is_superuser:
            needed = self.add_role or self.change_role or Role.ADMIN
            kwargs["queryset"] = Organization.objects.filter(
                id__in=org_ids_with_role(user=request.user, role=needed) or []
            )
        return super().formfield_for_foreignkey(db_field, request, **kwargs)  # type: ignore[misc]


class ReasonField(forms.CharField):
    """The reason an operator gives for an action: `fleetops.lib.reason.clean_reason`'s rules."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("widget", forms.Textarea(attrs={"rows": 3, "cols": 80}))
        kwargs.setdefault("max_length", REASON_MAX_LENGTH)
        kwargs.setdefault("help_text", "Recorded in the audit log with your name.")
        super().__init__(**kwargs)

    def clean(self, value: Any) -> str:
        value = super().clean(value)
        try:
            return clean_reason(value, required=self.required)
        except DomainError as exc:
            raise forms.ValidationError(exc.message) from exc


class ReasonForm(forms.Form):
    reason = ReasonField()


ActionService = Callable[..., Any]


def counted(n: int, opts: Any) -> str:
    """`1 key`, `2 keys`: a count with the model's singular or plural name."""
    return f"{n} {opts.verbose_name if n == 1 else opts.verbose_name_plural}"


def reasoned_action(
    *,
    name: str,
    description: str,
    required_role: Role,
    service: ActionService,
    org_field: str = "org",
) -> Callable[[admin.ModelAdmin[Any], HttpRequest, QuerySet[Any]], HttpResponse | None]:
    """An admin action that asks for a reason, then calls `service(obj, actor=..., reason=...)` for
    every selected row the user holds `required_role` for. The service returns True when it
    changed something, False when there was nothing to do; a DomainError is reported per row.
    """

    def action(
        modeladmin: admin.ModelAdmin[Any], request: HttpRequest, queryset: QuerySet[Any]
    ) -> HttpResponse | None:
        if "apply" in request.POST:
            form = ReasonForm(request.POST)
            if form.is_valid():
                _apply(modeladmin, request, queryset, form.cleaned_data["reason"])
                return None
        else:
            form = ReasonForm()
        context = {
            **modeladmin.admin_site.each_context(request),
            "title": description,
            "objects": queryset[:100],
            "count": queryset.count(),
            "form": form,
            "action_name": name,
            "selected_ids": list(queryset.values_list("pk", flat=True)),
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "opts": modeladmin.model._meta,
            "required_role": required_role.label,
        }
        return TemplateResponse(request, "admin/fleetops/reason_action.html", context)

    def _apply(
        modeladmin: admin.ModelAdmin[Any], request: HttpRequest, queryset: QuerySet[Any], reason: str
    ) -> None:
        allowed_orgs = org_ids_with_role(user=request.user, role=required_role)
        permitted = (
            queryset if allowed_orgs is None else queryset.filter(**{f"{org_field}__in": allowed_orgs})
        )
        refused = queryset.count() - permitted.count()
        if refused:
            audit_denied(
                request,
                surface="admin",
                org=None,
                required=required_role,
                have=highest_role(user=request.user),
                what=f"{name} on {counted(refused, modeladmin.model._meta)}",
            )
            modeladmin.message_user(
                request,
                f"{refused} selected row(s) need the {required_role.label} role; skipped.",
                messages.ERROR,
            )
        actor = Actor.for_user(request.user)
        changed, unchanged, errors = 0, 0, []
        for obj in permitted:
            try:
                result = service(obj, actor=actor, reason=reason)
            except DomainError as exc:
                errors.append(f"{obj}: {exc.message}")
                continue
            if result is False:
                unchanged += 1
            else:
                changed += 1
        modeladmin.message_user(
            request,
            f"{description}: {counted(changed, modeladmin.model._meta)} changed, {unchanged} unchanged.",
        )
        for error in errors[:20]:
            modeladmin.message_user(request, error, messages.ERROR)

    action.__name__ = name
    action.short_description = description  # type: ignore[attr-defined]
    action.required_role = required_role  # type: ignore[attr-defined]
    return action


class ObjectActionForm(forms.Form):
    reason = ReasonField()


class StateDiagramMixin:
    """Shows the object's state machines, drawn from their declarations, on its detail page.

    Set `state_machines = [MACHINE, ...]` and add `"state_diagram"` to `readonly_fields` (and to the
    fieldsets when the admin declares them)."""

    state_machines: ClassVar[list[Machine]] = []

    @admin.display(description="State machine")
    def state_diagram(self, obj: Model | None) -> SafeString:
        if obj is None or obj.pk is None:
            return mark_safe("")
        drawings = [
            (m.name, mark_safe(svg(m, current=getattr(obj, m.field, None))))  # noqa: S308 - built from escaped parts
            for m in self.state_machines
        ]
        return format_html_join(
            "",
            '<figure class="state-machine"><figcaption>{}</figcaption>{}</figure>',
            drawings,
        )


@dataclass(frozen=True)
class ObjectAction:
    """A button on an object's change page. `handler(request, obj, cleaned_data)` calls the service
    and returns a message; a DomainError it raises is shown on the form, nothing changed."""

    name: str
    label: str
    required_role: Role
    handler: Callable[[HttpRequest, Any, dict[str, Any]], str]
    form_class: type[forms.Form] = ObjectActionForm
    is_available: Callable[[Any], bool] = lambda obj: True
    danger: bool = False
    # The form's starting values from the object (an update form shows what it would change).
    initial: Callable[[Any], dict[str, Any]] = lambda obj: {}


class ObjectActionsMixin:
    """Adds `<id>/action/<name>/` pages for `object_actions` and shows the buttons the user's role
    in the object's organization allows (and the object's state makes sense for)."""

    object_actions: tuple[ObjectAction, ...] = ()
    change_form_template: ClassVar[str | None] = "admin/fleetops/change_form_actions.html"

    def get_urls(self) -> list[Any]:
        from django.urls import path

        opts = self.model._meta  # type: ignore[attr-defined]
        return [
            path(
                "<path:object_id>/action/<str:action_name>/",
                self.admin_site.admin_view(self.object_action_view),  # type: ignore[attr-defined]
                name=f"{opts.app_label}_{opts.model_name}_object_action",
            ),
            *super().get_urls(),  # type: ignore[misc]
        ]

    def allowed_object_actions(self, request: HttpRequest, obj: Any) -> list[ObjectAction]:
        org_id = _org_id_of(obj, getattr(self, "org_field", "org"))
        role = role_in_org(user=request.user, org_id=org_id or 0)
        return [
            a for a in self.object_actions if Role.at_least(role, a.required_role) and a.is_available(obj)
        ]

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        obj = self.get_object(request, object_id)  # type: ignore[attr-defined]
        actions = self.allowed_object_actions(request, obj) if obj is not None else []
        context = {"object_actions": actions, **(extra_context or {})}
        return super().change_view(request, object_id, form_url, context)  # type: ignore[misc]

    def object_action_view(self, request: HttpRequest, object_id: str, action_name: str) -> HttpResponse:
        from django.http import Http404
        from django.shortcuts import redirect

        obj = self.get_object(request, object_id)  # type: ignore[attr-defined]
        action = next((a for a in self.object_actions if a.name == action_name), None)
        if obj is None or action is None:
            raise Http404("No such object or action.")
        if action not in self.allowed_object_actions(request, obj):
            audit_denied(
                request,
                surface="admin",
                org=getattr(obj, "org", None),
                required=action.required_role,
                have=highest_role(user=request.user),
                what=f"{action.name} on {obj}",
            )
            raise PermissionDenied(f"{action.label} needs the {action.required_role.label} role.")
        opts = self.model._meta  # type: ignore[attr-defined]
        form = action.form_class(request.POST or None, initial=action.initial(obj))
        if request.method == "POST" and form.is_valid():
            try:
                message = action.handler(request, obj, form.cleaned_data)
            except DomainError as exc:
                form.add_error(None, exc.message)
            else:
                self.message_user(request, message)  # type: ignore[attr-defined]
                return redirect(f"admin:{opts.app_label}_{opts.model_name}_change", obj.pk)
        context = {
            **self.admin_site.each_context(request),  # type: ignore[attr-defined]
            "title": f"{action.label}: {obj}",
            "object": obj,
            "action": action,
            "form": form,
            "opts": opts,
        }
        return TemplateResponse(request, "admin/fleetops/object_action.html", context)


DENIED_DEFAULT = "Your role does not allow this page or action."


def denied_page(admin_site: Any, request: HttpRequest, exc: PermissionDenied) -> HttpResponse:
    """A refusal inside the console: the admin's own layout, the message naming the role needed
    (the gate that raised has already written its `access.denied` row), and a 403 status."""
    message = str(exc) or DENIED_DEFAULT
    role = highest_role(user=request.user) if request.user.is_authenticated else None
    context = {
        **admin_site.each_context(request),
        "title": "Permission denied",
        "message": message,
        "your_role": "superuser" if request.user.is_superuser else (role.label if role else "none"),
    }
    return TemplateResponse(request, "admin/fleetops/denied.html", context, status=403)
