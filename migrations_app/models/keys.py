"""Address groups, keys and their re-stake lifecycle (seed 000)."""

from __future__ import annotations

__all__: list[str] = []
