from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fleetops.access.api.serializers import (
    ApiTokenCreated,
    ApiTokenCreateInput,
    ApiTokenOutput,
    MeOutput,
    ReasonInput,
)
from fleetops.access.context import ORG_HEADER, OrgAccess, resolve_org_access
from fleetops.access.models import ApiToken, Membership, Role
from fleetops.access.permissions import InteractiveSessionRequired, OrgRolePermission
from fleetops.access.services import api_token_create, api_token_revoke
from fleetops.api.idempotency import HEADER as IDEMPOTENCY_HEADER
from fleetops.api.idempotency import idempotent
from fleetops.api.views import OrgScopedListView, OrgScopedMixin
from fleetops.lib.errors import DomainError, NotFound

TOKEN_NOT_FOUND = "No such token."

IDEMPOTENCY_PARAM = OpenApiParameter(
    IDEMPOTENCY_HEADER,
    str,
    OpenApiParameter.HEADER,
    required=False,
    description="Replays the stored response for a repeated key with the same body (24 h).",
)
ORG_PARAM = OpenApiParameter(
    ORG_HEADER,
    str,
    OpenApiParameter.HEADER,
    required=False,
    description="Organization slug for session requests of users in several organizations.",
)


class MeView(APIView):
    """Who am I, and in which organization and role does this request act."""

    permission_classes = [IsAuthenticated]

    @extend_schema(responses=MeOutput, parameters=[ORG_PARAM])
    def get(self, request: Request) -> Response:
        memberships = Membership.objects.filter(user_id=request.user.pk or 0).select_related("org")
        try:
            current = resolve_org_access(request)
        except DomainError:
            current = None
        data = {
            "username": request.user.get_username(),
            "is_superuser": request.user.is_superuser,
            "memberships": memberships,
            "current": current,
        }
        return Response(MeOutput(data).data)


class ApiTokenListCreate(OrgScopedListView):
    """Your API tokens in this organization (admins see every member's). Creating one needs an
    interactive session: a token cannot mint tokens."""

    queryset = ApiToken.objects.none()
    serializer_class = ApiTokenOutput
    required_roles = {"GET": Role.VIEWER, "POST": Role.VIEWER}

    def get_permissions(self) -> list[Any]:
        if self.request.method == "POST":
            return [OrgRolePermission(), InteractiveSessionRequired()]
        return [OrgRolePermission()]

    def scoped_queryset(self, access: OrgAccess) -> QuerySet[ApiToken]:
        qs = ApiToken.objects.filter(org=access.org).select_related("org", "user")
        if access.role != Role.ADMIN:
            qs = qs.filter(user_id=self.request.user.pk or 0)
        return qs

    @extend_schema(
        request=ApiTokenCreateInput, responses={201: ApiTokenCreated}, parameters=[IDEMPOTENCY_PARAM]
    )
    @idempotent(redact=("token",))
    def post(self, request: Request) -> Response:
        data = ApiTokenCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        issued = api_token_create(
            user=request.user,
            org=self.org_access.org,
            token_role=data.validated_data["role"],
            name=data.validated_data["name"],
            expires_at=data.validated_data.get("expires_at"),
            actor=self.actor,
        )
        body = ApiTokenOutput(issued.token).data
        return Response({**body, "token": issued.plaintext}, status=status.HTTP_201_CREATED)


class ApiTokenRevoke(OrgScopedMixin, APIView):
    """Revoke a token (your own, or any in the organization as an admin). Revoking twice is a no-op."""

    required_roles = {"POST": Role.VIEWER}

    @extend_schema(request=ReasonInput, responses={200: ApiTokenOutput}, parameters=[IDEMPOTENCY_PARAM])
    @idempotent()
    def post(self, request: Request, pk: int) -> Response:
        data = ReasonInput(data=request.data)
        data.is_valid(raise_exception=True)
        access = self.org_access
        tokens = ApiToken.objects.filter(org=access.org, pk=pk).select_related("org", "user")
        if access.role != Role.ADMIN:
            tokens = tokens.filter(user_id=request.user.pk or 0)
        token = tokens.first()
        if token is None:
            raise NotFound(TOKEN_NOT_FOUND)
        api_token_revoke(token=token, actor=self.actor, reason=data.validated_data["reason"])
        return Response(ApiTokenOutput(token).data)
