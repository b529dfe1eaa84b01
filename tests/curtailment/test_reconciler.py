"""The reconciler against the fleet simulator over loopback HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from curtailment.fleet import fleet_sync, telemetry_poll
from curtailment.gateway import FleetGateway
from curtailment.models import (
    CurtailmentEvent,
    CurtailmentTarget,
    Device,
    OrgCurtailmentConfig,
    TargetState,
)
from curtailment.planning import StartRequest
from curtailment.reconciler import HEARTBEAT, TICK_FIELDS, default_gateway, load_targets, reconcile_tick
from curtailment.services import curtailment_start, curtailment_stop, curtailment_update
from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.observability.models import Heartbeat
from simulators.fleet.server import FleetSimulator, serve_in_thread
from tests.processes import ROOT, subprocess_env
from tests.servers import wait_for


@pytest.fixture
def sim():
    server, simulator, url = serve_in_thread(devices_count=40, seed=7, power_delay_s=0)
    # Every device healthy and paired, so tests choose exactly what goes wrong.
    for d in simulator.devices.values():
        d.status, d.pairing_status, d.driver = "active", "PAIRED", "antminer"
    yield simulator, url
    server.shutdown()


def knobs(url, **values):
    request = urllib.request.Request(
        f"{url}/control/knobs", data=json.dumps(values).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture
def wired(operator, sim):
    simulator, url = sim
    OrgCurtailmentConfig.objects.create(org=operator.org, gateway_url=url)
    with FleetGateway(url) as gateway:
        fleet_sync(org=operator.org, gateway=gateway)
        telemetry_poll(org=operator.org, gateway=gateway)
    return simulator, url


def start(member, kw=8.0, **extra):
    return curtailment_start(
        org=member.org,
        actor=Actor.for_user(member.user),
        req=StartRequest(target_kw=kw, reason="test", **extra),
    ).event


def states(event):
    return sorted(set(CurtailmentTarget.objects.filter(event=event).values_list("state", flat=True)))


def later(seconds):
    return clock.frozen(clock.now() + timedelta(seconds=seconds))


class GatewayRequests:
    """Counts the fleet simulator's /v1 requests in flight: `inject` runs once per request, after
    its body has been read and before the latency knob's sleep."""

    def __init__(self, simulator: FleetSimulator) -> None:
        self.in_flight = 0
        self._lock = threading.Lock()
        real = simulator.inject

        def inject() -> bool:
            with self._lock:
                self.in_flight += 1
            try:
                return real()
            finally:
                with self._lock:
                    self.in_flight -= 1

        simulator.inject = inject  # type: ignore[method-assign]


@pytest.mark.django_db
def test_an_event_runs_from_start_to_completed(operator, wired):
    simulator, _ = wired
    event = start(operator, kw=8.0)
    n = event.targets.count()

    reconcile_tick()
    event.refresh_from_db()
    assert event.state == "active"  # dispatched and confirmed in one tick: power fell at once
    assert event.started_at is not None
    assert states(event) == ["confirmed"]
    curtailed = [d for d in simulator.devices.values() if not d.mining]
    assert len(curtailed) == n

    curtailment_stop(event=event, actor=Actor.for_user(operator.user))
    for step in range(10):
        with later(31 * (step + 1)):
            reconcile_tick()
        event.refresh_from_db()
        if event.state == "completed":
            break
    assert event.state == "completed"
    assert states(event) == ["resolved"]
    assert all(d.mining for d in simulator.devices.values())
    actions = list(AuditEvent.objects.filter(target_id=str(event.pk)).values_list("action", flat=True))
    assert {
        "curtailment.started",
        "curtailment.activated",
        "curtailment.stopped",
        "curtailment.completed",
    } <= set(actions)
    hb = Heartbeat.objects.get(name=HEARTBEAT)
    assert hb.failures == 0 and hb.beats >= 2


