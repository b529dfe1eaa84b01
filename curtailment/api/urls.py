from __future__ import annotations

from django.urls import path

from curtailment.api import views

urlpatterns = [
    path("preview", views.PreviewView.as_view(), name="curtailment-preview"),
    path("reconciler", views.ReconcilerStatus.as_view(), name="curtailment-reconciler"),
    path("events", views.EventListCreate.as_view(), name="curtailment-events"),
    path("events/<uuid:uuid>", views.EventDetail.as_view(), name="curtailment-event"),
    path("events/<uuid:uuid>/targets", views.EventTargets.as_view(), name="curtailment-event-targets"),
    path("events/<uuid:uuid>/stop", views.EventStop.as_view(), name="curtailment-event-stop"),
    path("events/<uuid:uuid>/terminate", views.EventTerminate.as_view(), name="curtailment-event-terminate"),
]
