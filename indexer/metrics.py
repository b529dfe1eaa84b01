"""Indexer metrics, declared once."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RPC_REQUESTS = Counter(
    "fleetops_indexer_rpc_requests_total",
    "CometBFT RPC requests by source, method and result (ok, unavailable, rate_limited, "
    "height_unavailable, malformed).",
    ["source", "method", "result"],
)
RPC_LATENCY = Histogram(
    "fleetops_indexer_rpc_latency_seconds",
    "CometBFT RPC request latency by source and method.",
    ["source", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

BLOCKS = Counter("fleetops_indexer_blocks_total", "Blocks committed, by chain.", ["chain"])
BLOCK_COMMIT = Histogram(
    "fleetops_indexer_block_commit_seconds",
    "Time to commit one batch of blocks (one transaction), by chain.",
    ["chain"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
REORGS = Counter(
    "fleetops_indexer_reorgs_total", "Reorgs detected, by chain and outcome.", ["chain", "outcome"]
)
ROLLED_BACK = Counter("fleetops_indexer_rolled_back_blocks_total", "Blocks removed by rollbacks.", ["chain"])