@pytest.mark.django_db
def test_restore_goes_in_batches_of_the_effective_size_with_the_interval(operator, wired):
    event = start(operator, kw=500.0, tolerance_kw=499.9)  # all 40 devices: batch size 10
    reconcile_tick()
    curtailment_stop(event=event, actor=Actor.for_user(operator.user))
    event.refresh_from_db()
    assert event.effective_batch_size == 10

    reconcile_tick()  # first batch goes out at once
    assert CurtailmentTarget.objects.filter(event=event, state="dispatched").count() == 10
    reconcile_tick()  # confirms the batch; the interval (30 s) holds the next one
    assert CurtailmentTarget.objects.filter(event=event, state="resolved").count() == 10
    assert CurtailmentTarget.objects.filter(event=event, state="dispatched").count() == 0
    with later(31):
        reconcile_tick()
    assert CurtailmentTarget.objects.filter(event=event, state="dispatched").count() == 10


@pytest.mark.django_db
def test_a_device_that_never_confirms_burns_its_retries_and_the_event_goes_on(operator, wired):
    simulator, url = wired
    event = start(operator, kw=8.0)
    stubborn = event.targets.order_by("id").first()
    simulator.order = [stubborn.device_identifier] + [
        i for i in simulator.order if i != stubborn.device_identifier
    ]
    knobs(url, no_effect_fraction=1 / 40)

    reconcile_tick()
    stubborn.refresh_from_db()
    assert stubborn.state == "dispatched"
    for strike in range(1, 4):
        with later(301 * strike):
            reconcile_tick()  # confirmation timeout -> retry (redispatched on the same tick)
    stubborn.refresh_from_db()
    event.refresh_from_db()
    assert stubborn.state == "restore_failed"
    assert "curtail confirmation timeout" in stubborn.last_error
    assert event.state == "active"


@pytest.mark.django_db
def test_a_gateway_outage_fails_targets_after_three_strikes(operator, wired):
    _, url = wired
    event = start(operator, kw=3.0)
    knobs(url, error_rate=1.0)
    for _ in range(3):
        reconcile_tick()
    event.refresh_from_db()
    assert states(event) == ["restore_failed"]
    assert "HTTP 503" in event.targets.first().last_error
    assert event.state == "completed_with_failures"
    assert event.targets.first().retry_count == 3


@pytest.mark.django_db
def test_drift_is_detected_and_redispatched(operator, wired):
    simulator, url = wired
    event = start(operator, kw=3.0)
    reconcile_tick()
    target = event.targets.get()
    # Someone switches the miner back on behind our back.
    with FleetGateway(url) as gateway:
        gateway.command("uncurtail", "out-of-band", [target.device_identifier])
    reconcile_tick()
    target.refresh_from_db()
    assert target.state == "dispatched"  # drifted, then redispatched at once
    assert target.dispatch_attempt == 2
    reconcile_tick()
    target.refresh_from_db()
    assert target.state == "confirmed"
    assert not simulator.devices[target.device_identifier].mining


@pytest.mark.django_db
def test_max_duration_stops_the_event_by_itself(operator, wired):
    event = start(operator, kw=3.0, max_duration_seconds=600)
    reconcile_tick()
    with later(601):
        reconcile_tick()
    event.refresh_from_db()
    assert event.state == "restoring"
    assert AuditEvent.objects.filter(
        action="curtailment.max_duration_reached", target_id=str(event.pk)
    ).exists()


@pytest.mark.django_db
def test_one_events_failure_does_not_stop_the_others_and_is_in_the_heartbeat(operator, outsider, wired):
    good = start(operator, kw=3.0)
    from tests.curtailment.conftest import make_fleet

    make_fleet(outsider.org, 3, start=900)
    OrgCurtailmentConfig.objects.create(org=outsider.org, gateway_url="http://127.0.0.1:9/")
    broken = start(outsider, kw=3.0)

    def factory(config):
        if config.org_id == outsider.org.pk:
            raise RuntimeError("gateway misconfigured")
        return FleetGateway(config.gateway_url)

    result = reconcile_tick(gateway_for=factory)

    good.refresh_from_db()
    broken.refresh_from_db()
    assert (good.state, broken.state) == ("active", "pending")
    assert result.failures == 1
    hb = Heartbeat.objects.get(name=HEARTBEAT)
    assert "1 failure(s)" in hb.last_error


@pytest.mark.django_db
def test_database_round_trips_grow_with_chunks_not_with_targets(operator, wired, settings):
    settings.FLEETOPS_CURTAIL_CHUNK_SIZE = 100
    small = start(operator, kw=3.0)
    with CaptureQueriesContext(connection) as one:
        reconcile_tick()
    CurtailmentEvent.objects.filter(pk=small.pk).update(state="cancelled")
    CurtailmentTarget.objects.filter(event=small).update(state="resolved")
    big = start(operator, kw=500.0, tolerance_kw=499.9)  # every eligible device
    assert big.targets.count() == 39
    with CaptureQueriesContext(connection) as many:
        reconcile_tick()
    assert len(many) <= len(one) + 3, (len(one), len(many))


