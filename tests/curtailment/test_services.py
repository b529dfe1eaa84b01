from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection

from curtailment.models import (
    CurtailmentEvent,
    CurtailmentTarget,
    DesiredState,
    EventState,
    OrgCurtailmentConfig,
    TargetState,
)
from curtailment.planning import (
    ADMIN_OVERRIDE_FIELDS,
    DEVICES_NOT_FOUND,
    UNBOUNDED_WITH_MAX,
    PlanRequest,
    StartRequest,
    curtailment_preview,
    trimmed_snapshot,
)
from curtailment.services import (
    FORCE_ADMIN_ONLY,
    TERMINATE_IN_FLIGHT,
    UPDATE_EMPTY,
    curtailment_start,
    curtailment_stop,
    curtailment_terminate,
    curtailment_update,
)
from curtailment.targets import SWEPT_ERROR
from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.lib.errors import Conflict, Forbidden, NotFound, ValidationFailed
from tests.curtailment.conftest import make_fleet

pytestmark = pytest.mark.django_db


def start(member, **kw):
    kw.setdefault("target_kw", 6.0)
    kw.setdefault("reason", "grid request")
    return curtailment_start(org=member.org, actor=Actor.for_user(member.user), req=StartRequest(**kw))


def actor(member):
    return Actor.for_user(member.user)


# --- preview ------------------------------------------------------------------------------------


def test_preview_plans_least_efficient_first_and_writes_nothing(operator, fleet):
    plan = curtailment_preview(org=operator.org, actor=actor(operator), req=PlanRequest(target_kw=7.0))

    assert [s.candidate.identifier for s in plan.selected] == ["m-009", "m-008", "m-007"]
    assert plan.estimated_reduction_kw == 9.0
    assert not CurtailmentEvent.objects.exists()
    assert not AuditEvent.objects.exists()
    assert not OrgCurtailmentConfig.objects.exists()


def test_preview_min_power_override_is_admin_only(operator, admin_member, fleet):
    with pytest.raises(Forbidden, match=ADMIN_OVERRIDE_FIELDS):
        curtailment_preview(
            org=operator.org,
            actor=actor(operator),
            req=PlanRequest(target_kw=1, candidate_min_power_w_override=10),
        )
    with pytest.raises(ValidationFailed) as caught:
        curtailment_preview(
            org=operator.org,
            actor=actor(admin_member),
            req=PlanRequest(target_kw=1, candidate_min_power_w_override=3500),
        )
    # Every device hashes at 3 kW, below the overridden 3.5 kW floor: the dead-meter reason.
    assert "candidate_min_power_w=3500W; excluded: power_telemetry_unreliable=10" in caught.value.message
    plan = curtailment_preview(
        org=operator.org,
        actor=actor(admin_member),
        req=PlanRequest(target_kw=1, candidate_min_power_w_override=2500),
    )
    assert plan.floor_w == 2500
    assert len(plan.selected) == 1


def test_preview_of_unknown_or_foreign_devices_is_not_found(operator, outsider, fleet):
    make_fleet(outsider.org, 2, start=500)
    req = PlanRequest(target_kw=1, scope_type="device_list", device_identifiers=("m-001", "m-500", "nope"))
    with pytest.raises(NotFound) as caught:
        curtailment_preview(org=operator.org, actor=actor(operator), req=req)
    assert caught.value.message == DEVICES_NOT_FOUND.format(ids=["m-500", "nope"])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target_kw": 0}, "target_kw"),
        ({"target_kw": float("inf")}, "target_kw"),
        ({"target_kw": 5, "tolerance_kw": 5}, "tolerance_kw"),
        ({"target_kw": 5, "tolerance_kw": -1}, "tolerance_kw"),
        ({"target_kw": 5, "include_maintenance": True}, "force_include_maintenance"),
        ({"target_kw": 5, "scope_type": "device_list"}, "device_identifiers"),
        ({"target_kw": 5, "device_identifiers": ("m-1",)}, "device_identifiers"),
        ({"target_kw": 5, "scope_type": "device_sets"}, "scope_type"),
    ],
)
def test_preview_validation(admin_member, fleet, kwargs, field):
    with pytest.raises(ValidationFailed) as caught:
        curtailment_preview(org=admin_member.org, actor=actor(admin_member), req=PlanRequest(**kwargs))
    assert field in caught.value.fields


def test_insufficient_load_is_a_validation_error_with_counts(operator, fleet):
    with pytest.raises(ValidationFailed) as caught:
        curtailment_preview(org=operator.org, actor=actor(operator), req=PlanRequest(target_kw=1000))
    assert caught.value.code == "insufficient_load"
    assert caught.value.message.startswith("insufficient curtailable load: 30.000 kW available, 1000.000 kW")


