from __future__ import annotations

from django.contrib import admin
from django.urls import include, path, re_path
from django.views.generic import RedirectView

from fleetops.api.errors import api_not_found
from fleetops.api.schema_views import SchemaView, SwaggerUIView
from fleetops.observability import views as observability

api_v1 = [
    path("", include("fleetops.access.api.urls")),
    path("audit/", include("fleetops.audit.api.urls")),
    # Domain apps are included by dotted path; fleetops imports none of them.
    path("curtailment/", include("curtailment.api.urls")),
    path("indexer/", include("indexer.api.urls")),
    path("keys/", include("migrations_app.keys.api.urls")),
    path("protocols/", include("migrations_app.protocols.api.urls")),
]

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="admin:index", permanent=False)),
    path("admin/", admin.site.urls),
    path("health/live", observability.health_live, name="health-live"),
    path("health/ready", observability.health_ready, name="health-ready"),
    path("ops/status", observability.ops_status, name="ops-status"),
    path("metrics", observability.metrics, name="metrics"),
    path("api/v1/", include(api_v1)),
    # The OpenAPI document (generated once per process); a browser gets Swagger UI there too.
    path("api/schema/", SchemaView.as_view(), name="schema"),
    path("api/docs/", SwaggerUIView.as_view(url_name="schema"), name="swagger-ui"),
    # Anything else under /api/ answers in the API's error shape, in DEBUG too.
    re_path(r"^api/", api_not_found),
]

handler400 = "fleetops.api.errors.handler400"
handler403 = "fleetops.api.errors.handler403"
handler404 = "fleetops.api.errors.handler404"
handler500 = "fleetops.api.errors.handler500"
