"""What a keyed write through the API costs and re-checks: the role read by the request's token
authentication serves the service's role check, and the next request reads the role again."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from fleetops.access.models import Membership, Role
from indexer.models import Chain
from tests.factories import make_indexed_chain

pytestmark = pytest.mark.django_db
REQUEUE = "/api/v1/indexer/chains/sim/enrichments/requeue"


@pytest.fixture
def chain(org) -> Chain:
    return make_indexed_chain(org, blocks=3)


def test_a_keyed_requeue_reads_token_owner_and_membership_once(chain, operator):
    client = operator.token_client()

    with CaptureQueriesContext(connection) as queries:
        response = client.post(
            REQUEUE, {"reason": "r", "ids": [999_999]}, format="json", HTTP_IDEMPOTENCY_KEY="k1"
        )

    assert response.status_code == 200, response.content
    assert response.json() == {"requeued": 0}
    sql = [q["sql"] for q in queries.captured_queries]
    # The authentication statement reads token, owner and membership; nothing reads them again.
    assert sum('"access_membership"' in s for s in sql) == 1, sql
    assert sum('"auth_user"' in s for s in sql) == 1, sql
    assert sum('"indexer_chain"' in s for s in sql) == 1, sql


def test_a_demotion_between_two_requests_is_honoured_at_the_next_one(chain, operator):
    client = operator.token_client()
    first = client.post(REQUEUE, {"reason": "r"}, format="json", HTTP_IDEMPOTENCY_KEY="a")
    assert first.status_code == 200

    Membership.objects.filter(user=operator.user, org=operator.org).update(role=Role.VIEWER)
    second = client.post(REQUEUE, {"reason": "r"}, format="json", HTTP_IDEMPOTENCY_KEY="b")

    assert second.status_code == 403
    assert second.json()["error"]["code"] == "permission_denied"


def test_the_chain_comes_with_its_state_and_the_requests_org(chain, operator):
    from indexer import selectors

    with CaptureQueriesContext(connection) as queries:
        got = selectors.chain_get(org=operator.org, slug="sim")
        assert got.org is operator.org
        assert got.state.chain_id == chain.pk
        assert got.state.chain is got
    assert len(queries.captured_queries) == 1
    reference = Chain.objects.select_related("state").get(pk=chain.pk)
    for field in Chain._meta.concrete_fields:
        assert getattr(got, field.attname) == getattr(reference, field.attname), field.name
    for field in type(reference.state)._meta.concrete_fields:
        assert getattr(got.state, field.attname) == getattr(reference.state, field.attname), field.name
