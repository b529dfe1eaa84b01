"""Keyset (seek) pagination with an opaque, signed cursor.

A page costs the same at any depth: `WHERE (k1, k2) < (last k1, last k2) ORDER BY k1 DESC, k2 DESC
LIMIT n + 1`. The cursor is signed with SECRET_KEY and bound to the organization, the path and the
filters it was issued for, so a tampered cursor or one replayed against other filters is a 400
instead of a silently wrong page. No COUNT(*) is ever run.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.conf import settings
from django.core import signing
from django.db.models import Model, Q
from rest_framework.pagination import BasePagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.urls import replace_query_param

from fleetops.lib.errors import ValidationFailed

CURSOR_INVALID = "The cursor is invalid or was tampered with; start again from the first page."
CURSOR_MISMATCH = "The cursor belongs to another query (organization, path or filters changed)."
PAGE_SIZE_INVALID = "page_size must be an integer between 1 and {max}."
_SALT = "fleetops.api.cursor"


def _encode_value(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal | UUID):
        return str(value)
    return value


def _attname(model: type[Model], term: str) -> str:
    name = term.lstrip("-")
    field: Any = model._meta.pk if name in ("id", "pk") else model._meta.get_field(name)
    return str(field.attname)


class KeysetPagination(BasePagination):
    cursor_query_param = "cursor"
    page_size_query_param = "page_size"
    default_ordering: tuple[str, ...] = ("-id",)

    def __init__(self) -> None:
        self.next_cursor: str | None = None
        self.request: Request | None = None

    # --- request parsing --------------------------------------------------------------------------
    def get_page_size(self, request: Request) -> int:
        raw = request.query_params.get(self.page_size_query_param)
        maximum = settings.FLEETOPS_API_MAX_PAGE_SIZE
        if raw is None:
            return int(settings.FLEETOPS_API_PAGE_SIZE)
        try:
            size = int(raw)
        except ValueError:
            size = 0
        if not 1 <= size <= maximum:
            message = PAGE_SIZE_INVALID.format(max=maximum)
            raise ValidationFailed(message, fields={self.page_size_query_param: [message]})
        return size

    def binding(self, request: Request) -> str:
        access = getattr(request, "_fleetops_org_access", None)
        params = sorted(
            (key, value)
            for key, values in request.query_params.lists()
            if key not in (self.cursor_query_param, self.page_size_query_param)
            for value in values
        )
        material = json.dumps([access.org.pk if access else None, request.path, params])
        return hashlib.sha256(material.encode()).hexdigest()[:24]

    def decode_cursor(self, raw: str, binding: str) -> list[Any]:
        try:
            payload = signing.loads(raw, salt=_SALT)
        except signing.BadSignature:
            raise ValidationFailed(CURSOR_INVALID, code="invalid_cursor", fields={"cursor": [CURSOR_INVALID]})
        if not isinstance(payload, dict) or not isinstance(payload.get("p"), list):
            raise ValidationFailed(CURSOR_INVALID, code="invalid_cursor", fields={"cursor": [CURSOR_INVALID]})
        if payload.get("b") != binding:
            raise ValidationFailed(
                CURSOR_MISMATCH, code="invalid_cursor", fields={"cursor": [CURSOR_MISMATCH]}
            )
        return list(payload["p"])

    # --- query --------------------------------------------------------------------------------------
    @staticmethod
    def position_values(model: type[Model], ordering: tuple[str, ...], position: list[Any]) -> list[Any]:
        """The cursor's position as Python values of the ordering's fields (a 400 when it is not)."""
        if len(position) != len(ordering):
            raise ValidationFailed(CURSOR_INVALID, code="invalid_cursor", fields={"cursor": [CURSOR_INVALID]})
        values = []
        for term, raw in zip(ordering, position, strict=True):
            name = term.lstrip("-")
            field: Any = model._meta.pk if name in ("id", "pk") else model._meta.get_field(name)
            try:
                values.append(field.to_python(raw))
            except Exception:
                raise ValidationFailed(
                    CURSOR_INVALID, code="invalid_cursor", fields={"cursor": [CURSOR_INVALID]}
                )
        return values

    @classmethod
    def seek_filter(cls, model: type[Model], ordering: tuple[str, ...], position: list[Any]) -> Q:
        """Rows strictly after `position` in `ordering` (each key ascending or "-"descending)."""
        values = cls.position_values(model, ordering, position)
        keys = [
            (_attname(model, term), term.startswith("-"), value)
            for term, value in zip(ordering, values, strict=True)
        ]
        condition = Q()
        for i, (name, descending, value) in enumerate(keys):
            step = Q(**{f"{name}__{'lt' if descending else 'gt'}": value})
            for prev_name, _, prev_value in keys[:i]:
                step &= Q(**{prev_name: prev_value})
            condition |= step
        if len(keys) == 1:
            return condition
        # The redundant bound on the leading key lets PostgreSQL start an index range scan there.
        lead_name, lead_desc, lead_value = keys[0]
        return Q(**{f"{lead_name}__{'lte' if lead_desc else 'gte'}": lead_value}) & condition

    def paginate_queryset(self, queryset: Any, request: Request, view: Any = None) -> list[Any]:
        ordering: tuple[str, ...] = tuple(getattr(view, "keyset_ordering", self.default_ordering))
        model = queryset.model

        def fetch(after: list[Any] | None, limit: int) -> list[Any]:
            qs = queryset.order_by(*ordering)
            if after is not None:
                qs = qs.filter(self.seek_filter(model, ordering, after))
            return list(qs[:limit])

        return self.paginate_rows(fetch, model, request, view)

    def paginate_rows(
        self,
        fetch: Callable[[list[Any] | None, int], list[Any]],
        model: type[Model],
        request: Request,
        view: Any = None,
    ) -> list[Any]:
        """A page from `fetch(after, limit)`: up to `limit` rows strictly after the position `after`
        (None: from the start) in the view's `keyset_ordering`, as model instances or dicts. For a
        view that reads its hot page with its own SQL; `paginate_queryset` fetches with the ORM."""
        self.request = request
        ordering: tuple[str, ...] = tuple(getattr(view, "keyset_ordering", self.default_ordering))
        page_size = self.get_page_size(request)
        binding = self.binding(request)
        raw = request.query_params.get(self.cursor_query_param)
        after = self.position_values(model, ordering, self.decode_cursor(raw, binding)) if raw else None
        rows = fetch(after, page_size + 1)
        self.next_cursor = None
        if len(rows) > page_size:
            rows = rows[:page_size]
            last = rows[-1]
            # Rows are model instances, or dicts when the view reads `.values(...)`.
            attnames = [_attname(model, t) for t in ordering]
            if isinstance(last, dict):
                position = [_encode_value(last[a]) for a in attnames]
            else:
                position = [_encode_value(getattr(last, a)) for a in attnames]
            self.next_cursor = signing.dumps({"p": position, "b": binding}, salt=_SALT, compress=True)
        return rows

    def get_paginated_response(self, data: Any) -> Response:
        next_url = None
        if self.next_cursor and self.request is not None:
            next_url = replace_query_param(
                self.request.build_absolute_uri(), self.cursor_query_param, self.next_cursor
            )
        return Response(
            OrderedDict([("results", data), ("next_cursor", self.next_cursor), ("next", next_url)])
        )

    def get_paginated_response_schema(self, schema: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["results", "next_cursor", "next"],
            "properties": {
                "results": schema,
                "next_cursor": {
                    "type": "string",
                    "nullable": True,
                    "description": "Opaque; pass as ?cursor=",
                },
                "next": {"type": "string", "nullable": True, "format": "uri"},
            },
        }

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": self.cursor_query_param,
                "required": False,
                "in": "query",
                "description": "Opaque cursor from the previous page's next_cursor.",
                "schema": {"type": "string"},
            },
            {
                "name": self.page_size_query_param,
                "required": False,
                "in": "query",
                "description": f"Rows per page (1-{settings.FLEETOPS_API_MAX_PAGE_SIZE}).",
                "schema": {"type": "integer"},
            },
        ]
