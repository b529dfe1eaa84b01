"""The one clock. Services call `now()`; tests move time with `frozen(...)` / `advance(...)`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime, timedelta

from django.utils import timezone

_global: list[datetime] = []


def now() -> datetime:
    if _global:
        return _global[-1]
    return timezone.now()


@contextlib.contextmanager
def frozen(at: datetime) -> Iterator[None]:
    """Freeze the clock for every thread (background loops in tests read it too)."""
    if timezone.is_naive(at):
        raise ValueError("frozen() needs an aware datetime")
    _global.append(at)
    try:
        yield
    finally:
        _global.pop()


def advance(delta: timedelta) -> None:
    """Move a frozen clock forward."""
    if not _global:
        raise RuntimeError("advance() needs a frozen clock")
    _global[-1] = _global[-1] + delta