@pytest.mark.django_db
def test_database_round_trips_do_not_grow_with_gateway_commands_either(operator, wired, settings):
    simulator, url = wired
    settings.FLEETOPS_CURTAIL_CHUNK_SIZE = 100
    first = start(operator, kw=500.0, tolerance_kw=499.9)
    with CaptureQueriesContext(connection) as one_command:
        reconcile_tick()
    assert simulator.counters["curtail"] == 1
    assert states(first) == [TargetState.CONFIRMED]
    CurtailmentEvent.objects.filter(pk=first.pk).update(state="cancelled")
    CurtailmentTarget.objects.filter(event=first).update(state="resolved")
    # Every device mining again (a reset re-seeds them; the fixture's healthy fleet is set again).
    simulator.reset()
    for d in simulator.devices.values():
        d.status, d.pairing_status, d.driver = "active", "PAIRED", "antminer"
    with FleetGateway(url) as gateway:
        telemetry_poll(org=operator.org, gateway=gateway)
    # Four devices a command: ten gateway commands, the same set-based writes.
    settings.FLEETOPS_CURTAIL_CHUNK_SIZE = 4
    second = start(operator, kw=500.0, tolerance_kw=499.9)
    with CaptureQueriesContext(connection) as ten_commands:
        reconcile_tick()
    assert simulator.counters["curtail"] == 10
    assert states(second) == [TargetState.CONFIRMED]
    assert len(ten_commands) == len(one_command), (len(one_command), len(ten_commands))


@pytest.mark.django_db
def test_a_tick_reads_only_the_target_columns_it_needs_and_the_rest_load_on_access(operator, wired):
    event = start(operator, kw=3.0)
    loaded = load_targets(CurtailmentTarget.objects.filter(event=event).order_by("id"))
    assert loaded and all(isinstance(t, CurtailmentTarget) for t in loaded)
    first = loaded[0]
    assert first.get_deferred_fields() == {
        f.attname for f in CurtailmentTarget._meta.concrete_fields if f.attname not in TICK_FIELDS
    }
    with CaptureQueriesContext(connection) as deferred:
        assert first.added_at == CurtailmentTarget.objects.get(pk=first.pk).added_at
    assert len(deferred) == 2  # the deferred load, then the comparison's own read
    assert first.event_id == event.pk and first.state == TargetState.PENDING


@pytest.mark.django_db(transaction=True)
def test_only_one_tick_runs_at_a_time(operator, wired):
    start(operator, kw=3.0)
    results = {}
    inside, release = threading.Event(), threading.Event()

    def held_gateway(config: OrgCurtailmentConfig) -> FleetGateway:
        # The first tick holds the reconciler's lock here until the second tick has come and gone.
        inside.set()
        assert release.wait(30)
        return default_gateway(config)

    def slow():
        try:
            results["first"] = reconcile_tick(gateway_for=held_gateway)
        finally:
            connection.close()

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        assert inside.wait(30), "the first tick never reached its gateway"
        results["second"] = reconcile_tick()
    finally:
        release.set()
        thread.join(20)
    assert results["first"].ran is True
    assert results["second"].ran is False


@pytest.mark.django_db(transaction=True)
def test_a_killed_reconciler_leaves_orphans_that_are_redispatched_with_the_same_command_id(operator, wired):
    simulator, url = wired
    event = start(operator, kw=8.0)
    gateway = GatewayRequests(simulator)
    knobs(url, latency_ms=3000)  # the gateway call is in flight when we kill the process
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "curtailment_reconcile", "--once"],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def command_in_flight() -> bool:
        # DISPATCHING is committed before the command is sent, and nothing else is sent meanwhile:
        # a request inside the gateway's latency now is the command, fully received.
        return states(event) == ["dispatching"] and gateway.in_flight > 0

    wait_for(command_in_flight, timeout=60, what="the command to reach the gateway")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    first_ids = set(CurtailmentTarget.objects.filter(event=event).values_list("last_command_id", flat=True))

    knobs(url, latency_ms=0)
    # The gateway finishes the request the dead process sent.
    wait_for(
        lambda: gateway.in_flight == 0, timeout=30, what="the gateway to finish the dead process's command"
    )
    assert any(entry["kind"] == "curtail" for entry in simulator.log)
    reconcile_tick()

    event.refresh_from_db()
    assert event.state == "active"
    assert states(event) == ["confirmed"]
    log = [entry for entry in simulator.log if entry["kind"] == "curtail"]
    executed = [entry for entry in log if not entry["deduplicated"]]
    assert {entry["command_id"] for entry in log} == first_ids
    assert len(executed) == len(first_ids)  # each command acted once; the redispatch was deduplicated
    assert any(entry["deduplicated"] for entry in log)


