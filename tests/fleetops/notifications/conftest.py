from __future__ import annotations

from tests.migrations_app.keys_fixtures import receiver

__all__ = ["receiver"]
