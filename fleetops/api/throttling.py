"""DRF's rate limits, failing open when their cache is unreachable.

The throttles count requests in the default cache (Redis when CACHE_URL says so). A Redis outage
must not turn every API request into a 500: the limit is a guard against abuse, not a correctness
rule, so while the cache is down requests go through uncounted and a warning is logged. With the
database cache, the database is down too and the view answers 503 `database_unavailable` itself.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError
from rest_framework.throttling import AnonRateThrottle, UserRateThrottle

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
