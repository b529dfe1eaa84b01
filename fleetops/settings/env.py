"""Typed environment helpers that fail loudly.

A misspelt boolean or a non-numeric port must stop the process at start-up with the variable's
name in the message, not turn into a silent default three layers down.
"""

from __future__ import annotations

import os
import re
import ssl
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


_RATE = re.compile(r"^[1-9][0-9]*/(s|sec|second|m|min|minute|h|hour|d|day)$")


def env_rate(name: str, default: str = _MISSING, *, environ: Mapping[str, str] | None = None) -> str:
    """A DRF throttle rate, `<requests>/<second|minute|hour|day>` (`20/min`), checked at start-up
    rather than on the first throttled request."""
    value = env_str(name, default, environ=environ).strip()
    if not _RATE.match(value):
        raise ImproperlyConfigured(f"{name}={value!r} is not a rate like 20/min (per s, min, hour or day).")
    return value


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
    # A server that vanished without closing the socket (host down, network partition) must fail a
    # connect in seconds, so loops back off and the web answers 503 instead of hanging a worker.
    # `?connect_timeout=N` in the URL overrides it.
    config.setdefault("OPTIONS", {}).setdefault("connect_timeout", 10)
    return config


# Celery's brokers by URL scheme. `filesystem://` (the demo's embedded broker) and `memory://` (the
# tests) only work inside one machine or one process; production refuses them.
BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp", "filesystem", "memory")
NETWORK_BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp")
CACHE_SCHEMES = ("redis", "rediss")


def _scheme(url: str) -> str:
    scheme, sep, _ = url.partition("://")
    return scheme.lower() if sep else ""


def env_broker_url(
    name: str = "CELERY_BROKER_URL",
    default: str = _MISSING,
    *,
    schemes: tuple[str, ...] = BROKER_SCHEMES,
    environ: Mapping[str, str] | None = None,
) -> str:
    """A Celery broker URL whose transport FleetOps supports; a typo'd scheme would otherwise only
    surface when the first task is sent."""
    url = env_str(name, default, environ=environ)
    scheme = _scheme(url)
    if scheme not in schemes:
        raise ImproperlyConfigured(
            f"{name} must be a broker URL starting with one of "
            f"{', '.join(s + '://' for s in schemes)}; got {scheme + '://' if scheme else repr(url)}."
        )
    return url


def env_cache(name: str = "CACHE_URL", *, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The default cache: Redis when the URL says so, else the database cache (shared by every web
    process without extra infrastructure). Anything else is refused rather than silently ignored."""
    url = env_str(name, "", environ=environ)
    if not url:
        return {"BACKEND": "django.core.cache.backends.db.DatabaseCache", "LOCATION": "fleetops_cache"}
    if _scheme(url) not in CACHE_SCHEMES:
        raise ImproperlyConfigured(
            f"{name} must start with redis:// or rediss:// (or be unset for the database cache)."
        )
    return {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url}


def broker_ssl_options(url: str) -> dict[str, Any] | None:
    """`rediss://` without `ssl_cert_reqs` in the URL: require a valid certificate. kombu's own
    default in that case is no verification at all (with a warning)."""
    if _scheme(url) == "rediss" and "ssl_cert_reqs" not in url:
        return {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return None
