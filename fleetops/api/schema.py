"""The OpenAPI document's additions: the portal's token authentication, and the error responses of
every operation, declared here once instead of on each view.

Every operation lists the errors it can answer, all in the one error shape
`{"error": {"code", "message", "fields"}}` (`fleetops.api.errors`):

- every authenticated operation: 401 (no or bad credentials), 403 (role too low, or a session
  request without its CSRF token), 406 (an `Accept` the API cannot answer), 429 (rate limit, with
  `Retry-After`) and 503 (database unavailable, with `Retry-After`);
- operations scoped to an organization: 400 (`organization_required`: a session user of several
  organizations names none) and 404 (`organization_not_found`, or the object in the path is not
  the organization's); they also accept the `X-FleetOps-Org` header;
- operations with a body or query parameters: 400; with a body: 413 (too large) and 415 (not JSON);
- operations accepting `Idempotency-Key`: 409 (same key in flight, or a state conflict) and 422
  (same key, different request); PATCH/PUT/DELETE: 409.
An error a view declares itself keeps its description and gets the error shape as its content.
Query parameters take `allowEmptyValue` (filters and the cursor read an empty value as absent),
except those in `EMPTY_IS_INVALID`.

The views serving the document are in `fleetops.api.schema_views` (drf-spectacular's views read
the schema class from the settings while this module loads).
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiParameter
from rest_framework import serializers
from rest_framework.permissions import AllowAny

from fleetops.access.context import ORG_HEADER
from fleetops.access.permissions import OrgRolePermission

ORG_PARAM = OpenApiParameter(
    ORG_HEADER,
    str,
    OpenApiParameter.HEADER,
    required=False,
    description=(
        "Organization slug for session requests of users in several organizations. A token is bound "
        "to one organization: naming another is a 404."
    ),
)

ERROR_DESCRIPTIONS = {
    "400": "Invalid input: `validation_error` (`fields` names each field), `malformed_request`, "
    "`invalid_cursor`, `invalid_idempotency_key`, `organization_required`.",
    "401": "`not_authenticated` or `authentication_failed` (bad, expired or revoked token).",
    "403": "`permission_denied`: the message names the role this needs, or a session request lacks "
    "its CSRF token, or the operation needs an interactive session.",
    "404": "`not_found` (not this organization's, or no such object) or `organization_not_found`.",
    "406": "`not_acceptable`: the API answers only `application/json`.",
    "409": "`idempotency_in_flight` (retry shortly), `race_lost` or another state conflict.",
    "413": "`request_too_large`: the body is larger than the API accepts.",
    "415": "`unsupported_media_type`: send `application/json`.",
    "422": "`idempotency_key_reused`: the key was used with a different request.",
    "429": "`throttled`: wait `Retry-After` seconds.",
    "503": "`database_unavailable`: nothing was changed; retry after `Retry-After` seconds.",
}
ERROR_RESPONSES = {
    "400": "BadRequest",
    "401": "Unauthorized",
    "403": "Forbidden",
    "404": "NotFound",
    "406": "NotAcceptable",
    "409": "Conflict",
    "413": "RequestTooLarge",
    "415": "UnsupportedMediaType",
    "422": "Unprocessable",
    "429": "Throttled",
    "503": "Unavailable",
}
RETRY_AFTER = {
    "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait before retrying."}
}
# Query parameters for which an empty value is a 400, not "absent".
EMPTY_IS_INVALID = ("page_size",)


class ErrorDetail(serializers.Serializer):
    code = serializers.CharField(help_text="Stable, machine-readable.")
    message = serializers.CharField(help_text="For humans; may change.")
    # A declared field, not Serializer.fields: DRF's metaclass takes it out of the class body.
    fields = serializers.DictField(  # type: ignore[assignment]
        help_text="Per-field messages for validation errors (field name to a list of messages, or "
        "nested for nested fields); empty otherwise."
    )


class Error(serializers.Serializer):
    error = ErrorDetail()


class FleetOpsAutoSchema(AutoSchema):
    """drf-spectacular's AutoSchema plus the error responses each operation can answer."""

    def _view_method(self) -> Any:
        return getattr(self.view, self.method.lower(), None)

    def _permissions(self) -> list[Any]:
        return list(self.view.get_permissions())

    def _authenticated(self) -> bool:
        return not all(isinstance(p, AllowAny) for p in self._permissions())

    def _org_scoped(self) -> bool:
        return any(isinstance(p, OrgRolePermission) for p in self._permissions())

    def _accepts_idempotency_key(self) -> bool:
        return bool(getattr(self._view_method(), "idempotent", False))

    def get_override_parameters(self) -> list[Any]:
        params = list(super().get_override_parameters())
        named = {getattr(p, "name", None) for p in params}
        if self._org_scoped() and ORG_HEADER not in named:
            params.append(ORG_PARAM)
        return params

    def error_statuses(self, *, has_body: bool, has_params: bool) -> list[str]:
        codes: set[str] = set()
        if self._authenticated():
            codes |= {"401", "403", "406", "429", "503"}
        if self._org_scoped():
            codes |= {"400", "404"}
        if has_body or has_params:
            codes.add("400")
        if has_body:
            codes |= {"413", "415"}
        if self._accepts_idempotency_key():
            codes |= {"400", "409", "422"}
        if self.method in ("PUT", "PATCH", "DELETE"):
            codes.add("409")
        return sorted(codes)

    def get_operation(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        operation = super().get_operation(*args, **kwargs)
        if operation is None:
            return None
        params = operation.get("parameters", [])
        for param in params:
            if param.get("in") == "query" and param.get("name") not in EMPTY_IS_INVALID:
                # Filters and the cursor read an empty value as absent (django-filter's rule).
                param["allowEmptyValue"] = True
        has_params = any(p.get("in") in ("query", "path") for p in params)
        has_body = "requestBody" in operation
        responses = operation["responses"]
        error = self.resolve_serializer(Error, "response")
        for code, response in responses.items():
            # An error a view declares with a description only still has the one error shape.
            if code[0] in "45" and "$ref" not in response and "content" not in response:
                response["content"] = {"application/json": {"schema": error.ref}}
        for code in self.error_statuses(has_body=has_body, has_params=has_params):
            responses.setdefault(code, {"$ref": f"#/components/responses/{ERROR_RESPONSES[code]}"})
        operation["responses"] = dict(sorted(responses.items()))
        return operation


def error_responses_hook(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: the shared error responses the operations refer to."""
    responses = result.setdefault("components", {}).setdefault("responses", {})
    for code, name in ERROR_RESPONSES.items():
        response: dict[str, Any] = {
            "description": ERROR_DESCRIPTIONS[code],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        if code in ("429", "503"):
            response["headers"] = RETRY_AFTER
        responses[name] = response
    return result


class ApiTokenScheme(OpenApiAuthenticationExtension):
    target_class = "fleetops.access.authentication.ApiTokenAuthentication"
    name = "ApiToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "fo_<key id>_<secret>",
            "description": "A per-user API token, bound to one organization and a role.",
        }
