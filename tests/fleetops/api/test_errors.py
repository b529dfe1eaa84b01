"""Every error under /api/ has the one shape, and nothing a client sends produces a 500 page."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.urls")]


def _assert_shape(response, status, code):
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "fields"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]


def test_malformed_json_is_400(operator):
    response = operator.session().post("/api/v1/tokens/", data='{"name": ', content_type="application/json")
    _assert_shape(response, 400, "malformed_request")


def test_validation_errors_name_their_fields(operator):
    error = _assert_shape(
        operator.session().post("/api/v1/tokens/", {"name": "", "role": "emperor"}, format="json"),
        400,
        "validation_error",
    )
    assert set(error["fields"]) == {"name", "role"}


def test_unknown_api_paths_are_404(db, client):
    _assert_shape(client.get("/api/v1/does-not-exist/"), 404, "not_found")
    _assert_shape(client.get("/api/v2/"), 404, "not_found")


def test_wrong_method_is_405(viewer):
    _assert_shape(viewer.session().put("/api/v1/audit/"), 405, "method_not_allowed")


def test_unsupported_media_type_is_415(operator):
    response = operator.session().post("/api/v1/tokens/", data="name=x", content_type="text/csv")
    _assert_shape(response, 415, "unsupported_media_type")


def test_an_unexpected_crash_is_a_500_in_the_shape_with_a_request_id(viewer):
    client = viewer.session()
    client.raise_request_exception = False
    response = client.get("/api/v1/test/crash/")
    error = _assert_shape(response, 500, "internal_error")
    assert "unexpected" not in error["message"]
    assert response["X-Request-ID"]


def test_a_conflict_from_a_service_keeps_its_code(operator):
    response = operator.session().post("/api/v1/test/command/", {"fail": "conflict"}, format="json")
    _assert_shape(response, 409, "refused")


def test_non_api_paths_keep_html_error_pages(db, client):
    response = client.get("/no-such-page/")
    assert response.status_code == 404
    assert "application/json" not in response["Content-Type"]
