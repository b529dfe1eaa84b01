"""Admin building blocks: organization scoping, role gates, and actions that ask for a reason.

A staff user sees only rows of organizations they belong to and only the actions their role there
allows; another organization's row is "not found", never "forbidden".
"""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db.models import Model, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from fleetops.access.models import Organization, Role
from fleetops.access.permissions import audit_denied
from fleetops.access.selectors import highest_role, org_ids_for_user, org_ids_with_role, role_in_org
from fleetops.audit.actors import Actor
from fleetops.lib.errors import DomainError


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

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.related_model is Organization and not request.user.is_superuser:
            needed = self.add_role or self.change_role or Role.ADMIN
            kwargs["queryset"] = Organization.objects.filter(
                id__in=org_ids_with_role(user=request.user, role=needed) or []
            )
        return super().formfield_for_foreignkey(db_field, request, **kwargs)  # type: ignore[misc]


class ReasonForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 80}),
        max_length=2000,
        help_text="Recorded in the audit log with your name.",
    )


ActionService = Callable[..., Any]


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
                what=f"{name} on {refused} {modeladmin.model._meta.verbose_name_plural}",
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
        verbose = modeladmin.model._meta.verbose_name_plural
        modeladmin.message_user(
            request, f"{description}: {changed} {verbose} changed, {unchanged} unchanged."
        )
        for error in errors[:20]:
            modeladmin.message_user(request, error, messages.ERROR)

    action.__name__ = name
    action.short_description = description  # type: ignore[attr-defined]
    action.required_role = required_role  # type: ignore[attr-defined]
    return action
