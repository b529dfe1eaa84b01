"""Helpers shared by the key lifecycle tests (imported explicitly; the protocols tests share the
directory's conftest)."""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from fleetops.access.models import Organization
from fleetops.lib import clock
from migrations_app.keys.chain import rpc_reset
from migrations_app.models.keys import AddressGroup, Key, KeyState, OrgKeyConfig
from simulators.chain.server import serve_in_thread


def make_group(org: Organization, name: str = "us-east", services: list[str] | None = None) -> AddressGroup:
    return AddressGroup.objects.create(org=org, name=name, services=services or ["anvil", "eth"])


def make_keys(
    org: Organization, n: int, *, group: AddressGroup | None = None, start: int = 0, **fields: Any
) -> list[Key]:
    keys = []
    for i in range(start, start + n):
        address = "pokt1" + hashlib.sha256(f"{org.slug}-{i}".encode()).hexdigest()[:38]
        keys.append(
            Key(
                org=org,
                address=address,
                public_key="02" + hashlib.sha256(address.encode()).hexdigest(),
                owner_address=f"pokt1owner{i % 3}",
                address_group=group,
                **{"state": KeyState.STAKED, **fields},
            )
        )
    return Key.objects.bulk_create(keys)


class Chain:
    """The chain simulator on loopback, produced block by block by the test."""

    def __init__(self) -> None:
        self.server, self.sim, self.url = serve_in_thread(seed=3, txs_per_block=1)

    def produce(self, n: int = 1) -> None:
        self.sim.produce(n)

    def knobs(self, **values: Any) -> None:
        response = httpx.post(f"{self.url}/control/knobs", json=values, timeout=5)
        response.raise_for_status()

    @property
    def head(self) -> int:
        return int(self.sim.head)

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def chain():
    rpc_reset()
    running = Chain()
    yield running
    running.close()
    rpc_reset()


@pytest.fixture
def wired(org, chain):
    OrgKeyConfig.objects.create(org=org, rpc_url=chain.url)
    return chain


def later(seconds: float) -> Any:
    return clock.frozen(clock.now() + timedelta(seconds=seconds))


class Receiver:
    """A local HTTP receiver for webhook deliveries (answers `status`)."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append(
                    {"headers": dict(self.headers), "body": body, "json": json.loads(body)}
                )
                self.send_response(receiver.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        host, port = self.server.server_address[:2]
        self.url = f"http://{host!s}:{port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    running = Receiver()
    yield running
    running.close()
