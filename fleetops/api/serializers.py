"""The base of every API input: what a request body may contain, refused by name when it does not.

`InputSerializer` adds three rules to DRF's field validation, for every key of the body:
1. A key that is not one of the input's writable fields is refused: "Unknown field." or, for a
   field the resource has but this input cannot set (`read_only_names`, or a declared read-only
   field), "This field is read-only." DRF would drop both silently and answer as if they applied.
2. A value must have the JSON type the field declares (and the OpenAPI document says): a boolean
   is not a number, a number is not a string, a string is not a number or a boolean, an array is an
   array. DRF would coerce `true` to `1.0` and `5` to `"5"`. Integral numbers (`2.0`) are integers,
   as in JSON Schema; integers are within the signed 64-bit range PostgreSQL stores; numbers are
   finite (`1e400` parses to infinity).
3. Every error is reported against its field, all at once, in the error shape's `fields`.
The body itself (size, depth, `NaN`, repeated keys) is checked earlier by
`fleetops.api.parsers.StrictJSONParser`. Output serializers stay plain DRF serializers.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any, ClassVar

from django.core.validators import MaxValueValidator, MinValueValidator
from drf_spectacular.extensions import OpenApiSerializerExtension
from drf_spectacular.plumbing import get_doc
from rest_framework import relations, serializers

UNKNOWN_FIELD = "Unknown field."
READ_ONLY_FIELD = "This field is read-only."
WRONG_TYPE = "Expected {expected}, got {got}."
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

_STRING_FIELDS = (
    serializers.CharField,
    serializers.DateTimeField,
    serializers.DateField,
    serializers.TimeField,
    serializers.DurationField,
    serializers.UUIDField,
    relations.SlugRelatedField,
)


def json_kind(value: Any) -> str:
    """The JSON type of a parsed value, as an error message names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number" if math.isfinite(value) else "a number out of range"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _wrong(expected: str, value: Any) -> list[str]:
    return [WRONG_TYPE.format(expected=expected, got=json_kind(value))]


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return math.isfinite(value) and value.is_integer()
    return isinstance(value, int)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int)


def _items(field: serializers.Field, values: list[Any] | dict[str, Any]) -> dict[Any, Any] | None:
    pairs = enumerate(values) if isinstance(values, list) else values.items()
    errors = {key: err for key, value in pairs if (err := type_error(field, value)) is not None}
    return errors or None


def type_error(field: serializers.Field, value: Any) -> Any:
    """Why `value` does not have the JSON type `field` declares, or None when it does. Null is the
    field's own rule (`allow_null`); nested inputs check their own keys."""
    if value is None:
        return None
    if isinstance(field, serializers.ListSerializer):
        if not isinstance(value, list):
            return _wrong("an array", value)
        return _items(field.child, value) if field.child is not None else None
    if isinstance(field, serializers.Serializer):
        return None if isinstance(value, dict) else _wrong("an object", value)
    if isinstance(field, serializers.BooleanField):
        return None if isinstance(value, bool) else _wrong("true or false", value)
    if isinstance(field, serializers.IntegerField):
        return None if _is_integer(value) else _wrong("an integer", value)
    if isinstance(field, serializers.FloatField):
        return None if _is_number(value) else _wrong("a number", value)
    if isinstance(field, serializers.DecimalField):
        return None if _is_number(value) or isinstance(value, str) else _wrong("a number", value)
    if isinstance(field, serializers.MultipleChoiceField):
        if not isinstance(value, list):
            return _wrong("an array", value)
        bad = {i: _wrong("a string", v) for i, v in enumerate(value) if not isinstance(v, str)}
        return bad or None
    if isinstance(field, serializers.ChoiceField):
        if all(isinstance(key, str) for key in field.choices):
            return None if isinstance(value, str) else _wrong("a string", value)
        return None if isinstance(value, str) or _is_integer(value) else _wrong("a string", value)
    if isinstance(field, _STRING_FIELDS):
        return None if isinstance(value, str) else _wrong("a string", value)
    if isinstance(field, relations.PrimaryKeyRelatedField):
        return None if _is_integer(value) else _wrong("an integer", value)
    if isinstance(field, serializers.ListField):
        if not isinstance(value, list):
            return _wrong("an array", value)
        return _items(field.child, value)
    if isinstance(field, serializers.DictField):
        if not isinstance(value, dict):
            return _wrong("an object", value)
        return _items(field.child, value)
    # JSONField takes any JSON value; a field class without a rule is refused by a test.
    return None


