"""The indexer's admin actions refuse unknown fields and wrong JSON types by name, and change
nothing when they do."""

from __future__ import annotations

import pytest

from fleetops.api.serializers import UNKNOWN_FIELD
from indexer.models import IndexerState
from tests.factories import make_indexed_chain

pytestmark = pytest.mark.django_db
BASE = "/api/v1/indexer/chains/sim"


@pytest.fixture
def chain(org):
    return make_indexed_chain(org, blocks=30)


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("pause", {"reason": "r", "paused": True}, {"paused": [UNKNOWN_FIELD]}),
        (
            "rollback",
            {"reason": "r", "to_height": True},
            {"to_height": ["Expected an integer, got a boolean."]},
        ),
        (
            "rollback",
            {"reason": "r", "to_height": "20"},
            {"to_height": ["Expected an integer, got a string."]},
        ),
        ("rollback", {"reason": 7, "to_height": 20}, {"reason": ["Expected a string, got an integer."]}),
        (
            "enrichments/requeue",
            {"reason": "r", "ids": [True]},
            {"ids": {"0": ["Expected an integer, got a boolean."]}},
        ),
    ],
)
def test_actions_refuse_by_name_and_change_nothing(chain, admin_member, path, body, expected):
    response = admin_member.token_client().post(f"{BASE}/{path}", body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["fields"] == expected
    state = IndexerState.objects.get(chain=chain)
    assert (state.paused, state.rollback_requested_to) == (False, None)
