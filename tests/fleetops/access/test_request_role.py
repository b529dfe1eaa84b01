"""The role a token's request carries (`RequestActor`): answered without reading again inside the
request that read it, never beyond it."""

from __future__ import annotations

import pytest

from fleetops.access.models import ApiToken, Membership, Role
from fleetops.access.roles import RequestActor, effective_role
from fleetops.access.services import api_token_create
from fleetops.audit.actors import Actor

pytestmark = pytest.mark.django_db


def _token_actor(member) -> tuple[Actor, ApiToken]:
    issued = api_token_create(
        user=member.user, org=member.org, token_role=member.role, name="t", actor=Actor.for_user(member.user)
    )
    return Actor.for_token(issued.token), issued.token


def _vouched(actor: Actor, org_id: int, role: Role) -> RequestActor:
    fields = actor.to_payload() | {"type": actor.type}
    return RequestActor(**fields, vouched=(org_id, role))


def test_a_request_actor_answers_its_role_in_its_org_without_a_query(operator, django_assert_num_queries):
    actor, token = _token_actor(operator)
    vouched = _vouched(actor, token.org_id, Role.OPERATOR)

    with django_assert_num_queries(0):
        assert effective_role(actor=vouched, org_id=token.org_id) == Role.OPERATOR
    # Audit rows and task payloads see the plain actor's fields, and nothing of the role.
    assert vouched.to_payload() == actor.to_payload()


def test_a_request_actor_reads_the_database_for_any_other_org(operator, other_org):
    actor, token = _token_actor(operator)
    vouched = _vouched(actor, token.org_id, Role.OPERATOR)

    assert effective_role(actor=vouched, org_id=other_org.pk) is None


def test_a_demotion_is_honoured_by_every_actor_not_made_by_the_request_that_read_the_role(operator):
    actor, token = _token_actor(operator)
    Membership.objects.filter(user=operator.user, org=operator.org).update(role=Role.VIEWER)

    # A plain actor and one carried through a task's payload read the demotion at once.
    assert effective_role(actor=actor, org_id=token.org_id) == Role.VIEWER
    carried = Actor.from_payload(_vouched(actor, token.org_id, Role.OPERATOR).to_payload())
    assert type(carried) is Actor
    assert effective_role(actor=carried, org_id=token.org_id) == Role.VIEWER


def test_a_vouched_role_is_only_honoured_for_token_actors(operator):
    user_actor = Actor.for_user(operator.user)
    forged = RequestActor(
        **(user_actor.to_payload() | {"type": user_actor.type}), vouched=(operator.org.pk, Role.ADMIN)
    )

    assert effective_role(actor=forged, org_id=operator.org.pk) == Role.OPERATOR
