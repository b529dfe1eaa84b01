"""What the RPC client (`indexer.rpc.client.CometRpc`) raises. The client re-exports every name, so
callers import them from there."""

from __future__ import annotations

from collections.abc import Sequence


class RpcError(Exception):
    pass


class RpcUnavailable(RpcError):
    """Transport error, timeout or 5xx: nothing is known about the request's effect."""


class RpcRateLimited(RpcUnavailable):
    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class TxNotFound(RpcError):
    """`/tx`: the source has no committed transaction with this hash."""


class TxAlreadyKnown(RpcError):
    """`broadcast_tx_sync`: the node already holds these exact bytes (its mempool cache)."""


class HeightUnavailable(RpcError):
    """No source can serve the height (pruned below, or above its head). `sources` names the sources
    that answered without it; `lowest` is the lowest height one of them said it still has."""

    def __init__(self, message: str, *, sources: Sequence[str] = (), lowest: int | None = None):
        super().__init__(message)
        self.sources = tuple(sources)
        self.lowest = lowest
