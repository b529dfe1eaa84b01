from __future__ import annotations

from django.urls import path

from migrations_app.keys.api import views

urlpatterns = [
    path("", views.KeyList.as_view(), name="keys-list"),
    path("migrate", views.KeyMigrate.as_view(), name="keys-migrate"),
    path("retry", views.KeyBulkRetry.as_view(), name="keys-bulk-retry"),
    path("groups", views.GroupList.as_view(), name="keys-groups"),
    path("<int:pk>", views.KeyDetail.as_view(), name="keys-detail"),
    path("<int:pk>/retry", views.KeyRetry.as_view(), name="keys-retry"),
]
