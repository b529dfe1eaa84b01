"""What the API refuses before any view reads a body: oversized and over-deep bodies, non-JSON
numbers, repeated keys, unpaired surrogates, forms; unknown paths for every method; the browsable
API (JSON only); the rules every input serializer shares."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework import serializers
from rest_framework.test import APIClient

from fleetops.access.context import ORG_REQUIRED
from fleetops.access.models import ApiToken, Role
from fleetops.api.parsers import BODY_DUPLICATE_KEY, BODY_SURROGATE, BODY_TOO_DEEP, json_depth_exceeds
from fleetops.api.serializers import (
    READ_ONLY_FIELD,
    UNKNOWN_FIELD,
    InputSerializer,
    has_type_rule,
)
from tests.conftest import Member
from tests.factories import MembershipFactory

ROOT = Path(__file__).resolve().parents[3]
TOKENS = "/api/v1/tokens/"


def _error(response, status, code):
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "fields"}
    assert body["error"]["code"] == code
    return body["error"]


def _post_raw(client, path, raw: str | bytes, **extra):
    return client.generic("POST", path, raw, content_type="application/json", **extra)


# --- the body, before parsing --------------------------------------------------------------------


@pytest.mark.django_db
def test_a_2kb_body_nested_1000_levels_is_a_400_not_a_500(operator):
    client = operator.session()
    client.raise_request_exception = False
    deep = "[" * 1000 + "]" * 1000
    assert len(deep) == 2000

    error = _error(_post_raw(client, TOKENS, deep), 400, "malformed_request")

    assert error["message"] == BODY_TOO_DEEP.format(limit=16)
    assert not ApiToken.objects.exists()


@pytest.mark.django_db
def test_deep_objects_inside_a_field_are_refused_too(operator):
    client = operator.session()
    client.raise_request_exception = False
    deep = '{"name": ' + '{"a": ' * 500 + "1" + "}" * 500 + ', "role": "viewer"}'
    _error(_post_raw(client, TOKENS, deep), 400, "malformed_request")
    assert not ApiToken.objects.exists()


@pytest.mark.django_db
def test_a_body_over_the_limit_is_a_413(operator, settings):
    settings.FLEETOPS_API_MAX_BODY_BYTES = 2048
    body = json.dumps({"name": "x" * 4000, "role": "viewer"})

    error = _error(_post_raw(operator.session(), TOKENS, body), 413, "request_too_large")

    assert "2048" in error["message"]
    assert not ApiToken.objects.exists()


@pytest.mark.django_db
def test_the_default_limit_refuses_a_5_mb_body_and_accepts_one_just_under_it(operator):
    client = operator.session()
    huge = json.dumps({"name": "x" * (5 * 1024 * 1024), "role": "viewer"})
    _error(_post_raw(client, TOKENS, huge), 413, "request_too_large")
    # Under the limit the body is parsed, and the field's own rule answers.
    big = json.dumps({"name": "x" * (3 * 1024 * 1024), "role": "viewer"})
    error = _error(_post_raw(client, TOKENS, big), 400, "validation_error")
    assert set(error["fields"]) == {"name"}
    assert not ApiToken.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(operator, constant):
    body = '{"name": "ci", "role": "viewer", "expires_at": ' + constant + "}"
    error = _error(_post_raw(operator.session(), TOKENS, body), 400, "malformed_request")
    assert constant.lstrip("-") in error["message"]
    assert not ApiToken.objects.exists()


@pytest.mark.django_db
def test_a_repeated_key_is_refused(operator):
    body = '{"name": "ci", "role": "viewer", "role": "admin"}'
    error = _error(_post_raw(operator.session(), TOKENS, body), 400, "malformed_request")
    assert BODY_DUPLICATE_KEY.format(key="role") in error["message"]
    assert not ApiToken.objects.exists()


@pytest.mark.django_db
def test_an_unpaired_surrogate_is_refused_and_a_paired_one_is_text(operator):
    client = operator.session()
    error = _error(
        _post_raw(client, TOKENS, '{"name": "a\\ud800", "role": "viewer"}'), 400, "malformed_request"
    )
    assert error["message"] == BODY_SURROGATE
    assert not ApiToken.objects.exists()

    created = _post_raw(client, TOKENS, '{"name": "ci \\ud83d\\ude80", "role": "viewer"}')
    assert created.status_code == 201, created.content
    assert created.json()["name"] == "ci \U0001f680"


@pytest.mark.django_db
def test_invalid_utf8_is_a_400(operator):
    _error(
        _post_raw(operator.session(), TOKENS, b'{"name": "\xff", "role": "viewer"}'), 400, "malformed_request"
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("content_type", "body"),
    [("application/x-www-form-urlencoded", "name=ci&role=viewer"), ("text/plain", "{}")],
)
def test_form_and_other_bodies_are_415(operator, content_type, body):
    response = operator.session().generic("POST", TOKENS, body, content_type=content_type)
    _error(response, 415, "unsupported_media_type")
    assert not ApiToken.objects.exists()


# Nested JSON values whose strings are full of brackets, quotes and backslashes.
_json_text = st.text(alphabet=st.sampled_from('[]{}"\\ab/u0'), max_size=6)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | _json_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_json_text, children, max_size=3),
    max_leaves=30,
)


def _depth(value) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


@given(value=_json_values, limit=st.integers(min_value=0, max_value=8), indent=st.sampled_from([None, 2]))
def test_the_depth_scan_agrees_with_the_parsed_depth(value, limit, indent):
    text = json.dumps(value, indent=indent)
    assert json_depth_exceeds(text, limit) == (_depth(value) > limit)


@given(prefix=st.integers(min_value=17, max_value=40), junk=st.text(alphabet='"\\[{x', max_size=200))
def test_the_depth_scan_never_misses_brackets_before_junk(prefix, junk):
    assert json_depth_exceeds("[" * prefix + junk, 16)


def test_the_depth_scan_is_linear_on_hostile_input():
    # Quadratic scanning of unclosed strings would take minutes here.
    hostile = '"\\"' * 400_000 + "[" * 20
    assert len(hostile) > 1_000_000
    assert json_depth_exceeds(hostile, 16) is False
    assert json_depth_exceeds("[" * 17 + hostile, 16) is True


# --- unknown paths -------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "GET"])
def test_unknown_api_paths_are_a_json_404_for_every_method_without_csrf(operator, method):
    anonymous = Client(enforce_csrf_checks=True)
    signed_in = Client(enforce_csrf_checks=True)
    signed_in.force_login(operator.user)
    for client in (anonymous, signed_in):
        for path in ("/api/v1/does-not-exist/", "/api/v1/curtailment/nope", "/api/v2/"):
            response = client.generic(method, path, '{"a": 1}', content_type="application/json")
            error = _error(response, 404, "not_found")
            assert error["fields"] == {}


@pytest.mark.django_db
def test_csrf_still_protects_real_endpoints_for_sessions(operator):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(operator.user)
    response = client.post(TOKENS, {"name": "ci", "role": "viewer"}, format="json")
    _error(response, 403, "permission_denied")
    assert not ApiToken.objects.exists()


# --- JSON only: no browsable API -----------------------------------------------------------------

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.fixture
def multi_org_member(operator, other_org) -> Member:
    MembershipFactory(user=operator.user, org=other_org, role=Role.VIEWER)
    return operator


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/api/v1/audit/", "/api/v1/curtailment/events", "/api/v1/keys/", TOKENS])
def test_a_browser_as_a_user_of_several_organizations_gets_json_never_a_500(multi_org_member, path):
    client = Client()
    client.raise_request_exception = False
    client.force_login(multi_org_member.user)

    browser = client.get(path, HTTP_ACCEPT=BROWSER_ACCEPT)
    error = _error(browser, 400, "organization_required")
    assert error["message"] == ORG_REQUIRED

    html_only = client.get(path, HTTP_ACCEPT="text/html")
    _error(html_only, 406, "not_acceptable")

    # With the organization named, the browser gets the JSON a script gets.
    named = client.get(path, HTTP_ACCEPT=BROWSER_ACCEPT, HTTP_X_FLEETOPS_ORG="acme")
    assert named.status_code == 200, named.content
    assert named["Content-Type"] == "application/json"


@pytest.mark.django_db
def test_format_api_is_not_served(viewer):
    client = viewer.session()
    client.raise_request_exception = False
    response = client.get("/api/v1/audit/?format=api", HTTP_ACCEPT="text/html")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"


@pytest.mark.django_db
def test_humans_still_get_swagger_ui(viewer):
    response = viewer.session().get("/api/docs/", HTTP_ACCEPT=BROWSER_ACCEPT)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")


# --- the rules every input serializer shares -----------------------------------------------------

_INPUT_USE = re.compile(r"\b([A-Z]\w*)\(data=")
_VIEW_MODULES = [
    "fleetops/access/api/views.py",
    "fleetops/audit/api/views.py",
    "curtailment/api/views.py",
    "indexer/api/views.py",
    "migrations_app/keys/api/views.py",
    "migrations_app/protocols/api/views.py",
]


def _input_classes() -> list[type[InputSerializer]]:
    import importlib

    found: list[type] = []
    for path in _VIEW_MODULES:
        module = importlib.import_module(path[:-3].replace("/", "."))
        for name in _INPUT_USE.findall((ROOT / path).read_text()):
            found.append(getattr(module, name))
    return found


def _walk_fields(serializer: serializers.Serializer):
    for field in serializer.fields.values():
        yield field
        child = getattr(field, "child", None)
        if child is not None:
            yield child
        if isinstance(field, serializers.Serializer):
            yield from _walk_fields(field)


def test_every_body_a_view_validates_goes_through_the_strict_base():
    classes = _input_classes()
    assert len(classes) >= 12, classes
    for cls in classes:
        assert issubclass(cls, InputSerializer), f"{cls.__module__}.{cls.__name__} is not an InputSerializer"
        for field in _walk_fields(cls()):
            assert has_type_rule(field), f"{cls.__name__}.{field.field_name}: no JSON type rule for {field!r}"
            if isinstance(field, serializers.Serializer) and not isinstance(
                field, serializers.ListSerializer
            ):
                assert isinstance(field, InputSerializer), f"{cls.__name__}.{field.field_name} is not strict"


_names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=20)
_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_arbitrary_extra_keys_are_always_refused_by_name(data):
    cls = data.draw(st.sampled_from(_input_classes()))
    known = set(cls().fields)
    extra = data.draw(
        st.dictionaries(_names.filter(lambda n: n not in known), _values, min_size=1, max_size=4)
    )

    serializer = cls(data=extra)

    assert not serializer.is_valid()
    for name in extra:
        expected = READ_ONLY_FIELD if name in cls.read_only_names else UNKNOWN_FIELD
        assert serializer.errors[name] == [expected]


class _Probe(InputSerializer):
    read_only_names = ("state",)

    count = serializers.IntegerField(required=False)
    ratio = serializers.FloatField(required=False)
    flag = serializers.BooleanField(required=False)
    name = serializers.CharField(required=False)
    kind = serializers.ChoiceField(choices=[("a", "A")], required=False)
    ids = serializers.ListField(child=serializers.IntegerField(), required=False)
    created = serializers.DateTimeField(required=False, read_only=True)


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"count": True}, "count", "Expected an integer, got a boolean."),
        ({"count": "5"}, "count", "Expected an integer, got a string."),
        ({"count": 2.5}, "count", "Expected an integer, got a number."),
        ({"count": 2**63}, "count", "Ensure this value is less than or equal to 9223372036854775807."),
        ({"ratio": True}, "ratio", "Expected a number, got a boolean."),
        ({"ratio": "1.5"}, "ratio", "Expected a number, got a string."),
        ({"ratio": float("inf")}, "ratio", "Expected a number, got a number out of range."),
        ({"flag": 1}, "flag", "Expected true or false, got an integer."),
        ({"flag": "true"}, "flag", "Expected true or false, got a string."),
        ({"name": 5}, "name", "Expected a string, got an integer."),
        ({"name": ["x"]}, "name", "Expected a string, got an array."),
        ({"kind": 1}, "kind", "Expected a string, got an integer."),
        ({"ids": "1,2"}, "ids", "Expected an array, got a string."),
        ({"state": "x"}, "state", READ_ONLY_FIELD),
        ({"created": "2026-01-01T00:00:00Z"}, "created", READ_ONLY_FIELD),
        ({"bogus": 1}, "bogus", UNKNOWN_FIELD),
    ],
)
def test_each_rule_names_its_field(body, field, message):
    serializer = _Probe(data=body)
    assert not serializer.is_valid()
    assert set(serializer.errors) == {field}
    assert [str(m) for m in serializer.errors[field]] == [message]


def test_array_items_are_checked_by_index_and_valid_values_pass():
    bad = _Probe(data={"ids": [1, True, "3"]})
    assert not bad.is_valid()
    assert {k: [str(m) for m in v] for k, v in bad.errors["ids"].items()} == {
        1: ["Expected an integer, got a boolean."],
        2: ["Expected an integer, got a string."],
    }
    good = _Probe(data={"count": 2.0, "ratio": 3, "flag": False, "name": "n", "kind": "a", "ids": [1]})
    assert good.is_valid(), good.errors
    assert good.validated_data == {
        "count": 2,
        "ratio": 3.0,
        "flag": False,
        "name": "n",
        "kind": "a",
        "ids": [1],
    }


def test_all_refusals_come_in_one_answer_with_drfs_own():
    serializer = _Probe(data={"bogus": 1, "count": True, "name": "", "kind": "zz"})
    assert not serializer.is_valid()
    assert set(serializer.errors) == {"bogus", "count", "name", "kind"}
    assert serializer.errors["name"] == ["This field may not be blank."]


@pytest.mark.django_db
def test_the_schema_says_request_bodies_take_no_other_properties(client):
    schema = client.get("/api/schema/?format=json").json()
    requests = {name: c for name, c in schema["components"]["schemas"].items() if name.endswith("Request")}
    assert len(requests) >= 10
    for name, component in requests.items():
        assert component.get("additionalProperties") is False, name
