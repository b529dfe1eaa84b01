"""Shared set-up: a dedicated, migrated database on DATABASE_URL's server (or the embedded one)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any


def setup_django(db_name: str) -> Any:
    """Point Django at a fresh `db_name` and migrate it. Returns the embedded-server handle (keep it)."""
    # Before any fleetops import: `fleetops.devtools` loads the Celery app, which would otherwise
    # default the process to the development settings (DEBUG on, every query kept in memory).
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fleetops.settings.test")
    from fleetops.devtools.services import (
        drop_database,
        ensure_database,
        start_embedded_postgres,
        with_database,
    )

    server = None
    base = os.environ.get("DATABASE_URL")
    if not base:
        server, base = start_embedded_postgres()
    url = with_database(base, db_name)
    drop_database(url)
    ensure_database(url)
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return server


def median_of(runs: int, fn: Callable[[], float], *, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    samples = [fn() for _ in range(runs)]
    return statistics.median(samples), samples


class Timer:
    def __enter__(self) -> Timer:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.started


def result_line(name: str, ratio: float, goal: str, passed: bool) -> str:
    return f"RESULT {name} ratio={ratio:.2f} goal={goal} {'pass' if passed else 'FAIL'}"
