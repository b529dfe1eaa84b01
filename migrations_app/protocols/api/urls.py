"""A protocol is identified by (chain, protocol id): `/{chain}/{protocol_id}[/…]`. The protocol id
alone, `/{protocol_id}[/…]`, is the older shape, kept while the organization runs the protocol on one
chain only. Order matters: `/{protocol_id}/balances` (two segments, a fixed last one) is tried before
`/{chain}/{protocol_id}`; no protocol is called `state-changes`, `balances` or `owners`."""

from __future__ import annotations

from django.urls import path

from migrations_app.protocols.api import views

urlpatterns = [
    path("", views.ProtocolList.as_view(), name="protocols"),
    path(
        "<str:protocol_id>/state-changes",
        views.StateChangeListById.as_view(),
        name="protocol-state-changes-by-id",
    ),
    path("<str:protocol_id>/balances", views.BalanceListById.as_view(), name="protocol-balances-by-id"),
    path("<str:protocol_id>/owners", views.OwnerListById.as_view(), name="protocol-owners-by-id"),
    path("<slug:chain>/<str:protocol_id>", views.ProtocolDetail.as_view(), name="protocol"),
    path(
        "<slug:chain>/<str:protocol_id>/state-changes",
        views.StateChangeList.as_view(),
        name="protocol-state-changes",
    ),
    path("<slug:chain>/<str:protocol_id>/balances", views.BalanceList.as_view(), name="protocol-balances"),
    path("<slug:chain>/<str:protocol_id>/owners", views.OwnerList.as_view(), name="protocol-owners"),
    path("<str:protocol_id>", views.ProtocolDetailById.as_view(), name="protocol-by-id"),
]
