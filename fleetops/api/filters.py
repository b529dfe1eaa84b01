"""Filter pieces the domain APIs share: whole-number filters and a height range whose ends must be
in order (a 400 naming `height_max` otherwise)."""

from __future__ import annotations

from typing import Any

import django_filters
from django import forms

HEIGHT_ORDER = "height_min must not be above height_max"


class IntegerFilter(django_filters.NumberFilter):
    field_class = forms.IntegerField


class HeightRangeForm(forms.Form):
    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        low, high = data.get("height_min"), data.get("height_max")
        if low is not None and high is not None and low > high:
            self.add_error("height_max", HEIGHT_ORDER)
        return data
