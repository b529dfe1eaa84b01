"""The stake transaction the re-stake schedule broadcasts, and the chain RPC client per URL.

The tx bytes are a deterministic function of (key, round, attempt, timeout height): the hash is
known before the broadcast and committed first, so a broadcast whose outcome was lost (timeout,
crash) is still found on chain by verification.
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

from django.conf import settings

from indexer.rpc.client import CometRpc, SourceConfig

_clients: dict[str, CometRpc] = {}
_lock = threading.Lock()


def stake_payload(
    *,
    key_id: int,
    address: str,
    owner_address: str,
    services: list[Any],
    operator_shares: list[Any],
    round: int,
    attempt: int,
    timeout_height: int,
) -> dict[str, Any]:
    return {
        "type": "stake_supplier",
        "reason": "1006",
        "operator_address": address,
        "owner_address": owner_address,
        "services": services,
        "operator_shares": operator_shares,
        "key_id": key_id,
        "round": round,
        "attempt": attempt,
        "timeout_height": timeout_height,
    }


def tx_bytes(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def tx_hash(raw: bytes) -> str:
    """CometBFT's tx hash: SHA-256 of the raw bytes, uppercase hex."""
    return hashlib.sha256(raw).hexdigest().upper()


def rpc_for(url: str) -> CometRpc:
    """One client per chain URL per process (its source health and backoff persist across passes).

    Two attempts per call, short backoff: a pass that meets an outage records `unavailable` and
    moves on; the verification backoff, not the client, spaces the retries out.
    """
    with _lock:
        client = _clients.get(url)
        if client is None:
            client = CometRpc(
                [SourceConfig(name="keys", url=url)],
                timeout=float(settings.FLEETOPS_KEYS_RPC_TIMEOUT_SECONDS),
                attempts=2,
                retry_base=0.1,
                retry_cap=0.5,
            )
            _clients[url] = client
        return client


def rpc_reset() -> None:
    """Close every cached client (tests, and a forked worker that must not share sockets)."""
    with _lock:
        for client in _clients.values():
            client.close()
        _clients.clear()
