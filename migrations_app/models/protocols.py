"""Protocols, cursors and protocol state changes (seed 003)."""

from __future__ import annotations

__all__: list[str] = []
