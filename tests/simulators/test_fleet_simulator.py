"""The fleet simulator's own contract, over loopback HTTP (no database)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from simulators.fleet.server import IDLE_W, FleetSimulator, make_server, serve_in_thread

ROOT = Path(__file__).resolve().parents[2]


def call(url, path, body=None, *, raw=None, method=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(
        url + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, headers, payload = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, headers, payload = exc.code, exc.headers, exc.read()
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(payload)


def ok(url, path, body=None):
    status, answer = call(url, path, body)
    assert status == 200, answer
    return answer


def samples(url, identifiers=None):
    body = {} if identifiers is None else {"identifiers": identifiers}
    return {s["identifier"]: s for s in ok(url, "/v1/telemetry", body)["samples"]}


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make_healthy(sim):
    # Every device active and paired, so each test chooses exactly what goes wrong.
    for d in sim.devices.values():
        d.status, d.pairing_status, d.driver = "active", "PAIRED", "antminer"


@pytest.fixture
def gateway():
    server, sim, url = serve_in_thread(devices_count=50, seed=3, power_delay_s=0)
    make_healthy(sim)
    yield sim, url
    server.shutdown()


@pytest.fixture
def clocked():
    clock = FakeClock()
    server, sim, url = serve_in_thread(devices_count=5, seed=4, power_delay_s=10, clock=clock)
    make_healthy(sim)
    yield clock, sim, url
    server.shutdown()


# --- the seeded fleet ------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_fleet_over_http():
    servers = [serve_in_thread(devices_count=200, seed=seed) for seed in (9, 9, 10)]
    try:
        a, b, c = (ok(url, "/v1/devices")["devices"] for _, _, url in servers)
    finally:
        for server, _, _ in servers:
            server.shutdown()
    assert a == b
    assert a != c
    assert [d["identifier"] for d in a] == [f"m-{i:05d}" for i in range(1, 201)]
    assert set(a[0]) == {
        "identifier",
        "name",
        "model",
        "site",
        "driver",
        "pairing_status",
        "status",
        "rated_power_w",
    }


def test_the_seeded_fleet_looks_like_a_fleet():
    sim = FleetSimulator(devices_count=2000, seed=1)
    devices = sim.list_devices()["devices"]
    statuses = Counter(d["status"] for d in devices)
    assert statuses["active"] > 0.85 * len(devices)
    assert statuses.keys() <= {
        "active",
        "offline",
        "updating",
        "reboot_required",
        "inactive",
        "needs_mining_pool",
        "maintenance",
        "error",
        "unknown",
    }
    assert len(statuses) > 5
    unpaired = sum(d["pairing_status"] == "UNPAIRED" for d in devices)
    no_driver = sum(d["driver"] == "" for d in devices)
    assert 0.01 * len(devices) < unpaired < 0.06 * len(devices)
    assert 0.005 * len(devices) < no_driver < 0.04 * len(devices)
    assert {d["site"] for d in devices} == {"site-a", "site-b"}
    assert len({d["model"] for d in devices}) > 1
    assert all(isinstance(d["rated_power_w"], int) and 1800 <= d["rated_power_w"] <= 3600 for d in devices)
    assert all(15.0 <= d.efficiency_j_th <= 38.0 for d in sim.devices.values())


def test_mining_devices_report_rated_power_and_hash_rate(gateway):
    sim, url = gateway
    for identifier, sample in samples(url).items():
        d = sim.devices[identifier]
        assert abs(sample["power_w"] - d.rated_power_w) <= 0.021 * d.rated_power_w
        assert sample["hash_rate_hs"] == pytest.approx(sample["power_w"] / d.efficiency_j_th * 1e12, rel=1e-3)
        assert sample["efficiency_j_th"] == pytest.approx(d.efficiency_j_th, abs=0.01)
        taken = datetime.fromisoformat(sample["taken_at"])
        assert taken.utcoffset() == timedelta(0)
        assert abs(datetime.now(UTC) - taken) < timedelta(minutes=1)


# --- commands and power ----------------------------------------------------------------------------


def test_curtail_drops_power_at_once_and_uncurtail_restores_it(gateway):
    _, url = gateway
    before = samples(url, ["m-00001", "m-00002"])
    assert before["m-00001"]["hash_rate_hs"] > 0

    result = ok(url, "/v1/commands/curtail", {"command_id": "c1", "identifiers": ["m-00001"]})
    assert result["command_id"] == "c1"
    assert result["dispatched"] == ["m-00001"] and result["skipped"] == []
    assert len(result["batch_id"]) == 36  # a uuid4
    after = samples(url, ["m-00001", "m-00002"])
    assert (after["m-00001"]["power_w"], after["m-00001"]["hash_rate_hs"]) == (IDLE_W, 0)
    assert after["m-00002"] == {**before["m-00002"], "taken_at": after["m-00002"]["taken_at"]}

    ok(url, "/v1/commands/uncurtail", {"command_id": "u1", "identifiers": ["m-00001"]})
    back = samples(url, ["m-00001"])["m-00001"]
    assert back["power_w"] == before["m-00001"]["power_w"]
    assert back["hash_rate_hs"] == before["m-00001"]["hash_rate_hs"]


def test_power_ramps_linearly_over_the_delay_both_ways(clocked):
    clock, _, url = clocked
    full = samples(url, ["m-00001"])["m-00001"]
    ok(url, "/v1/commands/curtail", {"command_id": "down", "identifiers": ["m-00001"]})

    halfway = samples(url, ["m-00001"])["m-00001"]
    assert halfway["power_w"] == full["power_w"]  # no time has passed yet
    assert halfway["hash_rate_hs"] == 0  # but hashing stops at once
    clock.now += 5
    halfway = samples(url, ["m-00001"])["m-00001"]
    assert halfway["power_w"] == pytest.approx((full["power_w"] + IDLE_W) / 2, abs=0.2)
    assert halfway["hash_rate_hs"] == 0
    clock.now += 5
    assert samples(url, ["m-00001"])["m-00001"]["power_w"] == IDLE_W

    ok(url, "/v1/commands/uncurtail", {"command_id": "up", "identifiers": ["m-00001"]})
    clock.now += 5
    rising = samples(url, ["m-00001"])["m-00001"]
    assert rising["power_w"] == pytest.approx((full["power_w"] + IDLE_W) / 2, abs=0.2)
    assert rising["hash_rate_hs"] == 0  # hashing returns only when the ramp-up finishes
    clock.now += 5
    done = samples(url, ["m-00001"])["m-00001"]
    assert (done["power_w"], done["hash_rate_hs"]) == (full["power_w"], full["hash_rate_hs"])


def test_a_reversal_mid_ramp_starts_from_the_current_power(clocked):
    clock, _, url = clocked
    full = samples(url, ["m-00002"])["m-00002"]["power_w"]
    ok(url, "/v1/commands/curtail", {"command_id": "down", "identifiers": ["m-00002"]})
    clock.now += 5
    middle = samples(url, ["m-00002"])["m-00002"]["power_w"]
    ok(url, "/v1/commands/uncurtail", {"command_id": "up", "identifiers": ["m-00002"]})
    assert samples(url, ["m-00002"])["m-00002"]["power_w"] == middle
    clock.now += 5
    assert samples(url, ["m-00002"])["m-00002"]["power_w"] == pytest.approx((middle + full) / 2, abs=0.2)


def test_repeating_a_command_on_a_device_already_there_is_harmless(gateway):
    _, url = gateway
    ok(url, "/v1/commands/curtail", {"command_id": "a", "identifiers": ["m-00003"]})
    again = ok(url, "/v1/commands/curtail", {"command_id": "b", "identifiers": ["m-00003"]})
    assert again["dispatched"] == ["m-00003"]
    assert samples(url, ["m-00003"])["m-00003"]["power_w"] == IDLE_W
    running = samples(url, ["m-00004"])["m-00004"]
    assert ok(url, "/v1/commands/uncurtail", {"command_id": "c", "identifiers": ["m-00004"]})["dispatched"]
    assert samples(url, ["m-00004"])["m-00004"]["power_w"] == running["power_w"]


def test_a_repeated_command_id_replays_the_first_answer_and_changes_nothing(gateway):
    _, url = gateway
    first = ok(url, "/v1/commands/curtail", {"command_id": "same", "identifiers": ["m-00002"]})
    before = samples(url, ["m-00003"])["m-00003"]["power_w"]
    again = ok(url, "/v1/commands/curtail", {"command_id": "same", "identifiers": ["m-00003"]})
    also = ok(url, "/v1/commands/uncurtail", {"command_id": "same", "identifiers": ["m-00002"]})
    assert again == first and also == first
    assert samples(url, ["m-00003"])["m-00003"]["power_w"] == before
    assert samples(url, ["m-00002"])["m-00002"]["power_w"] == IDLE_W
    log = ok(url, "/control/commands")["log"]
    assert [(e["command_id"], e["kind"], e["deduplicated"]) for e in log] == [
        ("same", "curtail", False),
        ("same", "curtail", True),
        ("same", "uncurtail", True),
    ]
    assert [e["dispatched_count"] for e in log] == [1, 1, 1]
    assert ok(url, "/control/state")["commands"] == {"curtail": 1, "uncurtail": 0, "deduplicated": 2}


def test_skip_reasons(gateway):
    sim, url = gateway
    sim.devices["m-00004"].pairing_status = "UNPAIRED"
    sim.devices["m-00005"].status = "offline"  # offline as seeded
    ok(url, "/control/knobs", {"offline_fraction": 0.1})
    knob_offline = sorted(sim.picked("offline_fraction") - {"m-00004", "m-00005"})[0]
    identifiers = ["nope", "m-00004", "m-00005", knob_offline]
    result = ok(url, "/v1/commands/curtail", {"command_id": "s", "identifiers": identifiers})
    assert result["skipped"] == [
        {"identifier": "nope", "reason": "unknown_device"},
        {"identifier": "m-00004", "reason": "unpaired"},
        {"identifier": "m-00005", "reason": "offline"},
        {"identifier": knob_offline, "reason": "offline"},
    ]
    assert result["dispatched"] == []
    assert result["batch_id"] == ""
    assert all(sim.devices[i].mining for i in identifiers[1:])
    assert ok(url, "/control/commands")["log"][-1] | {"command_id": "s"} == {
        "command_id": "s",
        "kind": "curtail",
        "identifiers_count": 4,
        "dispatched_count": 0,
        "deduplicated": False,
    }


def test_no_effect_devices_accept_commands_but_keep_their_power(gateway):
    sim, url = gateway
    ok(url, "/control/knobs", {"no_effect_fraction": 0.2})
    stubborn = sorted(sim.picked("no_effect_fraction"))
    obedient = sorted(set(sim.devices) - set(stubborn))[:3]
    assert len(stubborn) == 10
    before = samples(url, stubborn + obedient)
    result = ok(url, "/v1/commands/curtail", {"command_id": "n", "identifiers": stubborn + obedient})
    assert result["dispatched"] == stubborn + obedient
    after = samples(url, stubborn + obedient)
    for identifier in stubborn:
        assert after[identifier]["power_w"] == before[identifier]["power_w"]
        assert after[identifier]["hash_rate_hs"] > 0
    assert all(after[i]["power_w"] == IDLE_W for i in obedient)


# --- telemetry knobs -------------------------------------------------------------------------------


def test_offline_devices_are_omitted_and_listed_as_offline(gateway):
    sim, url = gateway
    sim.devices["m-00010"].status = "offline"
    ok(url, "/control/knobs", {"offline_fraction": 0.1})
    offline = sim.picked("offline_fraction") | {"m-00010"}
    assert len(offline) in (5, 6)
    reported = samples(url)
    assert reported.keys() == set(sim.devices) - offline
    assert samples(url, sorted(offline)) == {}
    listed = {d["identifier"]: d["status"] for d in ok(url, "/v1/devices")["devices"]}
    assert {i for i, status in listed.items() if status == "offline"} == offline


def test_stale_devices_report_old_samples(gateway):
    sim, url = gateway
    ok(url, "/control/knobs", {"stale_fraction": 0.2})
    stale = sim.picked("stale_fraction")
    assert len(stale) == 10
    now = datetime.now(UTC)
    for identifier, sample in samples(url).items():
        age = now - datetime.fromisoformat(sample["taken_at"])
        if identifier in stale:
            assert timedelta(minutes=29) < age < timedelta(minutes=31)
        else:
            assert age < timedelta(minutes=1)


def test_maintenance_fraction_shows_in_the_device_list(gateway):
    sim, url = gateway
    ok(url, "/control/knobs", {"maintenance_fraction": 0.1})
    chosen = sim.picked("maintenance_fraction")
    listed = {d["identifier"]: d["status"] for d in ok(url, "/v1/devices")["devices"]}
    assert {i for i, status in listed.items() if status == "maintenance"} == chosen
    assert len(chosen) == 5


def test_fraction_knobs_pick_the_same_devices_for_the_same_seed_and_grow_by_prefix():
    a, b, c = (FleetSimulator(devices_count=100, seed=s) for s in (5, 5, 6))
    for sim in (a, b, c):
        sim.set_knobs({"offline_fraction": 0.1})
    assert a.picked("offline_fraction") == b.picked("offline_fraction") != c.picked("offline_fraction")
    small = a.picked("offline_fraction")
    a.set_knobs({"offline_fraction": 0.3})
    assert small < a.picked("offline_fraction") and len(a.picked("offline_fraction")) == 30
    a.set_knobs({"offline_fraction": 0.1})
    assert a.picked("offline_fraction") == small


# --- injected trouble ------------------------------------------------------------------------------


def test_injected_errors_fail_every_v1_request_before_it_does_anything(gateway):
    sim, url = gateway
    ok(url, "/control/knobs", {"error_rate": 1.0})
    failure = (503, {"error": "injected failure"})
    assert call(url, "/v1/commands/curtail", {"command_id": "e", "identifiers": ["m-00006"]}) == failure
    assert call(url, "/v1/telemetry", {}) == failure
    assert call(url, "/v1/devices") == failure
    assert call(url, "/v1/telemetry", raw=b"{not json") == failure  # before the body is even parsed
    assert sim.devices["m-00006"].mining is True
    state = ok(url, "/control/state")
    assert state["commands"] == {"curtail": 0, "uncurtail": 0, "deduplicated": 0}
    assert state["requests"] == {"total": 4, "injected_failures": 4}
    assert ok(url, "/control/commands")["log"] == []

    ok(url, "/control/knobs", {"error_rate": 0})
    result = ok(url, "/v1/commands/curtail", {"command_id": "e", "identifiers": ["m-00006"]})
    assert result["dispatched"] == ["m-00006"]  # the failed attempt was not remembered
    assert ok(url, "/control/commands")["log"][0]["deduplicated"] is False


def test_a_partial_error_rate_fails_some_requests_reproducibly():
    def outcomes():
        server, _, url = serve_in_thread(devices_count=3, seed=8, error_rate=0.5)
        try:
            return [call(url, "/v1/devices")[0] for _ in range(40)]
        finally:
            server.shutdown()

    first = outcomes()
    assert set(first) == {200, 503}
    assert outcomes() == first


def test_latency_delays_v1_answers(gateway):
    _, url = gateway
    ok(url, "/control/knobs", {"latency_ms": 100})
    started = time.monotonic()
    ok(url, "/v1/devices")
    assert time.monotonic() - started >= 0.09
    started = time.monotonic()
    ok(url, "/v1/telemetry", {"identifiers": ["m-00001"]})
    assert time.monotonic() - started >= 0.09


@pytest.mark.parametrize(
    "bad",
    [
        {"error_rate": 2},
        {"offline_fraction": 1.5},
        {"latency_ms": -1},
        {"power_delay_s": "5"},
        {"stale_fraction": None},
        {"no_effect_fraction": True},
        {"warp": 1},
        {"latency_ms": 10, "error_rate": 7},
    ],
)
def test_invalid_knobs_are_400_and_change_nothing(gateway, bad):
    _, url = gateway
    before = ok(url, "/control/state")["knobs"]
    status, body = call(url, "/control/knobs", bad)
    assert status == 400 and body["error"]
    assert ok(url, "/control/state")["knobs"] == before


def test_valid_knobs_are_returned_and_kept(gateway):
    _, url = gateway
    answer = ok(url, "/control/knobs", {"latency_ms": 5, "power_delay_s": 0.5, "error_rate": 0})
    assert answer == {
        "latency_ms": 5.0,
        "error_rate": 0.0,
        "no_effect_fraction": 0.0,
        "offline_fraction": 0.0,
        "maintenance_fraction": 0.0,
        "stale_fraction": 0.0,
        "power_delay_s": 0.5,
    }
    assert ok(url, "/control/state")["knobs"] == answer
    assert ok(url, "/control/state")["device_count"] == 50


def test_reset_restores_the_seeded_state():
    server, sim, url = serve_in_thread(devices_count=30, seed=2, power_delay_s=0, latency_ms=1)
    try:
        state, devices = ok(url, "/control/state"), ok(url, "/v1/devices")
        paired = next(d["identifier"] for d in devices["devices"] if d["pairing_status"] == "PAIRED")
        first = ok(url, "/v1/commands/curtail", {"command_id": "r", "identifiers": [paired]})
        ok(url, "/control/knobs", {"offline_fraction": 0.5, "latency_ms": 0, "stale_fraction": 1})
        sim.devices[paired].status = "error"

        assert ok(url, "/control/reset", {}) == state
        assert ok(url, "/v1/devices") == devices
        assert ok(url, "/control/state")["requests"] == {"total": 1, "injected_failures": 0}
        assert ok(url, "/control/commands")["log"] == []
        assert samples(url, [paired])[paired]["power_w"] > IDLE_W
        again = ok(url, "/v1/commands/curtail", {"command_id": "r", "identifiers": [paired]})
        assert again["batch_id"] != first["batch_id"]  # the command id was forgotten too
    finally:
        server.shutdown()


# --- scale and protocol ----------------------------------------------------------------------------


def test_a_10000_device_fleet_answers_telemetry_for_every_device_in_one_request():
    server, _, url = serve_in_thread(devices_count=10_000, seed=1)
    try:
        listed = ok(url, "/v1/devices")["devices"]
        offline = {d["identifier"] for d in listed if d["status"] == "offline"}
        wanted = [f"m-{i:05d}" for i in range(1, 10_001)]
        got = ok(url, "/v1/telemetry", {"identifiers": [*wanted, "m-99999"]})["samples"]
        every = ok(url, "/v1/telemetry", {"identifiers": None})["samples"]
    finally:
        server.shutdown()
    assert len(listed) == 10_000
    assert 0 < len(offline) < 500
    assert [s["identifier"] for s in got] == [i for i in wanted if i not in offline]
    assert [s["identifier"] for s in every] == [s["identifier"] for s in got]


def test_a_100000_device_fleet_takes_one_command_for_every_device():
    server, sim, url = serve_in_thread(devices_count=100_000, seed=1, power_delay_s=0, all_healthy=True)
    try:
        wanted = [f"m-{i:05d}" for i in range(1, 100_001)]
        answer = ok(url, "/v1/commands/curtail", {"command_id": "all", "identifiers": wanted})
        samples = ok(url, "/v1/telemetry", {"identifiers": wanted})["samples"]
    finally:
        server.shutdown()
    assert len(sim.devices) == 100_000 and wanted[-1] == "m-100000"
    assert answer["dispatched"] == wanted and answer["skipped"] == []
    assert [s["identifier"] for s in samples] == wanted
    assert {s["power_w"] for s in samples} == {IDLE_W} and {s["hash_rate_hs"] for s in samples} == {0.0}


def test_unknown_paths_and_bad_requests(gateway):
    _, url = gateway
    assert call(url, "/v2/whatever") == (404, {"error": "not found"})
    assert call(url, "/v1/nothing", {}) == (404, {"error": "not found"})
    assert call(url, "/v1/telemetry")[0] == 405
    assert call(url, "/v1/telemetry", raw=b"{nope")[0] == 400
    assert call(url, "/v1/telemetry", raw=b"[1, 2]")[0] == 400
    assert call(url, "/v1/telemetry", {"identifiers": "m-00001"})[0] == 400
    assert call(url, "/v1/commands/curtail", {"identifiers": ["m-00001"]})[0] == 400
    assert call(url, "/v1/commands/curtail", {"command_id": "x"})[0] == 400
    assert call(url, "/v1/commands/curtail", {"command_id": "x", "identifiers": [1]})[0] == 400
    assert call(url, "/control/knobs", raw=b"nope")[0] == 400
    # None of the bad commands was executed or remembered.
    assert ok(url, "/control/commands")["log"] == []
    assert ok(url, "/v1/devices?page=1")["devices"]  # a query string does not change the route


def test_the_command_log_keeps_the_last_10000_entries():
    sim = FleetSimulator(devices_count=1, seed=1, power_delay_s=0)
    for n in range(10_005):
        sim.command("curtail", f"c{n}", ["m-00001"])
    log = sim.command_log()["log"]
    assert len(log) == 10_000
    assert (log[0]["command_id"], log[-1]["command_id"]) == ("c5", "c10004")


def test_make_server_builds_a_server_holding_its_simulator():
    server = make_server("127.0.0.1", 0, devices_count=7, seed=1)
    try:
        assert isinstance(server.simulator, FleetSimulator)
        assert len(server.simulator.devices) == 7
        assert server.server_address[1] > 0
    finally:
        server.server_close()
    with pytest.raises(ValueError):
        make_server("127.0.0.1", 0, error_rate=3)


def test_the_command_line_serves_until_sigterm():
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulators.fleet", "--port", "0", "--devices", "12", "--seed", "1"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        prefix = "fleet simulator listening on "
        assert line.startswith(prefix) and line.endswith(" (12 devices)"), line
        url = line[len(prefix) :].split(" ")[0]
        assert url.startswith("http://127.0.0.1:")
        assert len(ok(url, "/v1/devices")["devices"]) == 12
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
