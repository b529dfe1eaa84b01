"""A fleet gateway for N seeded mining devices, over HTTP (standard library only).

API (JSON): GET /v1/devices; POST /v1/telemetry {"identifiers"}; POST /v1/commands/curtail|uncurtail
{"command_id", "identifiers"} -> {"command_id", "batch_id", "dispatched", "skipped"}; a repeated command
id answers its first response and changes nothing. Control: GET /control/state, POST /control/knobs
(latency_ms, error_rate, no_effect_fraction, offline_fraction, maintenance_fraction, stale_fraction,
power_delay_s), POST /control/reset, GET /control/commands.

Power ramps linearly between full and idle over `power_delay_s` after a command; hash rate stops at
once on curtail and returns when the ramp-up completes.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

IDLE_W = 20.0
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
FRACTION_KNOBS = ("no_effect_fraction", "offline_fraction", "maintenance_fraction", "stale_fraction")


@dataclass
class SimDevice:
    identifier: str
    name: str
    model: str
    site: str
    driver: str
    pairing_status: str
    status: str
    rated_power_w: float
    efficiency_j_th: float
    jitter: float
    mining: bool = True
    ramp_from_w: float = 0.0
    ramp_started: float = 0.0


@dataclass
class Knobs:
    latency_ms: float = 0.0
    error_rate: float = 0.0
    no_effect_fraction: float = 0.0
    offline_fraction: float = 0.0
    maintenance_fraction: float = 0.0
    stale_fraction: float = 0.0
    power_delay_s: float = 5.0


@dataclass
class FleetSimulator:
    devices_count: int = 300
    seed: int = 1
    power_delay_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    knobs: Knobs = field(default_factory=Knobs)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        rng = random.Random(self.seed)
        with self.lock:
            self.knobs = Knobs(power_delay_s=self.power_delay_s)
            self.devices: dict[str, SimDevice] = {}
            for i in range(1, self.devices_count + 1):
                identifier = f"m-{i:05d}"
                rated = rng.uniform(1800, 3600)
                self.devices[identifier] = SimDevice(
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
                    ramp_from_w=rated,
                )
            # One seeded order decides which devices a fraction knob picks: reproducible at run time.
            self.order = list(self.devices)
            random.Random(self.seed + 1).shuffle(self.order)
            self.responses: dict[str, dict[str, Any]] = {}
            self.log: deque[dict[str, Any]] = deque(maxlen=10_000)
            self.counters = {"curtail": 0, "uncurtail": 0, "deduplicated": 0}

    # --- behaviour ---------------------------------------------------------------------------------

    def _picked(self, knob: str) -> set[str]:
        fraction = getattr(self.knobs, knob)
        offset = FRACTION_KNOBS.index(knob) * len(self.order) // len(FRACTION_KNOBS)
        count = round(fraction * len(self.order))
        rotated = self.order[offset:] + self.order[:offset]
        return set(rotated[:count])

    def status_of(self, d: SimDevice) -> str:
        if d.identifier in self._picked("offline_fraction"):
            return "offline"
        if d.identifier in self._picked("maintenance_fraction"):
            return "maintenance"
        return d.status

    def power_of(self, d: SimDevice, now: float) -> tuple[float, float]:
        full = d.rated_power_w * (1 + d.jitter)
        goal = full if d.mining else IDLE_W
        delay = self.knobs.power_delay_s
        progress = 1.0 if delay <= 0 else min(1.0, max(0.0, (now - d.ramp_started) / delay))
        power = d.ramp_from_w + (goal - d.ramp_from_w) * progress
        hashing = d.mining and progress >= 1.0
        return power, (full / d.efficiency_j_th * 1e12 if hashing else 0.0)

    def list_devices(self) -> dict[str, Any]:
        with self.lock:
            return {
                "devices": [
                    {
                        "identifier": d.identifier,
                        "name": d.name,
                        "model": d.model,
                        "site": d.site,
                        "driver": d.driver,
                        "pairing_status": d.pairing_status,
                        "status": self.status_of(d),
                        "rated_power_w": int(d.rated_power_w),
                    }
                    for d in self.devices.values()
                ]
            }

    def telemetry(self, identifiers: list[str] | None) -> dict[str, Any]:
        now, wall = self.clock(), datetime.now(UTC)
        with self.lock:
            offline, stale = self._picked("offline_fraction"), self._picked("stale_fraction")
            wanted = self.devices.keys() if identifiers is None else identifiers
            samples = []
            for identifier in wanted:
                d = self.devices.get(identifier)
                if d is None or identifier in offline:
                    continue
                power, hashrate = self.power_of(d, now)
                taken = wall - timedelta(minutes=30) if identifier in stale else wall
                samples.append(
                    {
                        "identifier": identifier,
                        "power_w": round(power, 1),
                        "hash_rate_hs": hashrate,
                        "efficiency_j_th": round(d.efficiency_j_th, 2),
                        "taken_at": taken.isoformat(),
                    }
                )
            return {"samples": samples}

    def command(self, kind: str, command_id: str, identifiers: list[str]) -> dict[str, Any]:
        now = self.clock()
        with self.lock:
            if command_id in self.responses:
                self.counters["deduplicated"] += 1
                self.log.append(
                    {
                        "command_id": command_id,
                        "kind": kind,
                        "identifiers_count": len(identifiers),
                        "dispatched_count": len(self.responses[command_id]["dispatched"]),
                        "deduplicated": True,
                    }
                )
                return self.responses[command_id]
            offline, no_effect = self._picked("offline_fraction"), self._picked("no_effect_fraction")
            dispatched, skipped = [], []
            for identifier in identifiers:
                d = self.devices.get(identifier)
                if d is None:
                    skipped.append({"identifier": identifier, "reason": "unknown_device"})
                elif identifier in offline:
                    skipped.append({"identifier": identifier, "reason": "offline"})
                elif d.pairing_status != "PAIRED":
                    skipped.append({"identifier": identifier, "reason": "unpaired"})
                else:
                    dispatched.append(identifier)
                    want_mining = kind == "uncurtail"
                    if identifier not in no_effect and d.mining != want_mining:
                        d.ramp_from_w = self.power_of(d, now)[0]
                        d.ramp_started = now
                        d.mining = want_mining
            response = {
                "command_id": command_id,
                "batch_id": uuid.uuid4().hex if dispatched else "",
                "dispatched": dispatched,
                "skipped": skipped,
            }
            self.responses[command_id] = response
            self.counters[kind] += 1
            self.log.append(
                {
                    "command_id": command_id,
                    "kind": kind,
                    "identifiers_count": len(identifiers),
                    "dispatched_count": len(dispatched),
                    "deduplicated": False,
                }
            )
            return response

    def set_knobs(self, values: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            updated = {}
            for key, value in values.items():
                if not hasattr(self.knobs, key):
                    raise ValueError(f"unknown knob {key}")
                if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"{key} must be a non-negative number")
                if (key == "error_rate" or key in FRACTION_KNOBS) and value > 1:
                    raise ValueError(f"{key} must be between 0 and 1")
                updated[key] = float(value)
            for key, value in updated.items():
                setattr(self.knobs, key, value)
            return dict(self.knobs.__dict__)

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {
                "knobs": dict(self.knobs.__dict__),
                "commands": dict(self.counters),
                "device_count": len(self.devices),
            }


def make_handler(sim: FleetSimulator, rng: random.Random) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: benchmarks send thousands
            return

        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            return json.loads(raw or b"{}")

        def _injected(self) -> bool:
            if sim.knobs.latency_ms > 0:
                time.sleep(sim.knobs.latency_ms / 1000)
            if sim.knobs.error_rate > 0 and rng.random() < sim.knobs.error_rate:
                self._send(503, {"error": "injected failure"})
                return True
            return False

        def do_GET(self) -> None:
            if self.path == "/v1/devices":
                if not self._injected():
                    self._send(200, sim.list_devices())
            elif self.path == "/control/state":
                self._send(200, sim.state())
            elif self.path == "/control/commands":
                self._send(200, {"log": list(sim.log)})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            try:
                body = self._body()
            except ValueError:
                self._send(400, {"error": "invalid JSON"})
                return
            if self.path == "/v1/telemetry":
                if not self._injected():
                    self._send(200, sim.telemetry(body.get("identifiers")))
            elif self.path in ("/v1/commands/curtail", "/v1/commands/uncurtail"):
                if not isinstance(body.get("command_id"), str) or not isinstance(
                    body.get("identifiers"), list
                ):
                    self._send(400, {"error": "command_id and identifiers are required"})
                elif not self._injected():
                    kind = self.path.rsplit("/", 1)[1]
                    self._send(
                        200, sim.command(kind, body["command_id"], [str(i) for i in body["identifiers"]])
                    )
            elif self.path == "/control/knobs":
                try:
                    self._send(200, sim.set_knobs(body))
                except ValueError as exc:
                    self._send(400, {"error": str(exc)})
            elif self.path == "/control/reset":
                sim.reset()
                self._send(200, sim.state())
            else:
                self._send(404, {"error": "not found"})

    return Handler


def make_server(
    host: str = "127.0.0.1", port: int = 0, **options: Any
) -> tuple[ThreadingHTTPServer, FleetSimulator]:
    sim = FleetSimulator(**options)
    server = ThreadingHTTPServer((host, port), make_handler(sim, random.Random(sim.seed + 2)))
    server.daemon_threads = True
    return server, sim


def serve_in_thread(**options: Any) -> tuple[ThreadingHTTPServer, FleetSimulator, str]:
    """Start on a free loopback port; stop with server.shutdown()."""
    server, sim = make_server(**options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    return server, sim, f"http://127.0.0.1:{port}"
