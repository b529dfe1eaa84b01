from __future__ import annotations

import django_filters
from django.db.models import QuerySet

from fleetops.access.context import OrgAccess
from fleetops.api.filters import UtcIsoDateTimeFilter
from fleetops.api.views import OrgScopedListView, OrgScopedRetrieveView
from fleetops.audit.api.serializers import AuditEventOutput
from fleetops.audit.models import ActorType, AuditEvent


class AuditEventFilter(django_filters.FilterSet):
    action = django_filters.CharFilter()
    action_prefix = django_filters.CharFilter(field_name="action", lookup_expr="startswith")
    actor_type = django_filters.ChoiceFilter(choices=ActorType.choices)
    actor_id = django_filters.CharFilter()
    target_type = django_filters.CharFilter()
    target_id = django_filters.CharFilter()
    request_id = django_filters.CharFilter()
    since = UtcIsoDateTimeFilter(field_name="at", lookup_expr="gte")
    until = UtcIsoDateTimeFilter(field_name="at", lookup_expr="lt")

    class Meta:
        model = AuditEvent
        fields: list[str] = []


class AuditEventList(OrgScopedListView):
    """The organization's audit log, newest first."""

    queryset = AuditEvent.objects.none()
    serializer_class = AuditEventOutput
    filterset_class = AuditEventFilter

    def scoped_queryset(self, access: OrgAccess) -> QuerySet[AuditEvent]:
        return AuditEvent.objects.filter(org=access.org).select_related("org")


class AuditEventDetail(OrgScopedRetrieveView):
    queryset = AuditEvent.objects.none()
    serializer_class = AuditEventOutput

    def scoped_queryset(self, access: OrgAccess) -> QuerySet[AuditEvent]:
        return AuditEvent.objects.filter(org=access.org).select_related("org")
