"""Filter pieces the domain APIs share: whole-number filters, ISO 8601 instants read in UTC, and a
height range whose ends must be in order (a 400 naming `height_max` otherwise)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import django_filters
from django import forms
from django.core.exceptions import ValidationError
from django_filters.fields import IsoDateTimeField

HEIGHT_ORDER = "height_min must not be above height_max"
INSTANT_OUT_OF_RANGE = "This instant is outside the years 1 to 9999 in UTC."


class IntegerFilter(django_filters.NumberFilter):
    field_class = forms.IntegerField


class UtcIsoDateTimeField(IsoDateTimeField):
    """An ISO 8601 instant, converted to UTC before it reaches a query. Python accepts offsets up to
    ±23:59, PostgreSQL only up to ±15:59: passed through as given, `+21:38` failed the query (a 500)."""

    def to_python(self, value: Any) -> datetime | None:
        parsed = super().to_python(value)
        if parsed is None:
            return None
        try:
            return parsed.astimezone(UTC)
        except OverflowError:
            raise ValidationError(INSTANT_OUT_OF_RANGE, code="invalid")


class UtcIsoDateTimeFilter(django_filters.IsoDateTimeFilter):
    field_class = UtcIsoDateTimeField


class HeightRangeForm(forms.Form):
    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        low, high = data.get("height_min"), data.get("height_max")
        if low is not None and high is not None and low > high:
            self.add_error("height_max", HEIGHT_ORDER)
        return data
