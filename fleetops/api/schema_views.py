"""Serving the OpenAPI document: generated once per process, and shown as Swagger UI to a browser.

`/api/schema/` answers YAML by default, JSON with `?format=json` or `Accept: application/json`, and
Swagger UI (drf-spectacular-sidecar's copy, served from our static files) to `Accept: text/html`;
`/api/docs/` is the same page.
"""

from __future__ import annotations

import threading
from typing import Any

from django.conf import settings
from django.urls import get_urlconf
from django.utils import translation
from drf_spectacular.plumbing import set_query_parameters
from drf_spectacular.utils import extend_schema
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.renderers import TemplateHTMLRenderer
from rest_framework.request import Request
from rest_framework.response import Response

_schemas: dict[tuple[str, str | None, str | None], dict[str, Any]] = {}
# ... and each document as sent, per renderer and media type: rendering it is the expensive part
# once it is generated (~0.1 s as JSON, ~0.4 s as YAML).
_rendered: dict[tuple[Any, ...], tuple[bytes, str]] = {}
_schemas_lock = threading.Lock()


def schema_cache_clear() -> None:
    """Forget the generated documents (tests that change the API's settings)."""
    with _schemas_lock:
        _schemas.clear()
        _rendered.clear()


class _RenderedOnce(Response):
    """The document's bytes from memory after the first time they were rendered."""

    document_key: tuple[Any, ...] = ()

    @property
    def rendered_content(self) -> Any:
        key = (*self.document_key, type(self.accepted_renderer), self.accepted_media_type)
        cached = _rendered.get(key)
        if cached is None:
            body = super().rendered_content
            cached = _rendered[key] = (bytes(body), str(self["Content-Type"]))
        self["Content-Type"] = cached[1]
        return cached[0]


class SwaggerUIRenderer(TemplateHTMLRenderer):
    """Lets a browser's `Accept: text/html` reach the schema view, which answers with Swagger UI."""

    format = "html"


class SwaggerUIView(SpectacularSwaggerView):
    """Swagger UI over the document, which it fetches as JSON."""

    def _get_schema_url(self, request: Request) -> str:
        return str(set_query_parameters(url=super()._get_schema_url(request), format="json"))


class SchemaView(SpectacularAPIView):
    """The OpenAPI document, generated and rendered on the first request and kept for the process's
    life (the API does not change while it runs). A browser gets Swagger UI instead."""

    renderer_classes = [*SpectacularAPIView.renderer_classes, SwaggerUIRenderer]

    @extend_schema(exclude=True)
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        if getattr(request.accepted_renderer, "format", None) == SwaggerUIRenderer.format:
            return SwaggerUIView().get(request)
        return super().get(request, *args, **kwargs)

    def _get_schema_response(self, request: Request) -> Response:
        version = self.api_version or request.version or self._get_version_parameter(request)
        # Per URLconf too: tests that swap ROOT_URLCONF must not get another URLconf's document.
        urlconf = str(self.urlconf or get_urlconf() or settings.ROOT_URLCONF)
        key = (urlconf, version, translation.get_language())
        schema = _schemas.get(key)
        if schema is None:
            with _schemas_lock:
                schema = _schemas.get(key)
                if schema is None:
                    generator = self.generator_class(
                        urlconf=self.urlconf, api_version=version, patterns=self.patterns
                    )
                    # Without the request: the document is the same for every caller, as the
                    # committed one (`manage.py spectacular`) is.
                    schema = generator.get_schema(request=None, public=self.serve_public)
                    _schemas[key] = schema
        filename = self._get_filename(request, version)
        response = _RenderedOnce(
            data=schema, headers={"Content-Disposition": f'inline; filename="{filename}"'}
        )
        response.document_key = key
        return response
