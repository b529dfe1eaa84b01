"""The committed OpenAPI document (docs/api/openapi.yaml) matches the code, with no warnings."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.management import call_command

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "docs" / "api" / "openapi.yaml"


@pytest.mark.django_db
def test_the_committed_schema_is_current_and_valid(tmp_path):
    generated = tmp_path / "openapi.yaml"
    call_command("spectacular", "--file", str(generated), "--validate", "--fail-on-warn")
    assert generated.read_text() == COMMITTED.read_text(), (
        "docs/api/openapi.yaml is stale: regenerate it with "
        "`./manage.py spectacular --settings fleetops.settings.test --file docs/api/openapi.yaml`"
    )


@pytest.mark.django_db
def test_the_schema_documents_token_auth_and_the_pagination(client):
    schema = client.get("/api/schema/?format=json").json()
    assert schema["components"]["securitySchemes"]["ApiToken"]["scheme"] == "bearer"
    params = {p["name"] for p in schema["paths"]["/api/v1/audit/"]["get"]["parameters"]}
    assert {"cursor", "page_size", "action", "since"} <= params


def _operations(schema):
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            yield path, method.upper(), operation


def _resolve(schema, response):
    ref = response.get("$ref")
    return schema["components"]["responses"][ref.rsplit("/", 1)[-1]] if ref else response


@pytest.mark.django_db
def test_every_operation_documents_its_errors_in_the_error_shape(client):
    schema = client.get("/api/schema/?format=json").json()
    error = schema["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    detail = schema["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"code", "message", "fields"}
    operations = list(_operations(schema))
    assert len(operations) >= 37
    assert "Error" in schema["components"]["schemas"]
    for path, method, operation in operations:
        label = f"{method} {path}"
        codes = set(operation["responses"])
        assert {"401", "403", "406", "429", "503"} <= codes, label
        assert any(c.startswith("2") for c in codes), label
        params = {(p["in"], p["name"]) for p in operation.get("parameters", [])}
        if any(where == "path" for where, _ in params):
            assert "404" in codes, label
        if "requestBody" in operation:
            assert {"400", "413", "415"} <= codes, label
        if ("header", "Idempotency-Key") in params:
            assert {"409", "422"} <= codes, label
        else:
            assert "422" not in codes, label
        if path != "/api/v1/me/":
            assert ("header", "X-FleetOps-Org") in params, label
            assert {"400", "404"} <= codes, label
        for code in (c for c in codes if not c.startswith("2")):
            response = _resolve(schema, operation["responses"][code])
            assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
            if code in ("429", "503"):
                assert "Retry-After" in response["headers"], label


@pytest.mark.django_db
def test_the_document_is_generated_once_per_process(client, monkeypatch):
    from drf_spectacular.generators import SchemaGenerator

    from fleetops.api.schema_views import schema_cache_clear

    schema_cache_clear()
    calls = []
    real = SchemaGenerator.get_schema

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SchemaGenerator, "get_schema", counting)
    first = client.get("/api/schema/?format=json")
    second = client.get("/api/schema/?format=json")
    as_yaml = client.get("/api/schema/")

    assert first.status_code == second.status_code == as_yaml.status_code == 200
    assert first.content == second.content
    assert as_yaml.content.startswith(b"openapi: 3")
    assert len(calls) == 1


@pytest.mark.django_db
def test_the_document_is_rendered_once_per_format(client, monkeypatch):
    from drf_spectacular.renderers import OpenApiJsonRenderer, OpenApiYamlRenderer

    from fleetops.api.schema_views import schema_cache_clear

    schema_cache_clear()
    renders = []
    for renderer in (OpenApiJsonRenderer, OpenApiYamlRenderer):
        real = renderer.render

        def counting(self, *args, real=real, **kwargs):
            renders.append(type(self).__name__)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(renderer, "render", counting)
    as_json = [client.get("/api/schema/?format=json") for _ in range(3)]
    as_yaml = [client.get("/api/schema/") for _ in range(3)]

    assert len({r.content for r in as_json}) == len({r.content for r in as_yaml}) == 1
    assert {r["Content-Type"] for r in as_json} == {"application/vnd.oai.openapi+json"}
    assert {r["Content-Type"] for r in as_yaml} == {"application/vnd.oai.openapi; charset=utf-8"}
    assert sorted(renders) == ["OpenApiJsonRenderer", "OpenApiYamlRenderer"]


@pytest.mark.django_db
def test_a_browser_gets_swagger_ui_at_the_schema_url(client):
    page = client.get(
        "/api/schema/", HTTP_ACCEPT="text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    )
    assert page.status_code == 200
    assert page["Content-Type"].startswith("text/html")
    html = page.content.decode()
    assert "swagger-ui" in html and "drf_spectacular_sidecar/swagger-ui-dist/" in html
    # The page loads the document as JSON (the URL is written escaped into its script).
    assert "/api/schema/?format\\u003Djson" in html
    assert "/api/schema/?format\\u003Djson" in client.get("/api/docs/").content.decode()
    as_json = client.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert as_json["Content-Type"].startswith("application/json")
    assert as_json.json()["info"]["title"] == "FleetOps API"


@pytest.mark.django_db
def test_the_served_document_is_the_committed_one(client):
    import yaml

    assert client.get("/api/schema/?format=json").json() == yaml.safe_load(COMMITTED.read_text())
