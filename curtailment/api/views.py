from __future__ import annotations

from typing import Any

import django_filters
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from curtailment.api.serializers import (
    EventListOutput,
    EventOutput,
    PlanInput,
    PlanOutput,
    ReconcilerStatusOutput,
    StartInput,
    StopInput,
    TargetOutput,
    TerminateInput,
    UpdateInput,
)
from curtailment.models import EVENT_NON_TERMINAL, CurtailmentEvent, CurtailmentTarget, EventState
from curtailment.planning import PlanRequest, StartRequest, curtailment_preview
from curtailment.selectors import event_get, event_list, target_list
from curtailment.services import (
    curtailment_start,
    curtailment_stop,
    curtailment_terminate,
    curtailment_update,
)
from fleetops.access.context import OrgAccess
from fleetops.access.models import Role
from fleetops.access.permissions import InteractiveSessionRequired, OrgRolePermission
from fleetops.api.idempotency import HEADER as IDEMPOTENCY_HEADER
from fleetops.api.idempotency import idempotent
from fleetops.api.views import OrgScopedListView, OrgScopedMixin

IDEMPOTENCY_PARAM = OpenApiParameter(IDEMPOTENCY_HEADER, str, OpenApiParameter.HEADER, required=False)


def _plan_request(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "device_identifiers": tuple(data.get("device_identifiers") or ())}


class PreviewView(OrgScopedMixin, APIView):
    """The plan a start would make now; writes nothing. Viewers may preview."""

    required_roles = {"POST": Role.VIEWER}

    @extend_schema(request=PlanInput, responses=PlanOutput)
    def post(self, request: Request) -> Response:
        data = PlanInput(data=request.data)
        data.is_valid(raise_exception=True)
        plan = curtailment_preview(
            org=self.org_access.org,
            actor=self.actor,
            req=PlanRequest(**_plan_request(data.validated_data)),
        )
        return Response(PlanOutput.from_plan(plan))


class EventFilter(django_filters.FilterSet):
    state = django_filters.ChoiceFilter(choices=EventState.choices)

    class Meta:
        model = CurtailmentEvent
        fields: list[str] = []


class EventListCreate(OrgScopedListView):
    """List events newest first (trimmed, no targets) or start one."""

    queryset = CurtailmentEvent.objects.none()
    serializer_class = EventListOutput
    filterset_class = EventFilter
    required_roles = {"GET": Role.VIEWER, "POST": Role.OPERATOR}

    def scoped_queryset(self, access: OrgAccess) -> QuerySet[CurtailmentEvent]:
        return event_list(org=access.org)

    @extend_schema(
        request=StartInput, responses={200: EventOutput, 201: EventOutput}, parameters=[IDEMPOTENCY_PARAM]
    )
    @idempotent()
    def post(self, request: Request) -> Response:
        data = StartInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = _plan_request(data.validated_data)
        # The header doubles as the event's own key: after the 24 h response store is pruned, a
        # retry still replays the event while it is live.
        values["idempotency_key"] = values.get("idempotency_key") or request.headers.get(IDEMPOTENCY_HEADER)
        result = curtailment_start(org=self.org_access.org, actor=self.actor, req=StartRequest(**values))
        return Response(
            EventOutput(result.event).data,
            status=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK,
        )


class EventDetail(OrgScopedMixin, APIView):
    required_roles = {"GET": Role.VIEWER, "PATCH": Role.OPERATOR}

    @extend_schema(responses=EventOutput)
    def get(self, request: Request, uuid: str) -> Response:
        return Response(EventOutput(event_get(org=self.org_access.org, uuid=uuid)).data)

    @extend_schema(request=UpdateInput, responses=EventOutput)
    def patch(self, request: Request, uuid: str) -> Response:
        data = UpdateInput(data=request.data)
        data.is_valid(raise_exception=True)
        event = curtailment_update(
            event=event_get(org=self.org_access.org, uuid=uuid),
            actor=self.actor,
            patch=dict(data.validated_data),
        )
        return Response(EventOutput(event).data)


class EventTargets(OrgScopedListView):
    """The event's targets, paginated in insertion order."""

    queryset = CurtailmentTarget.objects.none()
    serializer_class = TargetOutput
    keyset_ordering = ("id",)

    def scoped_queryset(self, access: OrgAccess) -> QuerySet[CurtailmentTarget]:
        return target_list(event=event_get(org=access.org, uuid=self.kwargs["uuid"]))


class EventStop(OrgScopedMixin, APIView):
    """Begin restoring; idempotent on a restoring event. `force` (admin) skips the minimum duration."""

    required_roles = {"POST": Role.OPERATOR}

    @extend_schema(request=StopInput, responses=EventOutput, parameters=[IDEMPOTENCY_PARAM])
    @idempotent()
    def post(self, request: Request, uuid: str) -> Response:
        data = StopInput(data=request.data)
        data.is_valid(raise_exception=True)
        event = curtailment_stop(
            event=event_get(org=self.org_access.org, uuid=uuid),
            actor=self.actor,
            force=data.validated_data["force"],
            reason=data.validated_data["reason"],
        )
        return Response(EventOutput(event).data)


class EventTerminate(OrgScopedMixin, APIView):
    """Admin escape hatch for stuck pending or restoring events. Interactive sessions only."""

    required_roles = {"POST": Role.ADMIN}
    permission_classes = [OrgRolePermission, InteractiveSessionRequired]

    @extend_schema(request=TerminateInput, responses=EventOutput, parameters=[IDEMPOTENCY_PARAM])
    @idempotent()
    def post(self, request: Request, uuid: str) -> Response:
        data = TerminateInput(data=request.data)
        data.is_valid(raise_exception=True)
        event, _ = curtailment_terminate(
            event=event_get(org=self.org_access.org, uuid=uuid),
            actor=self.actor,
            target_state=data.validated_data["target_state"],
            reason=data.validated_data["reason"],
        )
        return Response(EventOutput(event).data)


class ReconcilerStatus(OrgScopedMixin, APIView):
    """Is the reconciler alive: heartbeat age, last tick duration, this organization's live events."""

    required_roles = {"GET": Role.VIEWER}

    @extend_schema(responses=ReconcilerStatusOutput)
    def get(self, request: Request) -> Response:
        from curtailment.reconciler import HEARTBEAT
        from fleetops.lib import clock
        from fleetops.observability.models import Heartbeat

        heartbeat = Heartbeat.objects.filter(name=HEARTBEAT).first()
        live = event_list(org=self.org_access.org).filter(state__in=EVENT_NON_TERMINAL).count()
        return Response(
            {
                "last_tick_at": heartbeat.last_beat_at if heartbeat else None,
                "heartbeat_age_seconds": (clock.now() - heartbeat.last_beat_at).total_seconds()
                if heartbeat
                else None,
                "last_tick_duration_seconds": heartbeat.last_duration_seconds if heartbeat else None,
                "last_error": heartbeat.last_error if heartbeat else "",
                "live_events": live,
            }
        )
