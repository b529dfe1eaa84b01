"""Each loop is judged against its own period: stale after twice its declared interval plus a grace,
a one-shot loop that finished is "finished" for good, `/ops/status` names the loop and says why, and
a schedule's last run comes from the heartbeat its task writes (not beat's lagging `last_run_at`)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from fleetops.lib import clock
from fleetops.observability.heartbeats import (
    HEARTBEAT_GRACE_SECONDS,
    heartbeat_beat,
    heartbeat_finish,
    heartbeat_verdict,
    schedule_for,
)
from fleetops.observability.models import Heartbeat

pytestmark = pytest.mark.django_db


def _verdict(name: str, *, after: float):
    hb = Heartbeat.objects.get(name=name)
    return heartbeat_verdict(hb, now=hb.last_beat_at + timedelta(seconds=after))


def test_a_loop_is_stale_after_twice_its_own_period_plus_the_grace():
    # curtailment.fleet_sync runs every 300 s: 4 minutes after a pass it is fine (one threshold
    # for every loop called it stale for part of every cycle).
    heartbeat_beat(name="curtailment.fleet_sync")
    assert _verdict("curtailment.fleet_sync", after=240).status == "ok"
    limit = 2 * 300 + HEARTBEAT_GRACE_SECONDS
    late = _verdict("curtailment.fleet_sync", after=limit + 1)
    assert late.status == "warn" and late.stale_after_seconds == limit
    assert "expected every 300 s (schedule curtailment.fleet_sync)" in late.reason
    # A 10 s loop is stale much sooner.
    heartbeat_beat(name="outbox.relay")
    assert _verdict("outbox.relay", after=2 * 10 + HEARTBEAT_GRACE_SECONDS + 1).status == "warn"


def test_the_period_comes_from_the_loop_itself_or_a_prefix_schedule():
    heartbeat_beat(name="loop.curtailment_reconcile", details={"interval": 5})
    assert _verdict("loop.curtailment_reconcile", after=2 * 5 + HEARTBEAT_GRACE_SECONDS + 1).status == "warn"
    assert schedule_for("indexer.enrich.sim").name == "indexer.enrich"
    assert schedule_for("curtailment.reconciler").name == "curtailment.reconcile"


def test_a_finished_one_shot_loop_is_never_stale():
    heartbeat_beat(name="protocols.history.sim", details={"latest": 10})
    running = _verdict("protocols.history.sim", after=3600)
    assert running.status == "warn"  # still running and silent for an hour: stale
    heartbeat_finish(name="protocols.history.sim", details={"latest": 20})
    done = _verdict("protocols.history.sim", after=86400 * 30)
    assert (done.status, done.reason) == ("finished", "finished: ran once to completion")


def test_ops_status_names_the_stale_loop_and_why(client, superuser):
    heartbeat_beat(name="keys.verify")
    heartbeat_beat(name="protocols.history.sim")
    heartbeat_finish(name="protocols.history.sim")
    with clock.frozen(clock.now() + timedelta(seconds=2 * 30 + HEARTBEAT_GRACE_SECONDS + 5)):
        client.force_login(superuser)
        data = client.get("/ops/status?format=json").json()
        html = client.get("/ops/status").content.decode()
    check = next(c for c in data["checks"] if c["name"] == "heartbeats")
    assert check["status"] == "warn"
    rows = {r["loop"]: r for r in check["rows"]}
    assert rows["keys.verify"]["status"] == "warn"
    assert rows["keys.verify"]["why"].startswith("stale: last beat")
    assert rows["protocols.history.sim"]["status"] == "finished"
    assert "not ok: keys.verify" in check["summary"] and "protocols.history.sim" not in check["summary"]
    assert {"check": "heartbeats", "what": check["summary"]} in data["problems"]
    assert "not ok: keys.verify" in html
    assert html.count("<h1>") == 1


def test_a_schedule_that_ran_shows_its_last_run_from_the_heartbeat(client, superuser):
    every = IntervalSchedule.objects.create(every=30, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(
        name="keys.verify", task="migrations_app.keys.tasks.verify", interval=every, last_run_at=None
    )
    heartbeat_beat(name="keys.verify")
    client.force_login(superuser)
    data = client.get("/ops/status?format=json").json()
    schedules = next(c for c in data["checks"] if c["name"] == "beat schedules")
    row = next(r for r in schedules["rows"] if r["schedule"] == "keys.verify")
    beat_at = Heartbeat.objects.get(name="keys.verify").last_beat_at
    assert row["last run"] == beat_at.isoformat(timespec="seconds")
    assert row["late"] is False


def test_the_dashboard_cards_use_each_loops_threshold(client, superuser):
    heartbeat_beat(name="curtailment.fleet_sync")
    with clock.frozen(clock.now() + timedelta(seconds=200)):
        client.force_login(superuser)
        page = client.get("/admin/").content.decode()
    card = page.split('id="card-platform"')[1].split("</section>")[0]
    row = card.split("curtailment.fleet_sync</td>")[1].split("</tr>")[0]
    assert '<span class="fo-ok">ok</span>' in row and "fo-warn" not in row