# --- start --------------------------------------------------------------------------------------


def test_start_creates_a_pending_event_with_targets_snapshot_and_audit(operator, fleet):
    result = start(operator, target_kw=7.0, restore_batch_interval_sec=0)

    event = result.event
    assert result.created
    assert event.state == EventState.PENDING
    assert event.restore_batch_interval_sec == 30  # 0 is normalised
    assert event.max_duration_seconds == 14400  # the org default
    assert event.effective_batch_size == 10
    assert event.source_actor_type == "user"
    targets = list(event.targets.order_by("device_identifier"))
    assert [t.device_identifier for t in targets] == ["m-007", "m-008", "m-009"]
    assert {(t.state, t.desired_state, t.baseline_power_w) for t in targets} == {
        ("pending", "curtailed", 3000.0)
    }
    assert event.decision_snapshot["selected_count"] == 3
    audit = AuditEvent.objects.get(action="curtailment.started")
    assert audit.metadata["event_uuid"] == str(event.uuid)
    assert audit.reason == "grid request"


def test_start_gates_for_non_admins(operator, fleet):
    with pytest.raises(Forbidden):
        start(operator, restore_batch_interval_sec=301)
    with pytest.raises(Forbidden):
        start(operator, max_duration_seconds=20000)
    with pytest.raises(Forbidden, match=ADMIN_OVERRIDE_FIELDS):
        start(operator, allow_unbounded=True)
    with pytest.raises(Forbidden, match=ADMIN_OVERRIDE_FIELDS):
        start(operator, include_maintenance=True, force_include_maintenance=True)
    assert not CurtailmentEvent.objects.exists()


def test_admins_may_go_past_the_caps_and_each_override_is_audited(admin_member, fleet):
    event = start(
        admin_member,
        allow_unbounded=True,
        include_maintenance=True,
        force_include_maintenance=True,
        restore_batch_interval_sec=900,
    ).event
    assert event.max_duration_seconds is None
    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {
        "curtailment.started",
        "curtailment.override.unbounded",
        "curtailment.override.force_include_maintenance",
        "curtailment.override.interval_above_cap",
    } <= actions
    with pytest.raises(ValidationFailed, match=UNBOUNDED_WITH_MAX):
        start(admin_member, allow_unbounded=True, max_duration_seconds=60)


@pytest.mark.parametrize("reason", ["", "   ", "x" * 257])
def test_start_needs_a_reason(operator, fleet, reason):
    with pytest.raises(ValidationFailed):
        start(operator, reason=reason)


def test_the_same_idempotency_key_replays_the_live_event_and_is_free_again_once_terminal(admin_member, fleet):
    first = start(admin_member, idempotency_key="k1")
    again = start(admin_member, idempotency_key="k1", target_kw=99.0)
    assert (again.created, again.event.pk) == (False, first.event.pk)
    assert AuditEvent.objects.filter(action="curtailment.started").count() == 1

    curtailment_terminate(
        event=first.event,
        actor=Actor.for_user(admin_member.user),
        target_state="cancelled",
        reason="test",
    )
    with clock.frozen(clock.now() + timedelta(hours=1)):
        make_fleet(admin_member.org, 3, start=100)
        fresh = start(admin_member, idempotency_key="k1", target_kw=3.0)
    assert fresh.created and fresh.event.pk != first.event.pk


def test_an_external_reference_replays_too(operator, fleet):
    first = start(operator, external_source="grid", external_reference="dr-42")
    again = start(operator, external_source="grid", external_reference="dr-42")
    assert again.event.pk == first.event.pk and not again.created


def test_devices_in_a_live_event_are_skipped_by_the_next_start(operator, fleet):
    first = start(operator, target_kw=6.0)
    second = start(operator, target_kw=6.0)
    first_ids = set(first.event.targets.values_list("device_identifier", flat=True))
    second_ids = set(second.event.targets.values_list("device_identifier", flat=True))
    assert first_ids.isdisjoint(second_ids)
    assert second.event.decision_snapshot["skipped"][0]["reason"] == "active_event"


@pytest.mark.django_db(transaction=True)
def test_concurrent_starts_never_share_a_device(operator, org):
    make_fleet(org, 4)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def run():
        try:
            barrier.wait(10)
            outcomes.append(
                "created" if start(operator, target_kw=12.0, tolerance_kw=0.5).created else "replay"
            )
        except (Conflict, ValidationFailed) as exc:
            outcomes.append(exc.code)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)

    assert outcomes.count("created") == 1
    assert set(outcomes) <= {"created", "devices_taken", "insufficient_load"}
    live = CurtailmentTarget.objects.exclude(state__in=["resolved", "restore_failed"])
    assert live.count() == 4
    assert live.values("device").distinct().count() == 4


