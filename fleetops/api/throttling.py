"""DRF's rate limits, and the failed-token limit, failing open when their cache is unreachable.

The throttles count requests in the default cache (Redis when CACHE_URL says so). A Redis outage
must not turn every API request into a 500: the limit is a guard against abuse, not a correctness
rule, so while the cache is down requests go through uncounted and a warning is logged. With the
database cache, the database is down too and the view answers 503 `database_unavailable` itself.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from redis.exceptions import RedisError
from rest_framework.settings import api_settings
from rest_framework.throttling import AnonRateThrottle, SimpleRateThrottle, UserRateThrottle

log = logging.getLogger(__name__)


def _allow(request: Any, view: Any, allow: Any) -> bool:
    try:
        return bool(allow(request, view))
    except RedisError as exc:
        log.warning("rate limit not applied, the cache is unreachable: %s: %s", exc.__class__.__name__, exc)
        return True


class AnonThrottle(AnonRateThrottle):
    def allow_request(self, request: Any, view: Any) -> bool:
        return _allow(request, view, super().allow_request)


class UserThrottle(UserRateThrottle):
    def allow_request(self, request: Any, view: Any) -> bool:
        return _allow(request, view, super().allow_request)


class FailedAuthThrottle(SimpleRateThrottle):
    """Failed API-token authentications per client address (`failed_auth` rate, e.g. `20/min`).

    DRF's anonymous limit never sees these requests: authentication fails, and answers 401, before
    any throttle runs. So the token authentication asks this throttle itself, before it looks at
    the token: an address over the limit gets a 429 with Retry-After whatever token it sends (a
    correct guess included, or the limit would not limit guessing), and each failure is recorded
    here. The window slides like DRF's throttles, in the same cache, failing open the same way.
    """

    scope = "failed_auth"
    num_requests: int
    duration: int

    def get_rate(self) -> str:
        # Read per request, not frozen at import like DRF's class attribute, so settings apply.
        try:
            return str(api_settings.DEFAULT_THROTTLE_RATES[self.scope])
        except KeyError:
            raise ImproperlyConfigured(f"No throttle rate set for the {self.scope!r} scope.")

    def get_cache_key(self, request: Any, view: Any) -> str:
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}

    def _load(self, request: Any) -> None:
        self.key = self.get_cache_key(request, None)
        self.history = self.cache.get(self.key, [])
        self.now = self.timer()
        while self.history and self.history[-1] <= self.now - self.duration:
            self.history.pop()

    def wait_seconds(self, request: Any) -> float | None:
        """None while the address may still try a token; else the seconds until it may."""
        try:
            self._load(request)
        except RedisError as exc:
            log.warning("failed-auth limit not applied, the cache is unreachable: %s", exc)
            return None
        if len(self.history) < self.num_requests:
            return None
        return float(self.wait() or self.duration)

    def record_failure(self, request: Any) -> None:
        try:
            self._load(request)
            self.history.insert(0, self.now)
            self.cache.set(self.key, self.history, self.duration)
        except RedisError as exc:
            log.warning("failed-auth attempt not counted, the cache is unreachable: %s", exc)
