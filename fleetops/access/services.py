from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.models import Model

from fleetops.access.models import ApiToken, Membership, Organization, Role
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


@dataclass(frozen=True)
class TokenLookup:
    token: ApiToken  # with `user` and `org` loaded
    member_role: str | None  # the owner's membership role in the token's organization
    failed_auth: int | None  # the extra scalar the caller asked for (a rate counter)


def _columns(model: type[Model], alias: str) -> tuple[list[str], str]:
    fields = [f.attname for f in model._meta.concrete_fields]
    columns = [f.column for f in model._meta.concrete_fields]
    return fields, ", ".join(f'{alias}."{c}"' for c in columns)


@cache
def _token_sql() -> tuple[str, list[str], list[str], list[str]]:
    user_model = get_user_model()
    t_fields, t_cols = _columns(ApiToken, "t")
    u_fields, u_cols = _columns(user_model, "u")
    o_fields, o_cols = _columns(Organization, "o")
    # Table and column names from the models, values are parameters.
    # 1. `touched`: the use of a token whose secret matches and that is neither revoked nor
    #    expired is recorded at most once a minute (LAST_USED_RESOLUTION), in the same statement.
    # 2. The token with its owner, organization, the owner's role there, whether (1) wrote, and
    #    the caller's extra scalar. The SELECT sees the row as it was before (1).
    table = ApiToken._meta.db_table
    sql = (
        f'WITH touched AS (UPDATE "{table}" SET "last_used_at" = %s '  # noqa: S608
        'WHERE "key_id" = %s AND "secret_hash" = %s AND "revoked_at" IS NULL '
        'AND ("expires_at" IS NULL OR "expires_at" > %s) '
        'AND ("last_used_at" IS NULL OR "last_used_at" <= %s) RETURNING 1) '
        f"SELECT {t_cols}, {u_cols}, {o_cols}, "
        f'(SELECT m."role" FROM "{Membership._meta.db_table}" m '
        'WHERE m."user_id" = t."user_id" AND m."org_id" = t."org_id"), '
        "(SELECT count(*) FROM touched){extra} "
        f'FROM "{ApiToken._meta.db_table}" t '
        f'JOIN "{user_model._meta.db_table}" u ON u."{user_model._meta.pk.column}" = t."user_id" '
        f'JOIN "{Organization._meta.db_table}" o ON o."id" = t."org_id" '
        'WHERE t."key_id" = %s'
    )
    return sql, t_fields, u_fields, o_fields


def api_token_use(
    *, key_id: str, secret: str, peek: tuple[str, list[Any]] | None = None
) -> TokenLookup | None:
    """The API token presented with this key id, its owner and organization, the owner's role
    there and, when asked, one more scalar subquery (`peek`: SQL and params), while its use is
    recorded (at most once a minute, so authentication is not a write per request): one
    hand-written statement. The ORM's compilation of the same select_related + subquery cost more
    than the query itself on every API request, and the use was a statement of its own."""
    sql, t_fields, u_fields, o_fields = _token_sql()
    extra, extra_params = (f", {peek[0]}", peek[1]) if peek else ("", [])
    now = clock.now()
    touch: list[Any] = [now, key_id, ApiToken.hash_secret(secret), now, now - LAST_USED_RESOLUTION]
    with connection.cursor() as cursor:
        cursor.execute(sql.replace("{extra}", extra), [*touch, *extra_params, key_id])
        row = cursor.fetchone()
    if row is None:
        return None
    n_t, n_u, n_o = len(t_fields), len(u_fields), len(o_fields)
    db = connection.alias
    token = ApiToken.from_db(db, t_fields, row[:n_t])
    user = get_user_model().from_db(db, u_fields, row[n_t : n_t + n_u])
    org = Organization.from_db(db, o_fields, row[n_t + n_u : n_t + n_u + n_o])
    ApiToken._meta.get_field("user").set_cached_value(token, user)
    ApiToken._meta.get_field("org").set_cached_value(token, org)
    member_role, touched, *extra_value = row[n_t + n_u + n_o :]
    if touched:
        token.last_used_at = now
    return TokenLookup(token=token, member_role=member_role, failed_auth=extra_value[0] if peek else None)
