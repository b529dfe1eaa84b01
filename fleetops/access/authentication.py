from __future__ import annotations

from typing import Any

from django.utils.crypto import constant_time_compare
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from fleetops.access.models import ApiToken
from fleetops.access.selectors import role_in_org
from fleetops.access.services import api_token_touch
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
    429 before its token is looked at; every failure is counted there and in
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
        throttle = FailedAuthThrottle()
        wait = throttle.wait_seconds(request)
        if wait is not None:
            FAILED_AUTH.labels(outcome="throttled").inc()
            raise exceptions.Throttled(wait=wait, detail=TOKEN_THROTTLED)
        try:
            return self._check(raw.strip())
        except _Refused as refused:
            throttle.record_failure(request)
            FAILED_AUTH.labels(outcome=refused.outcome).inc()
            raise exceptions.AuthenticationFailed(refused.message)

    def _check(self, raw: str) -> tuple[Any, ApiToken]:
        prefix, _, rest = raw.partition("_")
        key_id, _, secret = rest.partition("_")
        if prefix != ApiToken.PREFIX or not key_id or not secret:
            raise _Refused("invalid", TOKEN_INVALID)
        token = ApiToken.objects.select_related("user", "org").filter(key_id=key_id).first()
        if token is None or not constant_time_compare(token.secret_hash, ApiToken.hash_secret(secret)):
            raise _Refused("invalid", TOKEN_INVALID)
        now = clock.now()
        if token.revoked_at is not None:
            raise _Refused("revoked", TOKEN_REVOKED)
        if token.expires_at is not None and token.expires_at <= now:
            raise _Refused("expired", TOKEN_EXPIRED)
        # role_in_org loads the user's memberships once and keeps them on the user, so resolving
        # the request's organization and role afterwards (access.context) asks nothing again.
        if role_in_org(user=token.user, org_id=token.org_id) is None:
            raise _Refused("owner_inactive", TOKEN_OWNER_INACTIVE)
        api_token_touch(token=token)
        return token.user, token

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'


class _Refused(Exception):
    def __init__(self, outcome: str, message: str):
        super().__init__(message)
        self.outcome = outcome
        self.message = message
