"""Request counters for the API's rate limits: one statement (or one Redis round trip) per count.

A counter is `(key, fixed window)`: `<scope>:<client>` counted in windows of the rate's duration
aligned to the epoch (`20/min` counts 12:00:00-12:00:59, then starts again at 0). Where they live:

- **Redis**, when the default cache is Redis (`CACHE_URL=redis://…`): `INCR` + `EXPIRE` in one
  pipelined round trip, atomic for every worker on every host.
- **PostgreSQL** otherwise (the embedded default): `api_ratecounter`, an UNLOGGED table, counted by
  one `INSERT … ON CONFLICT DO UPDATE … RETURNING`. The row lock makes the count exact for any
  number of gunicorn workers and hosts, which an in-process counter is not (each worker would
  allow the whole rate: N workers, N times the limit, and N times the token guesses). UNLOGGED
  because a counter is worth no WAL: the commit of a transaction that wrote only unlogged rows is
  not flushed to disk, and what a crash loses is at most one window of counts.

Django's database cache, which the throttles used before, costs ~6 statements per request (read,
cull count, savepoint, select, write, release) and (un)pickles DRF's list of timestamps each time.
A fixed window lets a client send up to twice the rate across a window boundary; for a guard
against abuse that is the accepted price of an O(1) counter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache
from django.db import connection

from fleetops.lib import clock

TABLE = "api_ratecounter"
# Table name from this module, values are parameters.
_HIT_SQL = (
    f"INSERT INTO {TABLE} AS c (key, window_start, hits) VALUES (%s, %s, 1) "  # noqa: S608
    "ON CONFLICT (key) DO UPDATE SET "
    "hits = CASE WHEN c.window_start = EXCLUDED.window_start THEN c.hits + 1 ELSE 1 END, "
    "window_start = EXCLUDED.window_start "
    "RETURNING hits"
)
_PEEK_SQL = f"SELECT hits FROM {TABLE} WHERE key = %s AND window_start = %s"  # noqa: S608
# Rows of clients that went quiet; the idempotency prune deletes them with its own rows.
PRUNE_AFTER_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Rate:
    limit: int
    seconds: int

    @classmethod
    def parse(cls, text: str) -> Rate:
        """`<n>/<s|sec|m|min|h|hour|d|day>` as DRF writes rates (checked at start-up by env_rate)."""
        count, _, period = text.partition("/")
        return cls(int(count), {"s": 1, "m": 60, "h": 3600, "d": 86400}[period[0]])

    def window(self, now: float) -> int:
        return int(now // self.seconds) * self.seconds


@dataclass(frozen=True)
class Count:
    """Requests counted in the current window, and the seconds until the window ends."""

    hits: int
    wait: float

    def over(self, rate: Rate) -> bool:
        return self.hits > rate.limit


def _redis(cache_alias: str = "default") -> tuple[Any, Any] | None:
    cache = caches[cache_alias]
    if isinstance(cache, RedisCache):
        return cache, cache._cache.get_client(write=True)
    return None


def _current_window(rate: Rate) -> tuple[int, float]:
    """The start of the window `now` falls in, and the seconds until it ends."""
    now = clock.now().timestamp()
    window = rate.window(now)
    return window, window + rate.seconds - now


def hit(key: str, rate: Rate) -> Count:
    """Count one request under `key`; the result includes it."""
    window, wait = _current_window(rate)
    redis = _redis()
    if redis is not None:
        cache, client = redis
        name = cache.make_key(f"rl:{key}:{window}")
        pipe = client.pipeline(transaction=False)
        pipe.incr(name)
        pipe.expire(name, rate.seconds + 1)
        hits, _ = pipe.execute()
        return Count(int(hits), wait)
    with connection.cursor() as cursor:
        cursor.execute(_HIT_SQL, [key, window])
        return Count(int(cursor.fetchone()[0]), wait)


def peek(key: str, rate: Rate) -> Count:
    """The count under `key` without adding to it."""
    window, wait = _current_window(rate)
    redis = _redis()
    if redis is not None:
        cache, client = redis
        value = client.get(cache.make_key(f"rl:{key}:{window}"))
        return Count(int(value or 0), wait)
    with connection.cursor() as cursor:
        cursor.execute(_PEEK_SQL, [key, window])
        row = cursor.fetchone()
    return Count(int(row[0]) if row else 0, wait)


def peek_sql(key: str, rate: Rate) -> tuple[str, list[Any], float] | None:
    """The count as a scalar subquery (SQL, params, seconds until the window ends) for a query the
    request runs anyway, so reading it costs no statement of its own; None when the counters are
    in Redis (then `peek`, which asks Redis, not the database)."""
    if _redis() is not None:
        return None
    now = clock.now().timestamp()
    window = rate.window(now)
    return f"({_PEEK_SQL})", [key, window], window + rate.seconds - now


def prune(*, older_than_seconds: int = PRUNE_AFTER_SECONDS) -> int:
    """Delete the PostgreSQL counters of windows long over (Redis expires its own)."""
    with connection.cursor() as cursor:
        cutoff = int(clock.now().timestamp()) - older_than_seconds
        cursor.execute(f"DELETE FROM {TABLE} WHERE window_start < %s", [cutoff])  # noqa: S608
        return int(cursor.rowcount)
