"""Every refusal inside a curtailment service writes the one `access.denied` row (what was asked,
by whom, in which organization) and changes nothing else, like a refusal at the API or admin edge."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from curtailment.models import CurtailmentEvent, OrgCurtailmentConfig
from curtailment.planning import (
    WHAT_ALLOW_UNBOUNDED,
    WHAT_DURATION_ABOVE_DEFAULT,
    WHAT_FORCE_MAINTENANCE,
    WHAT_INTERVAL_ABOVE_CAP,
    WHAT_MIN_POWER_OVERRIDE,
    WHAT_PREVIEW,
    PlanRequest,
    StartRequest,
    curtailment_preview,
)
from curtailment.services import (
    WHAT_CONFIG,
    WHAT_FORCE_STOP,
    WHAT_START,
    WHAT_TERMINATE,
    curtailment_config_update,
    curtailment_start,
    curtailment_stop,
    curtailment_terminate,
    curtailment_update,
)
from fleetops.access.models import Organization
from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib.errors import Forbidden

pytestmark = pytest.mark.django_db


@dataclass
class Who:
    org: Organization
    viewer: Actor
    operator: Actor
    admin: Actor
    admin_token: Actor
    outsider: Actor
    event: CurtailmentEvent


@pytest.fixture
def who(viewer, operator, admin_member, outsider, fleet) -> Who:
    admin = Actor.for_user(admin_member.user)
    event = curtailment_start(
        org=admin_member.org, actor=admin, req=StartRequest(target_kw=3.0, reason="grid request")
    ).event
    return Who(
        org=admin_member.org,
        viewer=Actor.for_user(viewer.user),
        operator=Actor.for_user(operator.user),
        admin=admin,
        admin_token=Actor.for_user(admin_member.user, interactive=False),
        outsider=Actor.for_user(outsider.user),
        event=event,
    )


def _start(actor_of: Callable[[Who], Actor], **kw: Any) -> Callable[[Who], Any]:
    def run(w: Who) -> Any:
        req = StartRequest(target_kw=3.0, reason="more", **kw)
        return curtailment_start(org=w.org, actor=actor_of(w), req=req)

    return run


def _update(patch: dict[str, Any]) -> Callable[[Who], Any]:
    return lambda w: curtailment_update(event=w.event, actor=w.operator, patch=patch)


# (the refused call, metadata.what, metadata.asked or None)
REFUSALS: dict[str, tuple[Callable[[Who], Any], str, dict[str, Any] | None]] = {
    "operator force-stops": (
        lambda w: curtailment_stop(event=w.event, actor=w.operator, force=True, reason="now"),
        WHAT_FORCE_STOP,
        {"force": True},
    ),
    "viewer stops": (
        lambda w: curtailment_stop(event=w.event, actor=w.viewer, reason="now"),
        "curtailment.event: pending -> restoring",
        None,
    ),
    "viewer starts": (_start(lambda w: w.viewer), WHAT_START, None),
    "another organization's admin starts": (_start(lambda w: w.outsider), WHAT_START, None),
    "operator asks for allow_unbounded": (
        _start(lambda w: w.operator, allow_unbounded=True),
        WHAT_ALLOW_UNBOUNDED,
        {"allow_unbounded": True},
    ),
    "operator asks for force_include_maintenance": (
        _start(lambda w: w.operator, include_maintenance=True, force_include_maintenance=True),
        WHAT_FORCE_MAINTENANCE,
        {"force_include_maintenance": True},
    ),
    "operator starts with a duration above the org default": (
        _start(lambda w: w.operator, max_duration_seconds=20_000),
        WHAT_DURATION_ABOVE_DEFAULT,
        {"max_duration_seconds": 20_000},
    ),
    "operator raises the duration above the org default": (
        _update({"max_duration_seconds": 20_000}),
        WHAT_DURATION_ABOVE_DEFAULT,
        {"max_duration_seconds": 20_000},
    ),
    "operator starts with an interval above the cap": (
        _start(lambda w: w.operator, restore_batch_interval_sec=301),
        WHAT_INTERVAL_ABOVE_CAP,
        {"restore_batch_interval_sec": 301},
    ),
    "operator raises the interval above the cap": (
        _update({"restore_batch_interval_sec": 301}),
        WHAT_INTERVAL_ABOVE_CAP,
        {"restore_batch_interval_sec": 301},
    ),
    "operator starts with a min-power override": (
        _start(lambda w: w.operator, candidate_min_power_w_override=100),
        WHAT_MIN_POWER_OVERRIDE,
        {"candidate_min_power_w_override": 100},
    ),
    "operator previews with a min-power override": (
        lambda w: curtailment_preview(
            org=w.org, actor=w.operator, req=PlanRequest(target_kw=3.0, candidate_min_power_w_override=100)
        ),
        WHAT_MIN_POWER_OVERRIDE,
        {"candidate_min_power_w_override": 100},
    ),
    "another organization's admin previews": (
        lambda w: curtailment_preview(org=w.org, actor=w.outsider, req=PlanRequest(target_kw=3.0)),
        WHAT_PREVIEW,
        None,
    ),
    "operator terminates": (
        lambda w: curtailment_terminate(
            event=w.event, actor=w.operator, target_state="cancelled", reason="r"
        ),
        WHAT_TERMINATE,
        {"target_state": "cancelled"},
    ),
    "admin terminates through a token": (
        lambda w: curtailment_terminate(
            event=w.event, actor=w.admin_token, target_state="failed", reason="r"
        ),
        WHAT_TERMINATE,
        {"target_state": "failed"},
    ),
    "operator changes the org config": (
        lambda w: curtailment_config_update(
            org=w.org, actor=w.operator, values={"candidate_min_power_w": 10}
        ),
        WHAT_CONFIG,
        None,
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_each_refusal_writes_one_denial_row_and_nothing_else(who, case):
    call, what, asked = REFUSALS[case]
    events_before = list(CurtailmentEvent.objects.values())
    audit_before = AuditEvent.objects.count()

    with pytest.raises(Forbidden):
        call(who)

    assert AuditEvent.objects.count() == audit_before + 1
    denial = AuditEvent.objects.latest("id")
    assert denial.action == "access.denied"
    assert denial.metadata["what"] == what
    assert denial.metadata["surface"] == "service"
    assert denial.org_id == who.org.pk
    if asked is not None:
        assert denial.metadata["asked"] == asked
    assert list(CurtailmentEvent.objects.values()) == events_before
    assert not OrgCurtailmentConfig.objects.filter(candidate_min_power_w=10).exists()


def test_the_token_refusal_names_the_interactive_session(who):
    with pytest.raises(Forbidden):
        curtailment_terminate(event=who.event, actor=who.admin_token, target_state="failed", reason="r")
    denial = AuditEvent.objects.get(action="access.denied")
    assert denial.metadata["required_role"] == "admin (interactive session)"
    assert denial.metadata["role"] == "admin"
