"""A key's stake transactions read as one consistent outcome: the broadcast step while the verdict is
pending, the verdict once it is in (never "Failure" next to "Broadcast started")."""

from __future__ import annotations

import pytest

from fleetops.lib import clock
from migrations_app.keys.admin import stake_tx_outcome
from migrations_app.models.keys import BroadcastState, StakeTransaction, StakeTxStatus
from tests.migrations_app.keys_fixtures import make_keys

pytestmark = pytest.mark.django_db


def _tx(key, attempt, **fields):
    now = clock.now()
    terminal = fields.get("status", StakeTxStatus.PENDING) != StakeTxStatus.PENDING
    return StakeTransaction.objects.create(
        key=key,
        round=1,
        attempt=attempt,
        claimed_at=now,
        created_at=now,
        resolved_at=now if terminal else None,
        **fields,
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"status": "failure", "broadcast_state": "broadcasting", "code": 5},
            "Rejected by the node at CheckTx (code 5); never on chain",
        ),
        (
            {"status": "failure", "broadcast_state": "resending", "code": 19},
            "Rejected by the node at CheckTx (code 19); never on chain",
        ),
        (
            {"status": "failure", "broadcast_state": "sent", "landed_height": 40, "code": 11},
            "Failed on chain at height 40 (code 11)",
        ),
        ({"status": "failure", "broadcast_state": "unknown"}, "Failed: not on chain by its timeout height"),
        (
            {"status": "success", "broadcast_state": "sent", "landed_height": 41, "code": 0},
            "Succeeded on chain at height 41",
        ),
        ({"status": "pending", "broadcast_state": "broadcasting"}, "Pending: Broadcast started"),
        (
            {"status": "pending", "broadcast_state": "unknown"},
            "Pending: Outcome unknown: to be looked up by hash",
        ),
        (
            {"status": "pending", "broadcast_state": "resending"},
            "Pending: Not on chain: re-sent once (same bytes)",
        ),
    ],
)
def test_each_state_has_one_wording(org, fields, expected):
    key = make_keys(org, 1)[0]
    assert stake_tx_outcome(_tx(key, 1, **fields)) == expected


def test_the_key_page_shows_a_checktx_rejection_without_the_broadcast_step(client, viewer, org):
    key = make_keys(org, 1)[0]
    _tx(
        key,
        1,
        status=StakeTxStatus.FAILURE,
        broadcast_state=BroadcastState.BROADCASTING,
        code=5,
        message="CheckTx code 5 (sdk): insufficient funds",
    )
    client.force_login(viewer.user)
    page = client.get(f"/admin/migrations_app/key/{key.pk}/change/").content.decode()
    assert "Rejected by the node at CheckTx (code 5); never on chain" in page
    assert "Broadcast started" not in page
    assert ">Failure<" not in page
