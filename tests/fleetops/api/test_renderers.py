"""The API's JSON renderer writes exactly the bytes DRF's own renderer writes, only faster."""

from __future__ import annotations

import uuid
from collections import OrderedDict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from rest_framework.renderers import JSONRenderer as DRFJSONRenderer

from fleetops.api.renderers import JSONRenderer

VALUES = [
    {"results": [{"id": 1, "attributes": [{"key": "k", "value": "v", "index": True}]}], "next": None},
    OrderedDict([("b", 1), ("a", [1.5, -2, None, False])]),
    {"at": datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), "day": date(2026, 1, 2)},
    {"naive": datetime(2026, 1, 2, 3, 4, 5), "span": timedelta(minutes=3)},
    {"amount": Decimal("12.50"), "id": uuid.UUID(int=7)},
    {"text": 'é ü 漢字 \u2028 \u2029 \\ " \n \t', "emoji": "🙂"},
    {1: "int key", "nested": {"deep": [[[]]]}},
    {"huge": 2**80, "negative": -(2**70)},
    [],
    "plain",
]


@pytest.mark.parametrize("value", VALUES)
def test_the_bytes_are_drfs_bytes(value):
    ours = JSONRenderer().render(value, "application/json", {})
    theirs = DRFJSONRenderer().render(value, "application/json", {})
    assert ours == theirs


def test_an_indented_request_is_rendered_by_drf():
    value = {"a": [1, 2]}
    context = {"indent": 2}
    assert JSONRenderer().render(value, "application/json; indent=2", context) == DRFJSONRenderer().render(
        value, "application/json; indent=2", context
    )


def test_nothing_renders_as_no_body():
    assert JSONRenderer().render(None) == b""
