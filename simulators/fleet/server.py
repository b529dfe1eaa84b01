"""A deterministic fleet gateway for N seeded mining devices, over HTTP (standard library only).

API (JSON in and out):
  GET  /v1/devices                                  -> {"devices": [...]} ordered by identifier
  POST /v1/telemetry {"identifiers": [...] | null}  -> {"samples": [...]} (offline devices omitted)
  POST /v1/commands/curtail|uncurtail {"command_id", "identifiers"}
                                                    -> {"command_id", "batch_id", "dispatched", "skipped"}
       a repeated command id answers its stored first response and changes nothing.
Control (never delayed, never failed on purpose):
  GET  /control/state     -> {"knobs", "commands", "requests", "device_count"}
  POST /control/knobs     any of latency_ms, error_rate, no_effect_fraction, offline_fraction,
                          maintenance_fraction, stale_fraction, power_delay_s -> the new knobs
  POST /control/reset     -> the seeded state again (knobs as started), answers like /control/state
  GET  /control/commands  -> {"log": [...]} (last 10,000 commands)

Power ramps linearly from its current level to the goal (idle or rated) over `power_delay_s`, counted
from the command; hash rate stops at once on curtail and returns only when the ramp-up completes.
The fraction knobs pick the first k devices of one seeded shuffle (each knob from its own offset), so
the same seed and the same knob values always pick the same devices.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

IDLE_W = 20.0
STALE_AGE = timedelta(minutes=30)
LOG_LIMIT = 10_000
MODELS = ("S19j Pro", "S19 XP", "M30S++", "S21")
STATUSES_WEIGHTED = ["active"] * 92 + [
    "error",
    "unknown",
    "updating",
    "reboot_required",
    "inactive",
    "needs_mining_pool",
    "offline",
    "maintenance",
]
# The order matters: each fraction knob starts at its own offset into the seeded shuffle.
FRACTION_KNOBS = ("no_effect_fraction", "offline_fraction", "maintenance_fraction", "stale_fraction")
UNIT_KNOBS = (*FRACTION_KNOBS, "error_rate")
COMMAND_KINDS = ("curtail", "uncurtail")
NOT_FOUND = (404, {"error": "not found"})


@dataclass
class SimDevice:
    identifier: str
    name: str
    model: str
    site: str
    driver: str
    pairing_status: str
    status: str
    rated_power_w: int
    efficiency_j_th: float
    jitter: float
    mining: bool = True
    # The current ramp: from ramp_from_w at ramp_started (clock time) to the goal over ramp_s seconds.
    ramp_from_w: float = 0.0
    ramp_started: float = 0.0
    ramp_s: float = 0.0

    @property
    def full_power_w(self) -> float:
        return self.rated_power_w * (1 + self.jitter)


@dataclass
class Knobs:
    latency_ms: float = 0.0
    error_rate: float = 0.0
    no_effect_fraction: float = 0.0
    offline_fraction: float = 0.0
    maintenance_fraction: float = 0.0
    stale_fraction: float = 0.0
    power_delay_s: float = 5.0


def validate_knobs(values: dict[str, Any]) -> dict[str, float]:
    """Check a partial knob update; raise ValueError naming the first bad key."""
    known = set(Knobs.__dataclass_fields__)
    checked: dict[str, float] = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown knob {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise ValueError(f"{key} must be a number")
        if value < 0 or value == float("inf"):
            raise ValueError(f"{key} must be a finite non-negative number")
        if key in UNIT_KNOBS and value > 1:
            raise ValueError(f"{key} must be between 0 and 1")
        checked[key] = float(value)
    return checked


@dataclass
class FleetSimulator:
    """All state of the simulated gateway; every method is thread-safe."""

    devices_count: int = 300
    seed: int = 1
    power_delay_s: float = 5.0
    latency_ms: float = 0.0
    error_rate: float = 0.0
    no_effect_fraction: float = 0.0
    offline_fraction: float = 0.0
    maintenance_fraction: float = 0.0
    stale_fraction: float = 0.0
    # Benchmarks want every device eligible: active, paired, with a driver (kept across resets).
    all_healthy: bool = False
    clock: Callable[[], float] = time.monotonic
    knobs: Knobs = field(init=False, default_factory=Knobs)

    def __post_init__(self) -> None:
        if self.devices_count < 0:
            raise ValueError("devices_count must be non-negative")
        self.initial_knobs = Knobs(
            **validate_knobs({name: getattr(self, name) for name in Knobs.__dataclass_fields__})
        )
        self.lock = threading.RLock()
        self.reset()

    # --- state -------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the seeded fleet, the starting knobs, no commands remembered."""
        rng = random.Random(self.seed)
        now = self.clock()
        with self.lock:
            self.knobs = Knobs(**asdict(self.initial_knobs))
            self.devices: dict[str, SimDevice] = {}
            for i in range(1, self.devices_count + 1):
                identifier = f"m-{i:05d}"
                rated = int(rng.uniform(1800, 3600))
                device = SimDevice(
                    identifier=identifier,
                    name=f"miner {i}",
                    model=rng.choice(MODELS),
                    site=rng.choice(("site-a", "site-b")),
                    driver="" if rng.random() < 0.02 else "antminer",
                    pairing_status="UNPAIRED" if rng.random() < 0.03 else "PAIRED",
                    status=rng.choice(STATUSES_WEIGHTED),
                    rated_power_w=rated,
                    efficiency_j_th=rng.uniform(15.0, 38.0),
                    jitter=rng.uniform(-0.02, 0.02),
                    ramp_started=now,
                )
                device.ramp_from_w = device.full_power_w
                if self.all_healthy:
                    device.status, device.pairing_status, device.driver = "active", "PAIRED", "antminer"
                self.devices[identifier] = device
            # One seeded order decides which devices a fraction knob picks: reproducible at run time.
            order = list(self.devices)
            random.Random(self.seed + 1).shuffle(order)
            self.order = order
            self.error_rng = random.Random(self.seed + 2)
            self.responses: dict[str, dict[str, Any]] = {}
            self.log: deque[dict[str, Any]] = deque(maxlen=LOG_LIMIT)
            self.counters = {"curtail": 0, "uncurtail": 0, "deduplicated": 0}
            self.requests = {"total": 0, "injected_failures": 0}

    @property
    def order(self) -> list[str]:
        return self._order

    @order.setter
    def order(self, value: list[str]) -> None:
        # Tests may reorder to choose exactly which device a fraction picks.
        with self.lock:
            self._order = value
            self._picked_cache: dict[str, frozenset[str]] = {}

    def _picked(self, knob: str) -> frozenset[str]:
        with self.lock:
            cached = self._picked_cache.get(knob)
            if cached is None:
                order = self._order
                offset = FRACTION_KNOBS.index(knob) * len(order) // len(FRACTION_KNOBS)
                count = round(getattr(self.knobs, knob) * len(order))
                rotated = order[offset:] + order[:offset]
                cached = self._picked_cache[knob] = frozenset(rotated[:count])
            return cached

    def picked(self, knob: str) -> frozenset[str]:
        """The identifiers a fraction knob currently applies to."""
        if knob not in FRACTION_KNOBS:
            raise ValueError(f"not a fraction knob: {knob}")
        return self._picked(knob)

    def status_of(self, d: SimDevice) -> str:
        with self.lock:
            return self._status(d, self._picked("offline_fraction"), self._picked("maintenance_fraction"))

    @staticmethod
    def _status(d: SimDevice, offline: frozenset[str], maintenance: frozenset[str]) -> str:
        # The loops over a whole fleet look the picked sets up once, not once per device.
        if d.identifier in offline:
            return "offline"
        if d.identifier in maintenance:
            return "maintenance"
        return d.status

    def power_of(self, d: SimDevice, now: float) -> tuple[float, float]:
        """(power_w, hash_rate_hs) of a device at clock time `now`."""
        full = d.full_power_w
        goal = full if d.mining else IDLE_W
        elapsed = now - d.ramp_started
        progress = 1.0 if d.ramp_s <= 0 else min(1.0, max(0.0, elapsed / d.ramp_s))
        power = goal if progress >= 1.0 else d.ramp_from_w + (goal - d.ramp_from_w) * progress
        hashing = d.mining and progress >= 1.0
        return power, (full / d.efficiency_j_th * 1e12 if hashing else 0.0)

    # --- the gateway API ---------------------------------------------------------------------------

    def list_devices(self) -> dict[str, Any]:
        with self.lock:
            offline, maintenance = self._picked("offline_fraction"), self._picked("maintenance_fraction")
            return {
                "devices": [
                    {
                        "identifier": d.identifier,
                        "name": d.name,
                        "model": d.model,
                        "site": d.site,
                        "driver": d.driver,
                        "pairing_status": d.pairing_status,
                        "status": self._status(d, offline, maintenance),
                        "rated_power_w": d.rated_power_w,
                    }
                    for _, d in sorted(self.devices.items())
                ]
            }

    def telemetry(self, identifiers: Iterable[str] | None) -> dict[str, Any]:
        now, wall = self.clock(), datetime.now(UTC)
        fresh_at, stale_at = wall.isoformat(), (wall - STALE_AGE).isoformat()
        with self.lock:
            stale, offline = self._picked("stale_fraction"), self._picked("offline_fraction")
            wanted = sorted(self.devices) if identifiers is None else dict.fromkeys(identifiers)
            samples = []
            for identifier in wanted:
                d = self.devices.get(identifier)
                if d is None or identifier in offline or d.status == "offline":
                    continue
                power, hashrate = self.power_of(d, now)
                samples.append(
                    {
                        "identifier": identifier,
                        "power_w": round(power, 1),
                        "hash_rate_hs": hashrate,
                        "efficiency_j_th": round(d.efficiency_j_th, 2),
                        "taken_at": stale_at if identifier in stale else fresh_at,
                    }
                )
            return {"samples": samples}

    def command(self, kind: str, command_id: str, identifiers: Iterable[str]) -> dict[str, Any]:
        if kind not in COMMAND_KINDS:
            raise ValueError(f"unknown command kind {kind!r}")
        wanted = list(dict.fromkeys(identifiers))
        now = self.clock()
        with self.lock:
            stored = self.responses.get(command_id)
            if stored is not None:
                self.counters["deduplicated"] += 1
                self._log(command_id, kind, len(wanted), len(stored["dispatched"]), deduplicated=True)
                return stored
            no_effect, offline = self._picked("no_effect_fraction"), self._picked("offline_fraction")
            want_mining = kind == "uncurtail"
            dispatched: list[str] = []
            skipped: list[dict[str, str]] = []
            for identifier in wanted:
                d = self.devices.get(identifier)
                if d is None:
                    skipped.append({"identifier": identifier, "reason": "unknown_device"})
                elif identifier in offline or d.status == "offline":
                    skipped.append({"identifier": identifier, "reason": "offline"})
                elif d.pairing_status != "PAIRED":
                    skipped.append({"identifier": identifier, "reason": "unpaired"})
                else:
                    dispatched.append(identifier)
                    if identifier not in no_effect and d.mining != want_mining:
                        d.ramp_from_w = self.power_of(d, now)[0]
                        d.ramp_started = now
                        d.ramp_s = self.knobs.power_delay_s
                        d.mining = want_mining
            response = {
                "command_id": command_id,
                "batch_id": str(uuid.uuid4()) if dispatched else "",
                "dispatched": dispatched,
                "skipped": skipped,
            }
            self.responses[command_id] = response
            self.counters[kind] += 1
            self._log(command_id, kind, len(wanted), len(dispatched), deduplicated=False)
            return response

    def _log(self, command_id: str, kind: str, count: int, dispatched: int, *, deduplicated: bool) -> None:
        self.log.append(
            {
                "command_id": command_id,
                "kind": kind,
                "identifiers_count": count,
                "dispatched_count": dispatched,
                "deduplicated": deduplicated,
            }
        )

    # --- control -----------------------------------------------------------------------------------

    def set_knobs(self, values: dict[str, Any]) -> dict[str, float]:
        """Apply all of `values` or, if any is invalid, none of them (ValueError)."""
        checked = validate_knobs(values)
        with self.lock:
            for key, value in checked.items():
                setattr(self.knobs, key, value)
            self._picked_cache = {}
            return asdict(self.knobs)

    def inject(self) -> bool:
        """Called once per /v1 request: sleep the latency, then say whether to fail it on purpose."""
        latency_ms, error_rate = self.knobs.latency_ms, self.knobs.error_rate
        if latency_ms > 0:
            time.sleep(latency_ms / 1000)
        with self.lock:
            self.requests["total"] += 1
            fail = error_rate > 0 and self.error_rng.random() < error_rate
            if fail:
                self.requests["injected_failures"] += 1
            return fail

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {
                "knobs": asdict(self.knobs),
                "commands": dict(self.counters),
                "requests": dict(self.requests),
                "device_count": len(self.devices),
            }

    def command_log(self) -> dict[str, Any]:
        with self.lock:
            return {"log": [dict(entry) for entry in self.log]}


