from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from fleetops.access.admin_mixins import OrgScopedAdminMixin, reasoned_action
from fleetops.access.models import ApiToken, Membership, Organization, Role
from fleetops.access.roles import audit_denial
from fleetops.access.selectors import org_ids_with_role, role_in_org
from fleetops.access.services import TOKEN_ROLE_TOO_HIGH, api_token_create, api_token_revoke
from fleetops.audit.actors import Actor
from fleetops.lib.errors import DomainError


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    raw_id_fields = ["user"]


@admin.register(Organization)
class OrganizationAdmin(OrgScopedAdminMixin, admin.ModelAdmin):
    org_field = "id"
    list_display = ["name", "slug", "created_at"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}

    def get_queryset(self, request: HttpRequest) -> QuerySet[Organization]:
        qs = admin.ModelAdmin.get_queryset(self, request)
        if request.user.is_superuser:
            return qs
        from fleetops.access.selectors import org_ids_for_user

        return qs.filter(id__in=org_ids_for_user(request.user))

    def _role(self, request: HttpRequest, obj: Any) -> Role | None:
        from fleetops.access.selectors import highest_role, role_in_org

        return (
            highest_role(user=request.user) if obj is None else role_in_org(user=request.user, org_id=obj.pk)
        )


@admin.register(Membership)
class MembershipAdmin(OrgScopedAdminMixin, admin.ModelAdmin):
    add_role = Role.ADMIN
    change_role = Role.ADMIN
    delete_role = Role.ADMIN
    list_display = ["user", "org", "role", "created_at"]
    list_filter = ["role", "org"]
    list_select_related = ["user", "org"]
    search_fields = ["user__username", "org__name"]
    raw_id_fields = ["user"]


class ApiTokenAddForm(forms.ModelForm):
    class Meta:
        model = ApiToken
        fields = ["org", "name", "role", "expires_at"]


def _revoke(token: ApiToken, *, actor: Actor, reason: str) -> bool:
    return api_token_revoke(token=token, actor=actor, reason=reason)


@admin.register(ApiToken)
class ApiTokenAdmin(OrgScopedAdminMixin, admin.ModelAdmin):
    """Tokens are issued here for the logged-in user; the plaintext is shown once, in a message."""

    add_role = Role.VIEWER
    list_display = [
        "name",
        "key_id",
        "user",
        "org",
        "role",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
    ]
    list_filter = ["role", "org", ("revoked_at", admin.EmptyFieldListFilter)]
    list_select_related = ["user", "org"]
    search_fields = ["name", "key_id", "user__username"]
    readonly_fields = ["user", "key_id", "created_at", "last_used_at", "revoked_at", "revoked_reason"]
    actions = [
        reasoned_action(
            name="revoke_tokens",
            description="Revoke selected tokens",
            required_role=Role.VIEWER,
            service=_revoke,
        )
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiToken]:
        qs = super().get_queryset(request)
        if request.user.is_superuser:
            return qs
        # Members see their own tokens; organization admins see every token of their organizations.
        from django.db.models import Q

        admin_orgs = org_ids_with_role(user=request.user, role=Role.ADMIN) or []
        return qs.filter(Q(user=request.user) | Q(org_id__in=admin_orgs))

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        if obj is None:
            user = request.user

            class AddForm(ApiTokenAddForm):
                def clean(self) -> dict[str, Any]:
                    cleaned = super().clean() or {}
                    org, role = cleaned.get("org"), cleaned.get("role")
                    own = role_in_org(user=user, org_id=org.pk) if org else None
                    if org and role and not Role.at_least(own, role):
                        audit_denial(
                            actor=Actor.for_user(user),
                            org=org,
                            surface="admin",
                            what="access.token_create",
                            required=role,
                            have=own,
                            asked={"role": role, "owner": user.get_username()},
                        )
                        self.add_error("role", TOKEN_ROLE_TOO_HIGH)
                    return cleaned

            kwargs["form"] = AddForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return []
        return [*self.readonly_fields, "org", "name", "role", "expires_at"]

    def formfield_for_foreignkey(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "org" and not request.user.is_superuser:
            kwargs["queryset"] = Organization.objects.filter(
                id__in=org_ids_with_role(user=request.user, role=Role.VIEWER) or []
            )
        return admin.ModelAdmin.formfield_for_foreignkey(self, db_field, request, **kwargs)

    def save_model(self, request: HttpRequest, obj: ApiToken, form: Any, change: bool) -> None:
        if change:
            return  # tokens are immutable; only revocation changes them (an action with a reason)
        try:
            issued = api_token_create(
                user=request.user,
                org=obj.org,
                token_role=obj.role,
                name=obj.name,
                expires_at=obj.expires_at,
                actor=Actor.for_user(request.user),
            )
        except DomainError as exc:
            # The form checks the same rule, so this only happens when the role changed meanwhile.
            self.message_user(request, exc.message, messages.ERROR)
            raise
        obj.pk = issued.token.pk
        obj.__dict__.update({k: v for k, v in issued.token.__dict__.items() if not k.startswith("_")})
        self.message_user(
            request,
            f"Token created. Copy it now, it will not be shown again: {issued.plaintext}",
            messages.WARNING,
        )
