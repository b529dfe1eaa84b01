from __future__ import annotations

from django.urls import path

from fleetops.access.api import views

urlpatterns = [
    path("me/", views.MeView.as_view(), name="me"),
    path("tokens/", views.ApiTokenListCreate.as_view(), name="token-list"),
    path("tokens/<int:pk>/revoke/", views.ApiTokenRevoke.as_view(), name="token-revoke"),
]
