"""The effective role of an actor, and the one place a refusal is audited.

`effective_role(actor=..., org_id=...)` is the only function that turns an actor into a role:

- a **user** (admin session or shell with `--as`) has their membership role; a superuser is an admin
  everywhere;
- an **API token** acts with the lower of its own role and its user's current membership role, and
  with no role once it is revoked or expired (demoting a user demotes their tokens at once);
- the **scheduler** actor (beat tasks, `--loop` commands, engines) is an operator: it may take every
  operator edge plus the engine edges of the machines (`Edge.role is None`), never an admin-only
  edge or override;
- the **system** actor (management commands run by someone with shell access, demo seeds, the
  release step) is an admin: a shell on the server already holds the database credentials;
- an **anonymous** actor has no role.

The role is read from the database at every call, never trusted from an actor object that may have
outlived a demotion. One exception, within one API request: the token authentication of that
request has just read the token, its owner and the owner's membership in one statement, so the
request's actor (`RequestActor`, built per request by the API views) carries the role read there
(`vouched`) and `effective_role` answers it without reading the same rows again. The actor is made
from the request and dropped with it (a Celery payload does not carry the field), so a role revoked
between two requests is honoured at the next one; admin sessions, tasks and commands keep reading.

`require_role(...)` raises `Forbidden` and writes one `access.denied` row (action, actor, org,
target, what was asked), the same row the DRF permission classes and the admin gates write, so a
refusal looks alike wherever it happened. Services call it before they open their transaction, so
the denial row commits even though the refused change does not. Where a caller wraps a whole
request in a transaction (idempotent API writes), it opens `denials_outlive_rollback()` around it:
refusals inside are written after that transaction ends, whether it committed or rolled back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth import get_user_model
from django.db import models, transaction

from fleetops.access.models import ApiToken, Membership, Organization, Role
from fleetops.audit.actors import Actor
from fleetops.audit.models import ActorType, PlatformAction
from fleetops.audit.services import record
from fleetops.lib import clock
from fleetops.lib.errors import Forbidden
from fleetops.observability.metrics import ACCESS_DENIED

ENGINE_ONLY = "only the portal's own processes (scheduler or system) take this step"
# The fixed rights of the portal's own actors (see the module docstring).
PROCESS_ROLES: Mapping[str, Role] = {ActorType.SCHEDULER: Role.OPERATOR, ActorType.SYSTEM: Role.ADMIN}


def is_process(actor: Actor) -> bool:
    """The portal's own processes: they may take engine edges."""
    return actor.type in PROCESS_ROLES


@dataclass(frozen=True)
class RequestActor(Actor):
    """The actor of one API request authenticated by a token, with the role that request's
    authentication read for the token's organization: `(org id, role)`. Never kept beyond the
    request (see the module docstring); its payload (audit rows, task arguments) is the plain
    actor's."""

    vouched: tuple[int, Role] | None = field(default=None, compare=False, repr=False)


def effective_role(*, actor: Actor, org_id: int | None) -> Role | None:
    """The role `actor` acts with in organization `org_id` (None: no role there).

    The user's flags are read from the database, not from the actor: a Celery task queued by a
    superuser who was demoted or deactivated since runs with the role they have now. The one
    exception is a `RequestActor`'s role in its token's organization, read by this request.
    """
    process_role = PROCESS_ROLES.get(actor.type)
    if process_role is not None:
        return process_role
    if isinstance(actor, RequestActor) and actor.vouched is not None and actor.type == ActorType.API_TOKEN:
        vouched_org, vouched_role = actor.vouched
        if vouched_org == org_id:
            return vouched_role
    if actor.user_id is None or org_id is None or actor.type not in (ActorType.USER, ActorType.API_TOKEN):
        return None
    user = get_user_model().objects.filter(pk=actor.user_id).values("is_active", "is_superuser").first()
    if user is None or not user["is_active"]:
        return None
    if user["is_superuser"]:
        own: Role | None = Role.ADMIN
    else:
        member = Membership.objects.filter(user_id=actor.user_id, org_id=org_id).values_list(
            "role", flat=True
        )
        role = member.first()
        own = Role(role) if role else None
    if own is None or actor.type == ActorType.USER:
        return own
    token = ApiToken.objects.filter(
        pk=actor.id, org_id=org_id, user_id=actor.user_id, revoked_at__isnull=True
    ).first()
    if token is None or not token.is_active(at=clock.now()):
        return None
    return Role.lowest(token.role, own)


_deferred: ContextVar[list[dict[str, Any]] | None] = ContextVar("fleetops_deferred_denials", default=None)


@contextlib.contextmanager
def denials_outlive_rollback() -> Iterator[None]:
    """Defer the `access.denied` rows written inside the block until it ends (see the module
    docstring); open it outside the transaction whose rollback they must survive."""
    token = _deferred.set([])
    try:
        yield
    finally:
        pending = _deferred.get() or []
        _deferred.reset(token)
        for denial in pending:
            _write_denial(**denial)


def _write_denial(**denial: Any) -> None:
    with transaction.atomic():
        record(action=PlatformAction.DENIED, **denial)


def audit_denial(
    *,
    actor: Actor,
    org: Organization | None,
    surface: str,
    what: str,
    required: str,
    have: str | None,
    target: models.Model | None = None,
    asked: Mapping[str, Any] | None = None,
) -> None:
    """Write the one `access.denied` row (and count it). Runs in its own transaction (a savepoint
    when the caller already has one)."""
    ACCESS_DENIED.labels(surface=surface).inc()
    denial = {
        "actor": actor,
        "org": org,
        "target": target,
        "metadata": {
            "surface": surface,
            "what": what,
            "required_role": required,
            "role": have,
            **({"asked": dict(asked)} if asked else {}),
        },
    }
    pending = _deferred.get()
    if pending is not None:
        pending.append(denial)
        return
    _write_denial(**denial)


def require_role(
    *,
    actor: Actor,
    org: Organization,
    role: str,
    what: str,
    message: str,
    target: models.Model | None = None,
    asked: Mapping[str, Any] | None = None,
    interactive: bool = False,
) -> Role:
    """Return the actor's role in `org` when it is at least `role`; otherwise audit the refusal and
    raise `Forbidden(message)`. `interactive=True` also demands a person in a logged-in session
    (admin terminate, issuing tokens): a token or a process is refused whatever its role."""
    have = effective_role(actor=actor, org_id=org.pk)
    ok = Role.at_least(have, role)
    if ok and interactive and not (actor.type == ActorType.USER and actor.interactive):
        ok = False
        role = f"{role} (interactive session)"
    if not ok:
        audit_denial(
            actor=actor,
            org=org,
            surface="service",
            what=what,
            required=role,
            have=have,
            target=target,
            asked=asked,
        )
        raise Forbidden(message, code="permission_denied")
    assert have is not None
    return have


def require_engine(
    *, actor: Actor, org: Organization | None, what: str, target: models.Model | None = None
) -> None:
    """Refuse (audited) a person asking for a step only the portal's own processes take."""
    if is_process(actor):
        return
    audit_denial(
        actor=actor,
        org=org,
        surface="service",
        what=what,
        required="scheduler or system",
        have=None,
        target=target,
    )
    raise Forbidden(ENGINE_ONLY, code="permission_denied")