@pytest.mark.django_db
def test_fleet_sync_upserts_and_soft_deletes(operator, sim):
    simulator, url = sim
    with FleetGateway(url) as gateway:
        first = fleet_sync(org=operator.org, gateway=gateway)
        del simulator.devices["m-00001"]
        second = fleet_sync(org=operator.org, gateway=gateway)
        stored = telemetry_poll(org=operator.org, gateway=gateway)
    assert (first.created, first.updated) == (40, 0)
    assert (second.created, second.updated, second.deleted) == (0, 39, 1)
    assert Device.objects.filter(deleted_at__isnull=True).count() == 39
    assert stored == 39
    assert Device.objects.filter(last_power_w__isnull=False).count() == 39


@pytest.mark.django_db(transaction=True)
def test_a_reconciler_killed_before_its_command_left_recovers_with_one_command_per_target(operator, wired):
    """The gateway URL points at a socket that accepts and never answers: the process is killed
    after committing DISPATCHING and before any command reached the gateway."""
    simulator, url = wired
    import socket

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    OrgCurtailmentConfig.objects.filter(org=operator.org).update(
        gateway_url=f"http://127.0.0.1:{hole.getsockname()[1]}"
    )
    event = start(operator, kw=8.0)
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "curtailment_reconcile", "--once"],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and states(event) != ["dispatching"]:
        time.sleep(0.05)
    assert states(event) == ["dispatching"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    hole.close()
    assert not simulator.log  # nothing reached the real gateway

    OrgCurtailmentConfig.objects.filter(org=operator.org).update(gateway_url=url)
    reconcile_tick()

    event.refresh_from_db()
    assert event.state == "active"
    commands = [entry for entry in simulator.log if entry["kind"] == "curtail"]
    assert commands and not any(entry["deduplicated"] for entry in commands)
    dispatched = sum(entry["dispatched_count"] for entry in commands)
    assert dispatched == event.targets.count()  # exactly one effective command per target


@pytest.mark.django_db(transaction=True)
def test_two_reconciler_processes_never_double_dispatch(operator, wired):
    simulator, url = wired
    knobs(url, latency_ms=150)
    event = start(operator, kw=500.0, tolerance_kw=499.9)  # every device
    loops = [
        subprocess.Popen(
            [sys.executable, "manage.py", "curtailment_reconcile", "--loop", "--interval", "0.2"],
            cwd=ROOT,
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and CurtailmentEvent.objects.get(pk=event.pk).state == "pending":
            time.sleep(0.2)
        event.refresh_from_db()
        assert event.state == "active"
        actor = Actor.for_user(operator.user)
        event = curtailment_update(event=event, actor=actor, patch={"restore_batch_interval_sec": 0})
        curtailment_stop(event=event, actor=actor)
        while time.monotonic() < deadline and CurtailmentEvent.objects.get(pk=event.pk).state == "restoring":
            time.sleep(0.2)
    finally:
        for proc in loops:
            proc.send_signal(signal.SIGTERM)
        for proc in loops:
            proc.wait(20)
    assert CurtailmentEvent.objects.get(pk=event.pk).state == "completed"
    executed: dict[str, int] = {}
    for entry in simulator.log:
        if not entry["deduplicated"]:
            executed[entry["kind"]] = executed.get(entry["kind"], 0) + entry["dispatched_count"]
    targets = event.targets.count()
    # Every device got exactly one curtail and one uncurtail: no tick ever ran twice at once.
    assert executed == {"curtail": targets, "uncurtail": targets}
