"""Typed environment helpers that fail loudly.

A misspelt boolean or a non-numeric port must stop the process at start-up with the variable's
name in the message, not turn into a silent default three layers down.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_MISSING: Any = object()


def _raw(name: str, environ: Mapping[str, str] | None) -> str | None:
    return (os.environ if environ is None else environ).get(name)


def env_str(name: str, default: str = _MISSING, *, environ: Mapping[str, str] | None = None) -> str:
    value = _raw(name, environ)
    if value is None or value == "":
        if default is _MISSING:
            raise ImproperlyConfigured(f"Environment variable {name} is required but not set.")
        return str(default)
    return value


def env_bool(name: str, default: bool = _MISSING, *, environ: Mapping[str, str] | None = None) -> bool:
    value = _raw(name, environ)
    if value is None:
        if default is _MISSING:
            raise ImproperlyConfigured(f"Environment variable {name} is required but not set.")
        return bool(default)
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ImproperlyConfigured(
        f"{name}={value!r} is not a boolean; use one of 1/0, true/false, yes/no, on/off."
    )


def env_int(
    name: str,
    default: int = _MISSING,
    *,
    min_value: int | None = None,
    max_value: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    value = _raw(name, environ)
    if value is None or value.strip() == "":
        if default is _MISSING:
            raise ImproperlyConfigured(f"Environment variable {name} is required but not set.")
        return int(default)
    try:
        parsed = int(value.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer.")
    if min_value is not None and parsed < min_value:
        raise ImproperlyConfigured(f"{name}={parsed} is below the minimum {min_value}.")
    if max_value is not None and parsed > max_value:
        raise ImproperlyConfigured(f"{name}={parsed} is above the maximum {max_value}.")
    return parsed


def env_list(
    name: str, default: list[str] = _MISSING, *, environ: Mapping[str, str] | None = None
) -> list[str]:
    value = _raw(name, environ)
    if value is None:
        if default is _MISSING:
            raise ImproperlyConfigured(f"Environment variable {name} is required but not set.")
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]


def env_choice(
    name: str, choices: tuple[str, ...], default: str = _MISSING, *, environ: Mapping[str, str] | None = None
) -> str:
    value = env_str(name, default, environ=environ)
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} is not one of {', '.join(choices)}.")
    return value


def env_database(
    name: str = "DATABASE_URL", *, conn_max_age: int = 60, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Parse a PostgreSQL URL; anything but PostgreSQL is refused because the schema relies on it."""
    url = env_str(name, environ=environ)
    try:
        config: dict[str, Any] = dict(dj_database_url.parse(url, conn_max_age=conn_max_age))
    except Exception as exc:  # dj-database-url raises several types for malformed URLs
        raise ImproperlyConfigured(f"{name} is not a valid database URL: {exc}")
    if config.get("ENGINE") != "django.db.backends.postgresql":
        raise ImproperlyConfigured(
            f"{name} must point at PostgreSQL (postgresql://...); FleetOps relies on PostgreSQL features."
        )
    config["CONN_HEALTH_CHECKS"] = True
    return config
