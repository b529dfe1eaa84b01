from __future__ import annotations

from django.urls import path

from fleetops.audit.api import views

urlpatterns = [
    path("", views.AuditEventList.as_view(), name="audit-list"),
    path("<int:pk>/", views.AuditEventDetail.as_view(), name="audit-detail"),
]
