from __future__ import annotations

from django.apps import AppConfig


class CurtailmentConfig(AppConfig):
    """Power curtailment of a device fleet (seed 001). Built on the platform; see docs/."""

    name = "curtailment"
    verbose_name = "Curtailment"
