"""B1: one curtailment event over a whole simulated fleet (every device a target).

Portal path: the real reconciler ticks (start -> every target confirmed; stop -> every target
resolved) over loopback HTTP to the simulator, running as its own process, with 0 ms and 20 ms
device latency. Raw baseline, same run, same rows and schema: psycopg set-based UPDATEs doing the
same state writes (DISPATCHING, DISPATCHED, CONFIRMED). Also the row-by-row ORM path (on at most
`--orm-rows` targets: it is measured as a rate, and 300,000 single-row saves take minutes).

The ratio is state-write throughput: raw time / the time the reconciler spends in its target-state
writes. End-to-end phase times (HTTP, telemetry, event transitions, audit) are printed beside it,
with the goals at 20 ms device latency: curtail (start -> all confirmed) <= 30 s and restore
(stop -> all resolved, default restore batch size, interval 0) <= 60 s.

    python -m bench.b1_reconciler [--devices 10000] [--runs 5] [--orm-rows 10000]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

from bench.common import Timer, median_of, result_line, setup_django


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def control(base: str, path: str, body: dict[str, object]) -> None:
    request = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    urllib.request.urlopen(request, timeout=10).close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--devices", "--targets", dest="devices", type=int, default=10_000, help="fleet size = targets"
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--orm-rows", type=int, default=10_000, help="targets of the row-by-row ORM run")
    args = parser.parse_args()
    server = setup_django("fleetops_bench_b1")  # noqa: F841 - keeps an embedded server alive

    from django.contrib.auth import get_user_model
    from django.db import connection

    from curtailment import reconciler
    from curtailment.fleet import fleet_sync, telemetry_store
    from curtailment.gateway import FleetGateway
    from curtailment.models import CurtailmentEvent, CurtailmentTarget, OrgCurtailmentConfig
    from curtailment.planning import StartRequest
    from curtailment.services import curtailment_start, curtailment_stop, curtailment_update
    from fleetops.access.models import Membership, Organization, Role
    from fleetops.audit.actors import Actor
    from fleetops.lib import clock

    n = args.devices
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    simulator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulators.fleet",
            "--port",
            str(port),
            "--devices",
            str(n),
            "--power-delay-s",
            "0",
            "--all-healthy",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_http(f"{url}/control/state")
        org = Organization.objects.create(name="Bench", slug="bench")
        user = get_user_model().objects.create(username="bench", is_staff=True)
        Membership.objects.create(user=user, org=org, role=Role.ADMIN)
        OrgCurtailmentConfig.objects.create(org=org, gateway_url=url, post_event_cooldown_sec=0)
        with FleetGateway(url) as gateway:
            fleet_sync(org=org, gateway=gateway)
        actor = Actor.for_user(user)

        # Time spent in the reconciler's target-state writes (every one goes through EventRun.write:
        # a named set-based move of curtailment.targets through the transition kernel).
        write_time = [0.0]
        original_write = reconciler.EventRun.write

        def timed_write(self: Any, *a: Any, **kw: Any) -> set[int]:
            started = time.perf_counter()
            try:
                return original_write(self, *a, **kw)
            finally:
                write_time[0] += time.perf_counter() - started

        reconciler.EventRun.write = timed_write  # type: ignore[method-assign]

        identifiers = [f"m-{i:05d}" for i in range(1, n + 1)]

        def new_event() -> CurtailmentEvent:
            control(url, "/control/reset", {})
            with FleetGateway(url) as gateway:
                # Every device's latest reading (mining again); the sample history is not needed here.
                telemetry_store(org=org, samples=gateway.telemetry(identifiers), keep_history=False)
            CurtailmentEvent.objects.filter(org=org, state__in=["pending", "active", "restoring"]).update(
                state="cancelled"
            )
            CurtailmentTarget.objects.exclude(state__in=["resolved", "restore_failed"]).update(
                state="resolved"
            )
            event = curtailment_start(
                org=org,
                actor=actor,
                req=StartRequest(target_kw=1e9, tolerance_kw=1e9 - 1, reason="bench"),
            ).event
            assert event.targets.count() == n, event.targets.count()
            # Restore batches back to back: interval 0 is reachable only through update.
            return curtailment_update(event=event, actor=actor, patch={"restore_batch_interval_sec": 0})

        state: dict[str, Any] = {"round_trips": set(), "phase": [], "ticks": set()}

        def curtail_writes() -> float:
            event = new_event()
            write_time[0] = 0.0
            ticks = 0
            # Counted by an execute wrapper, not CaptureQueriesContext, whose debug cursor would
            # render every statement's parameters into the log inside the timed writes.
            trips = [0]

            def count(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
                trips[0] += 1
                return execute(sql, params, many, context)

            with Timer() as t, connection.execute_wrapper(count):
                while CurtailmentEvent.objects.get(pk=event.pk).state == "pending":
                    reconciler.reconcile_tick()
                    ticks += 1
            state["round_trips"].add(trips[0])
            state["ticks"].add(ticks)
            state["phase"].append(t.elapsed)
            assert not CurtailmentTarget.objects.filter(event=event).exclude(state="confirmed").exists()
            state["event"] = event
            return write_time[0]

        def restore_phase() -> float:
            event = state["event"]
            curtailment_stop(event=event, actor=actor)
            ticks = 0
            with Timer() as t:
                while CurtailmentEvent.objects.get(pk=event.pk).state == "restoring":
                    reconciler.reconcile_tick()
                    ticks += 1
            assert CurtailmentEvent.objects.get(pk=event.pk).state == "completed"
            assert not CurtailmentTarget.objects.filter(event=event).exclude(state="resolved").exists()
            state["restore_ticks"] = ticks
            state["batch"] = event.effective_batch_size
            return t.elapsed

        def raw_writes() -> float:
            event = new_event()
            table = CurtailmentTarget._meta.db_table
            with Timer() as t, connection.cursor() as cur:
                # The same columns with values of the same width as the reconciler's: a 41-character
                # command id and a 36-character gateway batch id per 500 targets, the error cleared,
                # the retry budget refilled.
                cur.execute(
                    f"UPDATE {table} SET state='dispatching', dispatch_attempt=dispatch_attempt+1, "
                    "last_command_id='00000000-curtail-' || substr(md5((id / 500)::text), 1, 24) "
                    "WHERE event_id=%s AND state='pending'",
                    [event.pk],
                )
                cur.execute(
                    f"UPDATE {table} SET state='dispatched', last_dispatched_at=now(), last_error='', "
                    "last_batch_id=md5('b' || (id / 500)::text)::uuid::text "
                    "WHERE event_id=%s AND state='dispatching'",
                    [event.pk],
                )
                cur.execute(
                    f"UPDATE {table} SET state='confirmed', confirmed_at=now(), retry_count=0, "
                    "observed_power_w=20, observed_at=now() WHERE event_id=%s AND state='dispatched'",
                    [event.pk],
                )
            return t.elapsed

        def orm_row_by_row() -> float:
            event = new_event()
            targets = list(CurtailmentTarget.objects.filter(event=event)[: args.orm_rows])
            now = clock.now()
            with Timer() as t:
                for target in targets:
                    target.state, target.dispatch_attempt, target.last_command_id = "dispatching", 1, "orm"
                    target.save(update_fields=["state", "dispatch_attempt", "last_command_id"])
                for target in targets:
                    target.state, target.last_dispatched_at, target.last_batch_id = "dispatched", now, "orm"
                    target.save(update_fields=["state", "last_dispatched_at", "last_batch_id"])
                for target in targets:
                    target.state, target.confirmed_at, target.observed_power_w = "confirmed", now, 20.0
                    target.save(update_fields=["state", "confirmed_at", "observed_power_w"])
            return t.elapsed

        portal_writes, write_runs = median_of(args.runs, curtail_writes)
        phase_0ms = sorted(state["phase"])[len(state["phase"]) // 2]
        restore_0ms = restore_phase()
        raw, raw_runs = median_of(args.runs, raw_writes)
        orm_rows = min(n, args.orm_rows)
        orm, _ = median_of(1, orm_row_by_row, warmup=0)
        control(url, "/control/knobs", {"latency_ms": 20})
        state["phase"] = []
        runs_20ms = max(1, min(3, args.runs))
        restores = []
        for _ in range(runs_20ms):
            curtail_writes()
            restores.append(restore_phase())
        phase_20ms = sorted(state["phase"])[len(state["phase"]) // 2]
        restore_20ms = sorted(restores)[len(restores) // 2]
    finally:
        simulator.terminate()
        simulator.wait(10)

    writes = 3 * n
    print(f"targets: {n}; state writes per curtail phase: {writes}")
    print(
        f"portal state writes: median {portal_writes:.3f}s {[round(x, 3) for x in write_runs]}"
        f" -> {writes / portal_writes:,.0f} writes/s"
    )
    print(
        f"raw set-based SQL, same writes: median {raw:.3f}s {[round(x, 3) for x in raw_runs]}"
        f" -> {writes / raw:,.0f} writes/s"
    )
    orm_rate = 3 * orm_rows / orm
    print(
        f"ORM row by row, same writes ({orm_rows} targets, 1 run): {orm:.2f}s -> {orm_rate:,.0f} writes/s;"
        f" portal writes are {writes / portal_writes / orm_rate:.0f}x faster"
    )
    print(f"whole curtail phase (ticks until active, incl. HTTP + telemetry), 0 ms latency: {phase_0ms:.2f}s")
    print(f"restore phase, 0 ms latency: {restore_0ms:.2f}s")
    print(
        f"whole curtail phase with 20 ms device latency: {phase_20ms:.2f}s"
        f" {[round(x, 2) for x in sorted(state['phase'])]} (goal <= 30 s)"
    )
    print(
        f"restore phase with 20 ms device latency (stop -> all resolved, batch {state['batch']},"
        f" {state['restore_ticks']} ticks): {restore_20ms:.2f}s {[round(x, 2) for x in restores]}"
        " (goal <= 60 s)"
    )
    print(
        f"DB round trips per curtail phase: {sorted(state['round_trips'])}"
        f" in {sorted(state['ticks'])} tick(s) for {n} targets"
    )
    ratio = raw / portal_writes
    ok = ratio >= 0.8 and writes / portal_writes >= 10 * orm_rate and phase_20ms <= 30 and restore_20ms <= 60
    print(
        result_line(
            "b1_reconciler", ratio, "0.80 (and >=10x ORM, 20ms curtail <=30s, 20ms restore <=60s)", ok
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