class BadRequest(Exception):
    pass


def _identifiers(body: dict[str, Any], *, required: bool) -> list[str] | None:
    value = body.get("identifiers")
    if value is None and not required:
        return None
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise BadRequest("identifiers must be a list of strings")
    return value


class FleetRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fleet-simulator/1"
    server: FleetHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: benchmarks send thousands
        return

    @property
    def sim(self) -> FleetSimulator:
        return self.server.simulator

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _raw_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise BadRequest("invalid Content-Length")
        return self.rfile.read(length) if length else b""

    @staticmethod
    def _json(raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise BadRequest("invalid JSON")
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def _handle(self, method: str) -> None:
        path = urlsplit(self.path).path
        try:
            raw = self._raw_body()
            if path.startswith("/v1/"):
                route = V1_ROUTES.get((method, path))
                if route is None:
                    known = any(p == path for _, p in V1_ROUTES)
                    self._send(*((405, {"error": "method not allowed"}) if known else NOT_FOUND))
                elif self.sim.inject():
                    self._send(503, {"error": "injected failure"})
                else:
                    self._send(200, route(self.sim, self._json(raw)))
            elif (method, path) == ("GET", "/control/state"):
                self._send(200, self.sim.state())
            elif (method, path) == ("GET", "/control/commands"):
                self._send(200, self.sim.command_log())
            elif (method, path) == ("POST", "/control/knobs"):
                try:
                    self._send(200, self.sim.set_knobs(self._json(raw)))
                except ValueError as exc:
                    raise BadRequest(str(exc))
            elif (method, path) == ("POST", "/control/reset"):
                self.sim.reset()
                self._send(200, self.sim.state())
            else:
                self._send(*NOT_FOUND)
        except BadRequest as exc:
            self._send(400, {"error": str(exc)})

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")


def _v1_devices(sim: FleetSimulator, body: dict[str, Any]) -> dict[str, Any]:
    return sim.list_devices()


def _v1_telemetry(sim: FleetSimulator, body: dict[str, Any]) -> dict[str, Any]:
    return sim.telemetry(_identifiers(body, required=False))


def _v1_command(kind: str) -> Callable[[FleetSimulator, dict[str, Any]], dict[str, Any]]:
    def run(sim: FleetSimulator, body: dict[str, Any]) -> dict[str, Any]:
        command_id = body.get("command_id")
        if not isinstance(command_id, str) or not command_id:
            raise BadRequest("command_id must be a non-empty string")
        identifiers = _identifiers(body, required=True)
        assert identifiers is not None
        return sim.command(kind, command_id, identifiers)

    return run


V1_ROUTES: dict[tuple[str, str], Callable[[FleetSimulator, dict[str, Any]], dict[str, Any]]] = {
    ("GET", "/v1/devices"): _v1_devices,
    ("POST", "/v1/telemetry"): _v1_telemetry,
    ("POST", "/v1/commands/curtail"): _v1_command("curtail"),
    ("POST", "/v1/commands/uncurtail"): _v1_command("uncurtail"),
}


class FleetHTTPServer(ThreadingHTTPServer):
    """One simulator behind a threaded HTTP server; `shutdown()` stops serving and closes the socket."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], simulator: FleetSimulator) -> None:
        self.simulator = simulator
        super().__init__(address, FleetRequestHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away mid-answer (a killed process, a timeout) is normal here: stay quiet.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)

    def shutdown(self) -> None:
        super().shutdown()
        self.server_close()


def make_server(host: str = "127.0.0.1", port: int = 0, **options: Any) -> FleetHTTPServer:
    """A server (not yet serving) for FleetSimulator(**options); the simulator is `server.simulator`."""
    return FleetHTTPServer((host, port), FleetSimulator(**options))


def serve_in_thread(
    host: str = "127.0.0.1", port: int = 0, **options: Any
) -> tuple[FleetHTTPServer, FleetSimulator, str]:
    """Serve on a free loopback port from a daemon thread: (server, simulator, base_url).

    Stop with server.shutdown().
    """
    server = make_server(host, port, **options)
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fleet-simulator", daemon=True
    ).start()
    bound_host, bound_port = server.server_address[:2]
    return server, server.simulator, f"http://{bound_host!s}:{bound_port}"
