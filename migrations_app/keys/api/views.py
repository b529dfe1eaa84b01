from __future__ import annotations

import django_filters
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fleetops.access.context import OrgAccess
from fleetops.access.models import Role
from fleetops.api.idempotency import HEADER as IDEMPOTENCY_HEADER
from fleetops.api.idempotency import idempotent
from fleetops.api.views import OrgScopedListView, OrgScopedMixin
from migrations_app.keys.api.serializers import (
    BulkRetryInput,
    BulkRetryOutput,
    GroupOutput,
    KeyDetailOutput,
    KeyOutput,
    MigrateInput,
    MigrateOutput,
    RetryInput,
)
from migrations_app.keys.selectors import KeyFilter, group_list, key_get, key_list, stuck_keys
from migrations_app.keys.services import key_migrate_to_group, key_migration_retry, keys_migration_retry
from migrations_app.models.keys import AddressGroup, Key, KeyMigrationStatus, KeyState

IDEMPOTENCY_PARAM = OpenApiParameter(IDEMPOTENCY_HEADER, str, OpenApiParameter.HEADER, required=False)


class KeyFilterSet(django_filters.FilterSet):
    """Shared by the API list; the admin changelist offers the same filters."""

    address_group = django_filters.NumberFilter(field_name="address_group_id")
    state = django_filters.ChoiceFilter(choices=KeyState.choices)
    migration_status = django_filters.ChoiceFilter(choices=KeyMigrationStatus.choices)
    owner_address = django_filters.CharFilter()
    stuck = django_filters.BooleanFilter(
        method="filter_stuck", label="Scheduled/retrying longer than the threshold"
    )

    class Meta:
        model = Key
        fields: list[str] = []

    def filter_stuck(self, queryset: QuerySet[Key], name: str, value: bool | None) -> QuerySet[Key]:
        return stuck_keys(queryset) if value else queryset


class KeyList(OrgScopedListView):
    """Keys of the organization, newest first, filterable by group, state and migration status."""

    queryset = Key.objects.none()
    serializer_class = KeyOutput
    filterset_class = KeyFilterSet

    def scoped_queryset(self, access: OrgAccess) -> QuerySet[Key]:
        return key_list(org=access.org)


class KeyDetail(OrgScopedMixin, APIView):
    """One key with its remediation history (newest first) and stake transactions."""

    @extend_schema(responses=KeyDetailOutput)
    def get(self, request: Request, pk: int) -> Response:
        return Response(KeyDetailOutput(key_get(org=self.org_access.org, pk=pk)).data)


class KeyRetry(OrgScopedMixin, APIView):
    """Manual retry of a failed or retrying key: attempts reset, history kept."""

    required_roles = {"POST": Role.OPERATOR}

    @extend_schema(
        operation_id="keys_retry",
        request=RetryInput,
        responses=KeyDetailOutput,
        parameters=[IDEMPOTENCY_PARAM],
    )
    @idempotent()
    def post(self, request: Request, pk: int) -> Response:
        data = RetryInput(data=request.data)
        data.is_valid(raise_exception=True)
        key = key_migration_retry(
            key=key_get(org=self.org_access.org, pk=pk),
            actor=self.actor,
            reason=data.validated_data["reason"],
        )
        return Response(KeyDetailOutput(key).data)


class KeyBulkRetry(OrgScopedMixin, APIView):
    """Manual retry of several keys by id; keys that are not failed or retrying are skipped."""

    required_roles = {"POST": Role.OPERATOR}

    @extend_schema(
        operation_id="keys_bulk_retry",
        request=BulkRetryInput,
        responses=BulkRetryOutput,
        parameters=[IDEMPOTENCY_PARAM],
    )
    @idempotent()
    def post(self, request: Request) -> Response:
        data = BulkRetryInput(data=request.data)
        data.is_valid(raise_exception=True)
        result = keys_migration_retry(
            org=self.org_access.org,
            actor=self.actor,
            key_ids=data.validated_data["key_ids"],
            reason=data.validated_data["reason"],
        )
        return Response(
            {"retried": result.retried, "skipped": {str(k): v for k, v in result.skipped.items()}}
        )


class KeyMigrate(OrgScopedMixin, APIView):
    """Move keys (by ids or by filter) to another address group and schedule their re-stake.
    `dry_run` returns the exact id set and changes nothing; post those ids to act on exactly them."""

    required_roles = {"POST": Role.OPERATOR}

    @extend_schema(request=MigrateInput, responses=MigrateOutput, parameters=[IDEMPOTENCY_PARAM])
    @idempotent()
    def post(self, request: Request) -> Response:
        data = MigrateInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        given = values.get("filter") or {}
        flt = KeyFilter(
            key_ids=tuple(values["key_ids"]) if values.get("key_ids") is not None else None,
            address_group_id=given.get("address_group"),
            states=tuple(given.get("states") or ()),
            owner_address=given.get("owner_address") or "",
        )
        result = key_migrate_to_group(
            org=self.org_access.org,
            actor=self.actor,
            target_group_id=values["target_group"],
            flt=flt,
            dry_run=values["dry_run"],
            reason=values["reason"],
        )
        return Response(
            {
                "dry_run": result.dry_run,
                "target_group": result.target_group.pk,
                "target_group_name": result.target_group.name,
                "count": result.count,
                "key_ids": result.key_ids,
                "excluded_retired": result.excluded_retired,
            }
        )


class GroupList(OrgScopedListView):
    """Address groups of the organization with their key counts."""

    queryset = AddressGroup.objects.none()
    serializer_class = GroupOutput
    keyset_ordering = ("id",)

    def scoped_queryset(self, access: OrgAccess) -> QuerySet[AddressGroup]:
        return group_list(org=access.org)
