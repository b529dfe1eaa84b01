"""The API's only body parser: JSON, bounded in size and depth before it is parsed.

1. A body larger than `FLEETOPS_API_MAX_BODY_BYTES` is a 413 `request_too_large`: the declared
   Content-Length is checked before anything is read, and at most one byte past the limit is read.
2. A body nested deeper than `FLEETOPS_API_MAX_JSON_DEPTH` is a 400 `malformed_request`, found by a
   linear scan of its brackets before `json.loads` runs: the standard parser recurses once per level
   and a 2 KB body of brackets exhausts the interpreter's stack (`RecursionError`, a 500).
3. `NaN`, `Infinity` and `-Infinity` are not JSON and are refused; so is an object that repeats a
   key, which two parsers would read as two different requests, and a string with an unpaired
   UTF-16 surrogate escape (`"\\ud800"`), which is not text.
Forms and multipart bodies are not parsed at all (415): the API is JSON only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from rest_framework import exceptions, status
from rest_framework.parsers import BaseParser
from rest_framework.renderers import JSONRenderer

BODY_TOO_LARGE = "The request body is larger than {limit} bytes."
BODY_TOO_DEEP = "The JSON body is nested deeper than {limit} levels."
BODY_NOT_UTF8 = "The request body is not valid {encoding}."
BODY_INVALID = "The request body is not valid JSON: {error}"
BODY_CONSTANT = "{constant} is not a JSON number."
BODY_DUPLICATE_KEY = "The JSON object repeats the key {key!r}."
BODY_SURROGATE = "The JSON body has an unpaired \\uD800-\\uDFFF escape, which is not text."

# One left-to-right pass: a whole string (its brackets are text), a bracket, or a lone quote that
# opens a string never closed. Possessive quantifiers keep the string branch linear.
_TOKENS = re.compile(r'"(?:[^"\\]++|\\.)*+"|[\[\]{}]|"', re.DOTALL)
# Only a \uD800-\uDFFF escape can put a surrogate into a string (the bytes were valid UTF-8).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class RequestTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request body is too large."
    default_code = "request_too_large"


def json_depth_exceeds(text: str, limit: int) -> bool:
    """Whether the JSON text opens more than `limit` arrays or objects inside one another. Linear in
    the length of the text; brackets inside strings do not count."""
    depth = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > limit:
                return True
        elif token in ("]", "}"):
            depth -= 1
        elif token == '"':
            # A string that never closes: everything after it is string text to a JSON parser, so
            # nothing nests further (and the parser refuses the body).
            return False
    return False


def _refuse_constant(constant: str) -> Any:
    raise ValueError(BODY_CONSTANT.format(constant=constant))


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(BODY_DUPLICATE_KEY.format(key=key))
            seen.add(key)
    return obj


def _declared_length(context: Mapping[str, Any]) -> int:
    request = context.get("request")
    meta = getattr(request, "META", {}) if request is not None else {}
    try:
        return int(meta.get("CONTENT_LENGTH") or 0)
    except (TypeError, ValueError):
        return 0


def parse_json_body(raw: bytes, *, encoding: str = "utf-8") -> Any:
    """The rules of this module applied to bytes already read (size, depth, constants, keys)."""
    max_bytes: int = settings.FLEETOPS_API_MAX_BODY_BYTES
    max_depth: int = settings.FLEETOPS_API_MAX_JSON_DEPTH
    if len(raw) > max_bytes:
        raise RequestTooLarge(BODY_TOO_LARGE.format(limit=max_bytes))
    try:
        text = raw.decode(encoding)
    except (UnicodeDecodeError, LookupError):
        raise exceptions.ParseError(BODY_NOT_UTF8.format(encoding=encoding))
    if json_depth_exceeds(text, max_depth):
        raise exceptions.ParseError(BODY_TOO_DEEP.format(limit=max_depth))
    try:
        value = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_refuse_duplicate_keys)
    except ValueError as exc:
        raise exceptions.ParseError(BODY_INVALID.format(error=exc))
    except RecursionError:
        # Unreachable while the depth limit is far below the interpreter's; kept so that a
        # misconfigured limit is still a 400, never a 500.
        raise exceptions.ParseError(BODY_TOO_DEEP.format(limit=max_depth))
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise exceptions.ParseError(BODY_SURROGATE)
    return value


def _has_lone_surrogate(value: Any) -> bool:
    # A lone surrogate cannot be encoded as UTF-8: PostgreSQL and the JSON renderer would fail on it.
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class StrictJSONParser(BaseParser):
    """JSON with this module's limits (see the module docstring).

    Not a subclass of DRF's JSONParser on purpose: DRF reads a JSONParser's whole body through
    `request.body` before the parser runs (a 500 `RequestDataTooBig` past Django's upload limit);
    this parser reads the stream itself, at most one byte past its own limit."""

    media_type = "application/json"
    renderer_class = JSONRenderer

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        context: Mapping[str, Any] = parser_context or {}
        max_bytes: int = settings.FLEETOPS_API_MAX_BODY_BYTES
        if _declared_length(context) > max_bytes:
            raise RequestTooLarge(BODY_TOO_LARGE.format(limit=max_bytes))
        raw = stream.read(max_bytes + 1) if stream is not None else b""
        return parse_json_body(raw, encoding=context.get("encoding") or settings.DEFAULT_CHARSET)
