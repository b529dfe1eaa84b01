from __future__ import annotations

from django.urls import path

from migrations_app.protocols.api import views

urlpatterns = [
    path("", views.ProtocolList.as_view(), name="protocols"),
    path("<str:protocol_id>", views.ProtocolDetail.as_view(), name="protocol"),
    path("<str:protocol_id>/state-changes", views.StateChangeList.as_view(), name="protocol-state-changes"),
    path("<str:protocol_id>/balances", views.BalanceList.as_view(), name="protocol-balances"),
    path("<str:protocol_id>/owners", views.OwnerList.as_view(), name="protocol-owners"),
]