def has_type_rule(field: serializers.Field) -> bool:
    """Whether `type_error` knows the field's class (the invariant test walks every input)."""
    return isinstance(
        field,
        (
            serializers.ListSerializer,
            serializers.Serializer,
            serializers.BooleanField,
            serializers.IntegerField,
            serializers.FloatField,
            serializers.DecimalField,
            serializers.ChoiceField,
            *_STRING_FIELDS,
            relations.PrimaryKeyRelatedField,
            serializers.ListField,
            serializers.DictField,
            serializers.JSONField,
        ),
    )


def _bound_integers(field: serializers.Field) -> None:
    """An integer field without its own bounds gets PostgreSQL's bigint range, so an absurd number
    is a 400 naming the field (and the schema says so), not a database error."""
    if isinstance(field, serializers.ListField | serializers.DictField):
        _bound_integers(field.child)
    if not isinstance(field, serializers.IntegerField):
        return
    if field.max_value is None:
        field.max_value = INT64_MAX
        message = field.error_messages["max_value"].format(max_value=INT64_MAX)
        field.validators.append(MaxValueValidator(INT64_MAX, message=message))
    if field.min_value is None:
        field.min_value = INT64_MIN
        message = field.error_messages["min_value"].format(min_value=INT64_MIN)
        field.validators.append(MinValueValidator(INT64_MIN, message=message))


class InputSerializer(serializers.Serializer):
    """Base of every request body (see the module docstring). `read_only_names` lists fields of
    the resource this input cannot change, so they are refused as read-only, not unknown."""

    read_only_names: ClassVar[Collection[str]] = ()

    def get_fields(self) -> dict[str, serializers.Field]:
        fields: dict[str, serializers.Field] = super().get_fields()
        for field in fields.values():
            _bound_integers(field)
        return fields

    def refusals(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """Unknown and read-only keys, and values of the wrong JSON type, by key."""
        errors: dict[str, Any] = {}
        fields = self.fields
        for key, value in data.items():
            field = fields.get(key)
            if field is None or field.read_only:
                known = field is not None or key in self.read_only_names
                errors[key] = [READ_ONLY_FIELD if known else UNKNOWN_FIELD]
            elif (problem := type_error(field, value)) is not None:
                errors[key] = problem
        return errors

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return super().to_internal_value(data)
        errors = self.refusals(data)
        if not errors:
            return super().to_internal_value(data)
        # Report DRF's own findings (a missing required field, a range) with ours, in one answer.
        valid = {k: v for k, v in data.items() if k not in errors}
        try:
            super().to_internal_value(valid)
        except serializers.ValidationError as exc:
            if isinstance(exc.detail, dict):
                errors.update({k: v for k, v in exc.detail.items() if k not in errors})
        raise serializers.ValidationError(errors)


class InputSerializerSchema(OpenApiSerializerExtension):
    """The OpenAPI document says what `InputSerializer` enforces: no properties beyond the declared
    ones (`additionalProperties: false`)."""

    target_class = InputSerializer
    match_subclasses = True

    def map_serializer(self, auto_schema: Any, direction: Any) -> Any:
        schema = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        if isinstance(schema, dict):
            # The base's docstring is about the base, not each input that inherits it.
            if schema.get("description") == get_doc(InputSerializer):
                del schema["description"]
            if direction == "request":
                schema["additionalProperties"] = False
        return schema
