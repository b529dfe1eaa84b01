"""The fleet simulator's own contract, over loopback HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest

from simulators.fleet.server import FleetSimulator, serve_in_thread


@pytest.fixture
def gateway():
    server, sim, url = serve_in_thread(devices_count=50, seed=3, power_delay_s=0)
    for d in sim.devices.values():
        d.status, d.pairing_status = "active", "PAIRED"
    yield sim, url
    server.shutdown()


def call(url, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_same_seed_gives_the_same_fleet():
    a, b = FleetSimulator(devices_count=20, seed=9), FleetSimulator(devices_count=20, seed=9)
    assert a.list_devices() == b.list_devices()
    assert FleetSimulator(devices_count=20, seed=10).list_devices() != a.list_devices()


def test_curtail_drops_power_and_uncurtail_restores_it(gateway):
    _, url = gateway
    _, before = call(url, "/v1/telemetry", {"identifiers": ["m-00001"]})
    assert before["samples"][0]["hash_rate_hs"] > 0
    status, result = call(url, "/v1/commands/curtail", {"command_id": "c1", "identifiers": ["m-00001"]})
    assert status == 200 and result["dispatched"] == ["m-00001"] and result["batch_id"]
    _, after = call(url, "/v1/telemetry", {"identifiers": ["m-00001"]})
    assert after["samples"][0]["power_w"] == 20.0 and after["samples"][0]["hash_rate_hs"] == 0
    call(url, "/v1/commands/uncurtail", {"command_id": "u1", "identifiers": ["m-00001"]})
    _, back = call(url, "/v1/telemetry", {"identifiers": ["m-00001"]})
    assert back["samples"][0]["power_w"] == before["samples"][0]["power_w"]


def test_power_ramps_over_the_delay():
    now = [100.0]
    sim = FleetSimulator(devices_count=1, seed=1, power_delay_s=10, clock=lambda: now[0])
    device = sim.devices["m-00001"]
    full = sim.power_of(device, now[0])[0]
    sim.command("curtail", "c", ["m-00001"])
    now[0] += 5
    halfway, hashrate = sim.power_of(device, now[0])
    assert 20 < halfway < full and hashrate == 0
    now[0] += 5
    assert sim.power_of(device, now[0])[0] == 20.0


def test_a_repeated_command_id_replays_the_first_answer_and_changes_nothing(gateway):
    sim, url = gateway
    _, first = call(url, "/v1/commands/curtail", {"command_id": "same", "identifiers": ["m-00002"]})
    _, again = call(url, "/v1/commands/curtail", {"command_id": "same", "identifiers": ["m-00003"]})
    assert again == first
    assert sim.devices["m-00003"].mining is True
    _, log = call(url, "/control/commands")
    assert [entry["deduplicated"] for entry in log["log"]] == [False, True]


def test_skip_reasons(gateway):
    sim, url = gateway
    sim.devices["m-00004"].pairing_status = "UNPAIRED"
    call(url, "/control/knobs", {"offline_fraction": 0.02})
    offline = next(i for i in sim.order[: len(sim.order)] if i in sim._picked("offline_fraction"))
    _, result = call(
        url, "/v1/commands/curtail", {"command_id": "s", "identifiers": ["nope", "m-00004", offline]}
    )
    reasons = {s["identifier"]: s["reason"] for s in result["skipped"]}
    assert reasons == {"nope": "unknown_device", "m-00004": "unpaired", offline: "offline"}
    assert result["batch_id"] == ""


def test_offline_devices_are_absent_and_stale_ones_are_old(gateway):
    sim, url = gateway
    call(url, "/control/knobs", {"offline_fraction": 0.1, "stale_fraction": 0.1})
    _, body = call(url, "/v1/telemetry", {})
    samples = {s["identifier"]: s for s in body["samples"]}
    offline, stale = sim._picked("offline_fraction"), sim._picked("stale_fraction")
    assert len(samples) == 50 - len(offline)
    assert not offline & samples.keys()
    old = {
        i
        for i, s in samples.items()
        if datetime.fromisoformat(s["taken_at"]) < datetime.now(UTC) - timedelta(minutes=20)
    }
    assert old == stale - offline


def test_no_effect_devices_accept_commands_but_keep_running(gateway):
    sim, url = gateway
    call(url, "/control/knobs", {"no_effect_fraction": 1.0})
    _, result = call(url, "/v1/commands/curtail", {"command_id": "n", "identifiers": ["m-00005"]})
    assert result["dispatched"] == ["m-00005"]
    assert sim.devices["m-00005"].mining is True


def test_injected_errors_change_nothing(gateway):
    sim, url = gateway
    call(url, "/control/knobs", {"error_rate": 1.0})
    status, body = call(url, "/v1/commands/curtail", {"command_id": "e", "identifiers": ["m-00006"]})
    assert (status, body) == (503, {"error": "injected failure"})
    assert sim.devices["m-00006"].mining is True


@pytest.mark.parametrize("bad", [{"error_rate": 2}, {"latency_ms": -1}, {"warp": 1}, {"error_rate": "x"}])
def test_invalid_knobs_are_400(gateway, bad):
    _, url = gateway
    assert call(url, "/control/knobs", bad)[0] == 400


def test_reset_restores_the_seeded_state(gateway):
    sim, url = gateway
    call(url, "/v1/commands/curtail", {"command_id": "r", "identifiers": ["m-00007"]})
    call(url, "/control/reset", {})
    assert all(d.mining for d in sim.devices.values())
    assert call(url, "/control/state")[1]["commands"] == {"curtail": 0, "uncurtail": 0, "deduplicated": 0}


def test_a_10000_device_fleet_answers_telemetry_for_every_device():
    server, _, url = serve_in_thread(devices_count=10_000, seed=1)
    try:
        _, body = call(url, "/v1/telemetry", {"identifiers": [f"m-{i:05d}" for i in range(1, 10_001)]})
    finally:
        server.shutdown()
    assert len(body["samples"]) == 10_000


def test_unknown_paths_and_bad_json(gateway):
    _, url = gateway
    assert call(url, "/v2/whatever")[0] == 404
    request = urllib.request.Request(
        url + "/v1/telemetry", data=b"{nope", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    assert caught.value.code == 400
