"""Every admin override of a start or an update writes exactly one `curtailment.override.<kind>` row
(the rule's limit, the value before, the value chosen, the actor and the reason) in the transaction of
the change; a start or update without overrides writes none, and a refused one writes only its
`access.denied` row (tests/curtailment/test_denials.py)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from curtailment.models import CurtailmentEvent, EventState, OrgCurtailmentConfig
from curtailment.overrides import OVERRIDE_ACTION_PREFIX, OverrideKind, override_action
from curtailment.planning import StartRequest
from curtailment.services import curtailment_start, curtailment_update
from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib.errors import Conflict, Forbidden

pytestmark = pytest.mark.django_db


def start(member: Any, **kw: Any) -> CurtailmentEvent:
    kw.setdefault("target_kw", 3.0)
    kw.setdefault("reason", "grid request")
    return curtailment_start(org=member.org, actor=Actor.for_user(member.user), req=StartRequest(**kw)).event


def override_rows() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action__startswith=OVERRIDE_ACTION_PREFIX).order_by("id"))


# (start request fields, the override kind, field, limit, chosen) under the default org config
# (min power 1500 W, interval cap 300 s, default duration 14400 s).
START_CASES: dict[str, tuple[dict[str, Any], str, str, Any, Any]] = {
    "min-power override": (
        {"candidate_min_power_w_override": 2500},
        OverrideKind.MIN_POWER,
        "candidate_min_power_w_override",
        1500,
        2500,
    ),
    "interval above the cap": (
        {"restore_batch_interval_sec": 900},
        OverrideKind.INTERVAL_ABOVE_CAP,
        "restore_batch_interval_sec",
        300,
        900,
    ),
    "duration above the org default": (
        {"max_duration_seconds": 20_000},
        OverrideKind.DURATION_ABOVE_DEFAULT,
        "max_duration_seconds",
        14_400,
        20_000,
    ),
    "no maximum duration": (
        {"allow_unbounded": True},
        OverrideKind.UNBOUNDED,
        "max_duration_seconds",
        14_400,
        None,
    ),
    "maintenance devices included": (
        {"include_maintenance": True, "force_include_maintenance": True},
        OverrideKind.FORCE_INCLUDE_MAINTENANCE,
        "force_include_maintenance",
        False,
        True,
    ),
}


@pytest.mark.parametrize("case", list(START_CASES))
def test_each_start_override_writes_exactly_one_row_of_its_own(admin_member, fleet, case):
    fields, kind, field, limit, chosen = START_CASES[case]
    event = start(admin_member, **fields)

    [row] = override_rows()
    assert row.action == override_action(kind)
    assert (row.target_type, row.target_id, row.org_id) == (
        "curtailment.curtailmentevent",
        str(event.pk),
        event.org_id,
    )
    assert (row.actor_type, row.actor_id) == ("user", str(admin_member.user.pk))
    assert row.reason == "grid request"
    assert row.changes == {field: [None, chosen]}
    assert row.metadata == {
        "event_uuid": str(event.uuid),
        "operation": "start",
        "kind": kind,
        "field": field,
        "limit": limit,
        "before": None,
        "chosen": chosen,
    }
    # Committed with the start: the start's own row is there too, once.
    assert AuditEvent.objects.filter(action="curtailment.started", target_id=str(event.pk)).count() == 1


def test_every_override_at_once_writes_one_row_each(admin_member, fleet):
    OrgCurtailmentConfig.objects.create(
        org=admin_member.org,
        candidate_min_power_w=1000,
        restore_interval_cap_sec=120,
        max_duration_default_sec=600,
    )
    start(
        admin_member,
        candidate_min_power_w_override=2000,
        restore_batch_interval_sec=200,
        allow_unbounded=True,
        include_maintenance=True,
        force_include_maintenance=True,
    )
    rows = override_rows()
    assert Counter(r.action for r in rows) == {
        override_action(OverrideKind.MIN_POWER): 1,
        override_action(OverrideKind.INTERVAL_ABOVE_CAP): 1,
        override_action(OverrideKind.UNBOUNDED): 1,
        override_action(OverrideKind.FORCE_INCLUDE_MAINTENANCE): 1,
    }
    limits = {r.metadata["kind"]: r.metadata["limit"] for r in rows}
    assert limits[OverrideKind.MIN_POWER] == 1000  # the organization's own rule, not the default
    assert limits[OverrideKind.INTERVAL_ABOVE_CAP] == 120
    assert limits[OverrideKind.UNBOUNDED] == 600


def test_a_start_within_every_rule_writes_no_override_row_even_by_an_admin(admin_member, operator, fleet):
    start(admin_member, restore_batch_interval_sec=300, max_duration_seconds=14_400)
    start(operator)
    assert AuditEvent.objects.filter(action="curtailment.started").count() == 2
    assert override_rows() == []


def test_a_replayed_start_writes_no_second_override_row(admin_member, fleet):
    first = start(admin_member, restore_batch_interval_sec=900, idempotency_key="k1")
    again = start(admin_member, restore_batch_interval_sec=900, idempotency_key="k1")
    assert again.pk == first.pk
    assert len(override_rows()) == 1


# (patch, the override kind, field, limit, before, chosen); the event starts with the defaults
# (interval 30 s, duration 14400 s).
UPDATE_CASES: dict[str, tuple[dict[str, Any], str, str, int, int, int]] = {
    "interval above the cap": (
        {"restore_batch_interval_sec": 600},
        OverrideKind.INTERVAL_ABOVE_CAP,
        "restore_batch_interval_sec",
        300,
        30,
        600,
    ),
    "duration above the org default": (
        {"max_duration_seconds": 30_000},
        OverrideKind.DURATION_ABOVE_DEFAULT,
        "max_duration_seconds",
        14_400,
        14_400,
        30_000,
    ),
}


@pytest.mark.parametrize("case", list(UPDATE_CASES))
def test_each_update_override_writes_exactly_one_row_with_the_value_before(admin_member, fleet, case):
    patch, kind, field, limit, before, chosen = UPDATE_CASES[case]
    event = start(admin_member)
    assert override_rows() == []

    curtailment_update(
        event=event, actor=Actor.for_user(admin_member.user), patch={**patch, "reason": "hold longer"}
    )

    [row] = override_rows()
    assert row.action == override_action(kind)
    assert row.reason == "hold longer"
    assert row.changes == {field: [before, chosen]}
    assert (
        row.metadata["operation"],
        row.metadata["limit"],
        row.metadata["before"],
        row.metadata["chosen"],
    ) == (
        "update",
        limit,
        before,
        chosen,
    )
    updated = AuditEvent.objects.get(action="curtailment.updated")
    assert updated.changes[field] == [before, chosen]


def test_an_update_with_both_overrides_writes_two_rows_and_keeps_the_event_reason(admin_member, fleet):
    event = start(admin_member)
    curtailment_update(
        event=event,
        actor=Actor.for_user(admin_member.user),
        patch={"restore_batch_interval_sec": 600, "max_duration_seconds": 30_000},
    )
    rows = override_rows()
    assert sorted(r.metadata["kind"] for r in rows) == [
        OverrideKind.DURATION_ABOVE_DEFAULT,
        OverrideKind.INTERVAL_ABOVE_CAP,
    ]
    assert {r.reason for r in rows} == {"grid request"}


def test_updates_within_the_rules_or_repeating_the_stored_value_write_no_override_row(
    admin_member, operator, fleet
):
    event = start(admin_member, restore_batch_interval_sec=900)
    assert len(override_rows()) == 1
    admin = Actor.for_user(admin_member.user)
    # The stored value again: no effective change, no override (and no update row).
    curtailment_update(event=event, actor=admin, patch={"restore_batch_interval_sec": 900})
    curtailment_update(
        event=event, actor=Actor.for_user(operator.user), patch={"restore_batch_interval_sec": 120}
    )
    curtailment_update(event=event, actor=admin, patch={"max_duration_seconds": 14_400, "reason": "same cap"})
    assert len(override_rows()) == 1
    assert AuditEvent.objects.filter(action="curtailment.updated").count() == 2


def test_a_refused_override_writes_the_denial_and_no_override_row(operator, fleet):
    with pytest.raises(Forbidden):
        start(operator, candidate_min_power_w_override=2500)
    event = start(operator)
    with pytest.raises(Forbidden):
        curtailment_update(
            event=event, actor=Actor.for_user(operator.user), patch={"max_duration_seconds": 30_000}
        )
    assert override_rows() == []
    assert AuditEvent.objects.filter(action="access.denied").count() == 2


def test_an_update_that_loses_its_race_writes_no_override_row(admin_member, fleet):
    event = start(admin_member)
    # Another process moved the event out of the updatable states after our read.
    CurtailmentEvent.objects.filter(pk=event.pk).update(state=EventState.RESTORING)
    with pytest.raises(Conflict):
        curtailment_update(
            event=event, actor=Actor.for_user(admin_member.user), patch={"restore_batch_interval_sec": 600}
        )
    assert override_rows() == []
    assert not AuditEvent.objects.filter(action="curtailment.updated").exists()
