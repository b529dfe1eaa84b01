from __future__ import annotations

from typing import Any

from django.utils.crypto import constant_time_compare
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from fleetops.access.models import ApiToken
from fleetops.access.selectors import pin_role, role_in_org
from fleetops.access.services import api_token_use
from fleetops.api.throttling import FailedAuthThrottle
from fleetops.lib import clock
from fleetops.observability.metrics import FAILED_AUTH

TOKEN_INVALID = "Invalid API token."
TOKEN_REVOKED = "This API token has been revoked."
TOKEN_EXPIRED = "This API token has expired."
TOKEN_OWNER_INACTIVE = "The owner of this API token is inactive or no longer a member of its organization."
# DRF appends "Expected available in N seconds." (the Retry-After header says the same).
TOKEN_THROTTLED = "Too many failed API token attempts from this address."


class ApiTokenAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer fo_<key id>_<secret>`. The token pins the organization and a role.

    A client address whose tokens failed too often lately (`FailedAuthThrottle`) is refused with a
    429 whatever its token; every failure is counted there and in
    `fleetops_access_failed_auth_total`.
    """

    keywords = ("Bearer", "Token")

    def authenticate(self, request: Request) -> tuple[Any, ApiToken] | None:
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        keyword, _, raw = header.partition(" ")
        if keyword not in self.keywords:
            return None
        throttle = FailedAuthThrottle(request)
        token, refused = self._check(raw.strip(), throttle)
        if refused is not None and refused.outcome == "throttled":
            FAILED_AUTH.labels(outcome="throttled").inc()
            raise exceptions.Throttled(wait=refused.wait, detail=TOKEN_THROTTLED)
        if refused is not None:
            throttle.record_failure()
            FAILED_AUTH.labels(outcome=refused.outcome).inc()
            raise exceptions.AuthenticationFailed(refused.message)
        assert token is not None
        return token.user, token

    def _check(self, raw: str, throttle: FailedAuthThrottle) -> tuple[ApiToken | None, _Refused | None]:
        """The token, or why it is refused. The address's failed-auth count is read first in effect:
        over the limit, every token is refused, a valid one included.

        One statement (`api_token_use`): the token, its user and organization, the owner's role
        there, (with the counters in PostgreSQL) the address's failed-auth count, and the token's
        use recorded at most once a minute. A use is recorded whenever the secret matches and the
        token is live, even while the address is refused: "last used" is last presented.
        """
        prefix, _, rest = raw.partition("_")
        key_id, _, secret = rest.partition("_")
        peek = throttle.peek_sql()
        found = None
        if prefix == ApiToken.PREFIX and key_id and secret:
            found = api_token_use(key_id=key_id, secret=secret, peek=peek[:2] if peek else None)
        if found is not None and peek is not None:
            wait = throttle.refusal(found.failed_auth, peek[2])
        else:
            wait = throttle.wait_seconds()
        token = found.token if found is not None else None
        if wait is not None:
            return None, _Refused("throttled", TOKEN_THROTTLED, wait=wait)
        if token is None or not constant_time_compare(token.secret_hash, ApiToken.hash_secret(secret)):
            return None, _Refused("invalid", TOKEN_INVALID)
        now = clock.now()
        if token.revoked_at is not None:
            return None, _Refused("revoked", TOKEN_REVOKED)
        if token.expires_at is not None and token.expires_at <= now:
            return None, _Refused("expired", TOKEN_EXPIRED)
        # The owner's role in the token's organization, kept on the user so resolving the
        # request's organization and role afterwards (access.context) asks nothing again.
        assert found is not None
        pin_role(user=token.user, org_id=token.org_id, role=found.member_role)
        if role_in_org(user=token.user, org_id=token.org_id) is None:
            return None, _Refused("owner_inactive", TOKEN_OWNER_INACTIVE)
        return token, None

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'


class _Refused:
    def __init__(self, outcome: str, message: str, *, wait: float | None = None):
        self.outcome = outcome
        self.message = message
        self.wait = wait
