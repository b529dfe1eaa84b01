from __future__ import annotations

from typing import Any

from django.utils.crypto import constant_time_compare
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from fleetops.access.models import ApiToken
from fleetops.access.selectors import role_in_org
from fleetops.access.services import api_token_touch
from fleetops.lib import clock

TOKEN_INVALID = "Invalid API token."
TOKEN_REVOKED = "This API token has been revoked."
TOKEN_EXPIRED = "This API token has expired."
TOKEN_OWNER_INACTIVE = "The owner of this API token is inactive or no longer a member of its organization."


class ApiTokenAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer fo_<key id>_<secret>`. The token pins the organization and a role."""

    keywords = ("Bearer", "Token")

    def authenticate(self, request: Request) -> tuple[Any, ApiToken] | None:
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        keyword, _, raw = header.partition(" ")
        if keyword not in self.keywords:
            return None
        raw = raw.strip()
        prefix, _, rest = raw.partition("_")
        key_id, _, secret = rest.partition("_")
        if prefix != ApiToken.PREFIX or not key_id or not secret:
            raise exceptions.AuthenticationFailed(TOKEN_INVALID)
        token = ApiToken.objects.select_related("user", "org").filter(key_id=key_id).first()
        if token is None or not constant_time_compare(token.secret_hash, ApiToken.hash_secret(secret)):
            raise exceptions.AuthenticationFailed(TOKEN_INVALID)
        now = clock.now()
        if token.revoked_at is not None:
            raise exceptions.AuthenticationFailed(TOKEN_REVOKED)
        if token.expires_at is not None and token.expires_at <= now:
            raise exceptions.AuthenticationFailed(TOKEN_EXPIRED)
        # role_in_org loads the user's memberships once and keeps them on the user, so resolving
        # the request's organization and role afterwards (access.context) asks nothing again.
        if role_in_org(user=token.user, org_id=token.org_id) is None:
            raise exceptions.AuthenticationFailed(TOKEN_OWNER_INACTIVE)
        api_token_touch(token=token)
        return token.user, token

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'
