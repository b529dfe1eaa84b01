"""What counts as a dependency outage, for the loops (`commands.TickCommand`), the API's error
handler and the web's database-unavailable page.

PostgreSQL going away surfaces as Django's OperationalError (connect refused, server closed the
connection) or InterfaceError (a connection that was already closed); a broker that cannot take a
publish surfaces as kombu's OperationalError.
"""

from __future__ import annotations

import logging

import kombu.exceptions
from django.db import InterfaceError, OperationalError, connections

log = logging.getLogger(__name__)

DATABASE_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError)
BROKER_ERRORS: tuple[type[Exception], ...] = (kombu.exceptions.OperationalError,)

DATABASE_UNAVAILABLE = "database_unavailable"
BROKER_UNAVAILABLE = "broker_unavailable"
TICK_FAILED = "tick_failed"

# What a client is told to wait before retrying during a database outage (Retry-After).
RETRY_AFTER_SECONDS = 10
DATABASE_UNAVAILABLE_MESSAGE = (
    "The database is unavailable; nothing was changed. Retry after the number of seconds in Retry-After."
)


def outage_reason(exc: BaseException) -> str:
    """Why something failed, as heartbeats, logs and error codes say it."""
    if isinstance(exc, DATABASE_ERRORS):
        return DATABASE_UNAVAILABLE
    if isinstance(exc, BROKER_ERRORS):
        return BROKER_UNAVAILABLE
    return TICK_FAILED


def close_db_connections() -> None:
    """Drop every database connection of this process; the next query opens a fresh one."""
    for conn in connections.all(initialized_only=True):
        try:
            conn.close()
        except Exception:  # a broken socket may fail to close cleanly; it is dropped either way
            log.debug("closing database connection %s failed", conn.alias, exc_info=True)


def one_line(exc: BaseException) -> str:
    """`OperationalError: connection failed: ...` on one line, for heartbeats and CommandError."""
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"[:500]
