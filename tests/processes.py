"""Helpers for tests that run the portal's commands as real processes against the test database."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


def database_url(*, application_name: str = "") -> str:
    """The URL of the database this test runs on (the embedded server listens on a socket
    directory, which goes into the URL percent-encoded)."""
    db = connection.settings_dict
    host = db.get("HOST") or "localhost"
    host = quote(host, safe="") if host.startswith("/") else host
    credentials = quote(db["USER"], safe="") + (
        f":{quote(db['PASSWORD'], safe='')}" if db.get("PASSWORD") else ""
    )
    url = f"postgresql://{credentials}@{host}:{db['PORT'] or 5432}/{db['NAME']}"
    return f"{url}?application_name={application_name}" if application_name else url


def subprocess_env(*, application_name: str = "", **extra: str) -> dict[str, str]:
    """The environment for a `manage.py` subprocess that works on the test database."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "fleetops.settings.test",
        "DATABASE_URL": database_url(application_name=application_name),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }
