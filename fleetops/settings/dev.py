"""Local development and the demo. Reads var/dev.env (written by the demo) for unset variables,
so `./manage.py shell` talks to the demo's embedded PostgreSQL and broker."""

from __future__ import annotations

import os
from pathlib import Path

_DEV_ENV = Path(os.environ.get("FLEETOPS_VAR_DIR", Path(__file__).resolve().parents[2] / "var")) / "dev.env"
if _DEV_ENV.exists():
    for _line in _DEV_ENV.read_text().splitlines():
        _key, _sep, _value = _line.partition("=")
        if _sep and _key.strip() and not _key.startswith("#"):
            os.environ.setdefault(_key.strip(), _value.strip())

os.environ.setdefault("SECRET_KEY", "dev-only-insecure-key-never-use-in-production")
os.environ.setdefault("LOG_FORMAT", "text")
if "DATABASE_URL" not in os.environ:
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(
        "DATABASE_URL is not set. Run ./scripts/demo (it starts an embedded PostgreSQL and writes "
        "var/dev.env) or export DATABASE_URL=postgresql://user@host:5432/dbname."
    )
os.environ.setdefault("CELERY_BROKER_URL", "filesystem://localhost/")

from fleetops.settings.base import *  # noqa: E402,F403

DEBUG = True
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]", "testserver"]