@pytest.mark.django_db(transaction=True)
def test_a_race_loser_with_the_same_key_gets_the_winners_event(operator, org):
    make_fleet(org, 10)
    barrier = threading.Barrier(3)
    results = []

    def run():
        try:
            barrier.wait(10)
            results.append(start(operator, target_kw=3.0, idempotency_key="same"))
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)

    assert len(results) == 3
    assert len({r.event.pk for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert CurtailmentEvent.objects.count() == 1


# --- stop / update / terminate -------------------------------------------------------------------


def test_stop_moves_to_restoring_and_resets_targets(operator, fleet):
    event = start(operator).event
    CurtailmentTarget.objects.filter(event=event).update(state="confirmed", retry_count=2, last_error="x")

    stopped = curtailment_stop(event=event, actor=Actor.for_user(operator.user))

    assert stopped.state == EventState.RESTORING
    assert set(event.targets.values_list("state", "desired_state", "retry_count", "last_error")) == {
        ("pending", "active", 0, "")
    }
    assert AuditEvent.objects.filter(action="curtailment.stopped").count() == 1
    again = curtailment_stop(event=event, actor=Actor.for_user(operator.user))
    assert again.state == EventState.RESTORING
    assert AuditEvent.objects.filter(action="curtailment.stopped").count() == 1


def test_stop_honours_the_minimum_duration_unless_an_admin_forces_it(operator, admin_member, fleet):
    event = start(operator, min_curtailed_duration_sec=600).event
    CurtailmentEvent.objects.filter(pk=event.pk).update(state="active", started_at=clock.now())
    event.refresh_from_db()
    with pytest.raises(Conflict) as caught:
        curtailment_stop(event=event, actor=Actor.for_user(operator.user))
    assert caught.value.code == "min_duration_not_elapsed"
    with pytest.raises(Forbidden, match=FORCE_ADMIN_ONLY):
        curtailment_stop(event=event, actor=Actor.for_user(operator.user), force=True)
    forced = curtailment_stop(event=event, actor=Actor.for_user(admin_member.user), force=True)
    assert forced.state == EventState.RESTORING
    assert AuditEvent.objects.filter(action="curtailment.force_stopped").exists()


def test_stop_of_a_terminal_event_is_a_conflict(admin_member, fleet):
    event = start(admin_member).event
    actor = Actor.for_user(admin_member.user)
    curtailment_terminate(event=event, actor=actor, target_state="failed", reason="r")
    with pytest.raises(Conflict) as caught:
        curtailment_stop(event=event, actor=actor)
    assert caught.value.code == "state_conflict"


def test_update_collapses_no_ops_and_gates_the_effective_patch(operator, fleet):
    event = start(operator).event
    actor = Actor.for_user(operator.user)
    with pytest.raises(ValidationFailed, match=UPDATE_EMPTY):
        curtailment_update(event=event, actor=actor, patch={})
    same = curtailment_update(event=event, actor=actor, patch={"restore_batch_interval_sec": 30})
    assert same.pk == event.pk
    assert not AuditEvent.objects.filter(action="curtailment.updated").exists()
    with pytest.raises(Forbidden):
        curtailment_update(event=event, actor=actor, patch={"max_duration_seconds": 99999})

    updated = curtailment_update(
        event=event,
        actor=actor,
        patch={"restore_batch_interval_sec": 60, "reason": "new"},
    )
    assert (updated.restore_batch_interval_sec, updated.reason) == (60, "new")
    audit = AuditEvent.objects.get(action="curtailment.updated")
    assert audit.changes == {"reason": ["grid request", "new"], "restore_batch_interval_sec": [30, 60]}


def test_update_is_refused_once_restoring(operator, fleet):
    event = start(operator).event
    actor = Actor.for_user(operator.user)
    curtailment_stop(event=event, actor=actor)
    event.refresh_from_db()
    with pytest.raises(Conflict) as caught:
        curtailment_update(event=event, actor=actor, patch={"reason": "x"})
    assert caught.value.code == "state_conflict"


def test_terminate_needs_an_interactive_admin(operator, admin_member, fleet):
    event = start(admin_member).event
    with pytest.raises(Forbidden):
        curtailment_terminate(
            event=event,
            actor=Actor.for_user(operator.user),
            target_state="cancelled",
            reason="r",
        )
    token_actor = Actor.for_user(admin_member.user, interactive=False)
    with pytest.raises(Forbidden):
        curtailment_terminate(event=event, actor=token_actor, target_state="cancelled", reason="r")


def test_terminate_refuses_while_curtail_commands_are_in_flight(admin_member, fleet):
    event = start(admin_member).event
    CurtailmentTarget.objects.filter(event=event).update(state=TargetState.DISPATCHED)
    with pytest.raises(Conflict) as caught:
        curtailment_terminate(
            event=event,
            actor=Actor.for_user(admin_member.user),
            target_state="cancelled",
            reason="stuck",
        )
    assert (caught.value.code, caught.value.message) == ("in_flight_commands", TERMINATE_IN_FLIGHT)


def test_terminate_sweeps_targets_and_echoes_the_same_state(admin_member, fleet):
    event = start(admin_member).event
    actor = Actor.for_user(admin_member.user)
    done, transitioned = curtailment_terminate(
        event=event, actor=actor, target_state="cancelled", reason="gateway down"
    )
    assert (done.state, transitioned) == ("cancelled", True)
    assert done.ended_at is not None
    # Nothing was ever sent to these devices: cancelled, and the reason is on the audit row only.
    assert set(event.targets.values_list("state", "last_error")) == {("cancelled", "")}
    row = AuditEvent.objects.get(action="curtailment.admin_terminated")
    assert row.reason == "gateway down"
    assert (row.metadata["targets_cancelled"], row.metadata["targets_restore_failed"]) == (
        event.targets.count(),
        0,
    )
    echo, transitioned = curtailment_terminate(
        event=event, actor=actor, target_state="cancelled", reason="again"
    )
    assert not transitioned
    assert echo.state == "cancelled"
    assert AuditEvent.objects.filter(action="curtailment.admin_terminated_replay").count() == 1
    with pytest.raises(Conflict) as caught:
        curtailment_terminate(event=event, actor=actor, target_state="failed", reason="x")
    assert caught.value.code == "state_conflict"


def test_terminate_writes_off_targets_that_were_sent_a_command_without_the_reason(admin_member, fleet):
    event = start(admin_member).event
    tried = event.targets.order_by("id").first()
    # A curtail was sent and failed back to pending: the device may have acted on it.
    CurtailmentTarget.objects.filter(pk=tried.pk).update(dispatch_attempt=1, last_command_id="cmd-1")
    curtailment_terminate(
        event=event, actor=Actor.for_user(admin_member.user), target_state="failed", reason="gateway down"
    )
    tried.refresh_from_db()
    assert (tried.state, tried.last_error) == ("restore_failed", SWEPT_ERROR)
    assert "gateway down" not in tried.last_error
    others = set(event.targets.exclude(pk=tried.pk).values_list("state", flat=True))
    assert others == {"cancelled"}


def test_a_restoring_event_can_be_terminated_with_uncurtails_in_flight(admin_member, fleet):
    event = start(admin_member).event
    actor = Actor.for_user(admin_member.user)
    curtailment_stop(event=event, actor=actor)
    CurtailmentTarget.objects.filter(event=event).update(state=TargetState.DISPATCHED)
    assert set(event.targets.values_list("desired_state", flat=True)) == {DesiredState.ACTIVE}
    done, _ = curtailment_terminate(event=event, actor=actor, target_state="failed", reason="r")
    assert done.state == "failed"


def test_the_list_snapshot_aggregates_skips_by_reason():
    snapshot = {
        "selected_count": 2,
        "skipped": [
            {"device_identifier": "a", "reason": "maintenance"},
            {"device_identifier": "b", "reason": "maintenance"},
            {"device_identifier": "c", "reason": ""},
        ],
    }
    assert trimmed_snapshot(snapshot) == {"selected_count": 2, "skipped_aggregate": {"maintenance": 2}}
    assert trimmed_snapshot({"skipped": "odd"}) == {"skipped": "odd"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_duration_seconds", 604_801),
        ("max_duration_seconds", -1),
        ("restore_batch_interval_sec", 3601),
        ("restore_batch_size", 10_001),
        ("min_curtailed_duration_sec", -5),
        ("idempotency_key", "k" * 257),
        ("external_source", "s" * 257),
        ("external_reference", "r" * 257),
    ],
)
def test_each_start_cap_is_enforced_and_nothing_is_written(admin_member, fleet, field, value):
    with pytest.raises(ValidationFailed):
        start(admin_member, **{field: value})
    assert not CurtailmentEvent.objects.exists()


def test_every_service_call_is_counted_by_outcome(operator, fleet):
    from curtailment.metrics import OPERATIONS

    ok = OPERATIONS.labels(operation="start", outcome="ok")._value.get()
    forbidden = OPERATIONS.labels(operation="start", outcome="permission_denied")._value.get()
    start(operator)
    with pytest.raises(Forbidden):
        start(operator, allow_unbounded=True)
    assert OPERATIONS.labels(operation="start", outcome="ok")._value.get() == ok + 1
    assert OPERATIONS.labels(operation="start", outcome="permission_denied")._value.get() == forbidden + 1
