from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction

from fleetops.access.models import ApiToken, Organization, Role
from fleetops.access.roles import audit_denial, require_role
from fleetops.access.selectors import role_in_org
from fleetops.audit.actors import Actor
from fleetops.audit.models import PlatformAction
from fleetops.audit.services import record
from fleetops.lib import clock
from fleetops.lib.errors import Forbidden, NotFound, ValidationFailed
from fleetops.lib.reason import clean_reason

TOKEN_ROLE_TOO_HIGH = "A token's role cannot be higher than your own role in the organization."
TOKEN_NOT_A_MEMBER = "You are not a member of this organization."
TOKEN_NAME_REQUIRED = "Give the token a name so you can recognise it later."
TOKEN_EXPIRY_IN_PAST = "The expiry must be in the future."
TOKEN_REVOKE_FORBIDDEN = "Only the token's owner or an organization admin can revoke it."


@dataclass(frozen=True)
class IssuedToken:
    token: ApiToken
    plaintext: str


def api_token_create(
    *,
    user: Any,
    org: Organization,
    token_role: str,
    name: str,
    actor: Actor,
    expires_at: datetime | None = None,
) -> IssuedToken:
    """Issue a token for `user` in `org`. The plaintext exists only in the return value."""
    name = name.strip()
    if not name:
        raise ValidationFailed(TOKEN_NAME_REQUIRED, fields={"name": [TOKEN_NAME_REQUIRED]})
    if token_role not in Role.values:
        raise ValidationFailed(
            f"Unknown role {token_role!r}.", fields={"role": [f"Choose one of {Role.values}."]}
        )
    if expires_at is not None and expires_at <= clock.now():
        raise ValidationFailed(TOKEN_EXPIRY_IN_PAST, fields={"expires_at": [TOKEN_EXPIRY_IN_PAST]})
    own_role = role_in_org(user=user, org_id=org.pk)
    if own_role is None:
        raise NotFound(TOKEN_NOT_A_MEMBER)
    if not Role.at_least(own_role, token_role):
        audit_denial(
            actor=actor,
            org=org,
            surface="service",
            what="access.token_create",
            required=token_role,
            have=own_role,
            asked={"role": token_role, "owner": user.get_username()},
        )
        raise Forbidden(TOKEN_ROLE_TOO_HIGH, fields={"role": [TOKEN_ROLE_TOO_HIGH]})
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    plaintext = f"{ApiToken.PREFIX}_{key_id}_{secret}"
    with transaction.atomic():
        token = ApiToken.objects.create(
            user=user,
            org=org,
            role=token_role,
            name=name[:100],
            key_id=key_id,
            secret_hash=ApiToken.hash_secret(secret),
            expires_at=expires_at,
        )
        record(
            action=PlatformAction.TOKEN_CREATED,
            actor=actor,
            org=org,
            target=token,
            changes={"role": [None, token_role], "name": [None, token.name]},
            metadata={"key_id": key_id, "owner": user.get_username()},
        )
    return IssuedToken(token=token, plaintext=plaintext)


def api_token_revoke(*, token: ApiToken, actor: Actor, reason: str) -> bool:
    """Revoke a token. Returns False (and writes nothing) when it was already revoked."""
    reason = clean_reason(reason)
    if actor.user_id is None or actor.user_id != token.user_id:
        require_role(
            actor=actor,
            org=token.org,
            role=Role.ADMIN,
            what="access.token_revoke",
            message=TOKEN_REVOKE_FORBIDDEN,
            target=token,
        )
    now = clock.now()
    with transaction.atomic():
        changed = ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(
            revoked_at=now, revoked_reason=reason
        )
        if not changed:
            return False
        record(
            action=PlatformAction.TOKEN_REVOKED,
            actor=actor,
            org=token.org,
            target=token,
            reason=reason,
            changes={"revoked_at": [None, now]},
        )
    token.revoked_at, token.revoked_reason = now, reason
    return True


LAST_USED_RESOLUTION = timedelta(minutes=1)


def api_token_touch(*, token: ApiToken) -> None:
    """Record use at most once a minute per token, so authentication is not a write per request."""
    now = clock.now()
    if token.last_used_at is not None and now - token.last_used_at < LAST_USED_RESOLUTION:
        return
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    token.last_used_at = now
