"""DRF's rate limits, and the failed-token limit, counted by `fleetops.api.ratelimit` and failing
open when a Redis cache is unreachable.

The counters live in Redis when CACHE_URL says so, else in PostgreSQL (one statement per request).
A Redis outage must not turn every API request into a 500: the limit is a guard against abuse, not
a correctness rule, so while Redis is down requests go through uncounted and a warning is logged.
With the counters in PostgreSQL, the database is down too and the view answers 503
`database_unavailable` itself.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from redis.exceptions import RedisError
from rest_framework.settings import api_settings
from rest_framework.throttling import BaseThrottle

from fleetops.api import ratelimit

log = logging.getLogger(__name__)


def rate_of(scope: str) -> ratelimit.Rate:
    # Read per request, not frozen at import like DRF's class attribute, so settings apply.
    try:
        return ratelimit.Rate.parse(str(api_settings.DEFAULT_THROTTLE_RATES[scope]))
    except KeyError:
        raise ImproperlyConfigured(f"No throttle rate set for the {scope!r} scope.")


class _CountedThrottle(BaseThrottle):
    """One counter per client and scope; a request over the rate is refused until the window ends."""

    scope: str
    _wait: float | None = None

    def ident_of(self, request: Any) -> str | None:
        raise NotImplementedError

    def allow_request(self, request: Any, view: Any) -> bool:
        ident = self.ident_of(request)
        if ident is None:
            return True
        rate = rate_of(self.scope)
        try:
            count = ratelimit.hit(f"{self.scope}:{ident}", rate)
        except RedisError as exc:
            log.warning(
                "rate limit not applied, the cache is unreachable: %s: %s", exc.__class__.__name__, exc
            )
            return True
        if count.over(rate):
            self._wait = count.wait
            return False
        return True

    def wait(self) -> float | None:
        return self._wait


class AnonThrottle(_CountedThrottle):
    """Unauthenticated requests per client address (`anon` rate)."""

    scope = "anon"

    def ident_of(self, request: Any) -> str | None:
        return None if request.user and request.user.is_authenticated else self.get_ident(request)


class UserThrottle(_CountedThrottle):
    """Requests per user (`user` rate); per address for anonymous requests, as DRF's own does."""

    scope = "user"

    def ident_of(self, request: Any) -> str | None:
        if request.user and request.user.is_authenticated:
            return str(request.user.pk)
        return self.get_ident(request)


class FailedAuthThrottle(BaseThrottle):
    """Failed API-token authentications per client address (`failed_auth` rate, e.g. `20/min`).

    DRF's anonymous limit never sees these requests: authentication fails, and answers 401, before
    any throttle runs. So the token authentication asks this throttle itself: an address over the
    limit gets a 429 with Retry-After whatever token it sends (a correct guess included, or the
    limit would not limit guessing), and each failure is recorded here. With the counters in
    PostgreSQL the check rides in the token's own query (`peek_sql`), so it costs no statement.
    """

    scope = "failed_auth"

    def __init__(self, request: Any) -> None:
        self.rate = rate_of(self.scope)
        self.key = f"{self.scope}:{self.get_ident(request)}"

    def peek_sql(self) -> tuple[str, list[Any], float] | None:
        """The address's count as a subquery for the token query (None: ask `wait_seconds`)."""
        return ratelimit.peek_sql(self.key, self.rate)

    def refusal(self, hits: int | None, wait: float) -> float | None:
        """None while the address may still try a token; else the seconds until it may."""
        return max(wait, 1.0) if (hits or 0) >= self.rate.limit else None

    def wait_seconds(self) -> float | None:
        try:
            count = ratelimit.peek(self.key, self.rate)
        except RedisError as exc:
            log.warning("failed-auth limit not applied, the cache is unreachable: %s", exc)
            return None
        return self.refusal(count.hits, count.wait)

    def record_failure(self) -> None:
        try:
            ratelimit.hit(self.key, self.rate)
        except RedisError as exc:
            log.warning("failed-auth attempt not counted, the cache is unreachable: %s", exc)
