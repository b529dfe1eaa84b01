"""Exponential backoff with full jitter (AWS architecture blog's "full jitter" variant)."""

from __future__ import annotations

import random


def backoff_delay(
    attempt: int, *, base: float, cap: float, jitter: bool = True, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number `attempt` (1-based)."""
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    ceiling = min(cap, base * (2 ** (attempt - 1)))
    if not jitter:
        return ceiling
    return (rng or random).uniform(0, ceiling)
