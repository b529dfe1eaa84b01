"""Indexer metrics, declared once. (The scrape-time gauges computed from PostgreSQL are in
`indexer.collectors`, which reads the selectors; this module imports nothing of the indexer, so
every module can count.)"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
ROWS = Counter("fleetops_indexer_rows_total", "Rows written by block commits, by table.", ["chain", "table"])
STEP_FAILURES = Counter(
    "fleetops_indexer_step_failures_total",
    "Ingest steps that failed, by chain and error class.",
    ["chain", "error"],
)
ROLLED_BACK = Counter("fleetops_indexer_rolled_back_blocks_total", "Blocks removed by rollbacks.", ["chain"])

MODE_CHANGES = Counter(
    "fleetops_indexer_mode_changes_total",
    "Indexer mode changes by chain, from and to mode. Changes into or out of degraded and halted also "
    "write an audit row; the quiet ones (catching_up, normal, idle) are only counted here.",
    ["chain", "from_mode", "to_mode"],
)
SOURCE_TRANSITIONS = Counter(
    "fleetops_indexer_source_transitions_total",
    "Sync-source connection status changes, by chain, source, target status and result (changed, race_lost).",
    ["chain", "source", "to", "result"],
)
SOURCE_CONNECTION_ATTEMPTS = Counter(
    "fleetops_indexer_source_connection_attempts_total",
    "Connection attempts to sync sources that were not connected, by chain, source and result "
    "(success: it answered; failure: it did not; refused: DNS, TLS or protocol error, kept off until "
    "an operator re-enables it).",
    ["chain", "source", "result"],
)
WS_CONNECTIONS = Counter(
    "fleetops_indexer_ws_connections_total",
    "Head-watcher WebSocket connects by source and result (subscribed, failed, dropped).",
    ["source", "result"],
)
WS_MESSAGES = Counter(
    "fleetops_indexer_ws_messages_total",
    "Head-watcher WebSocket messages by source and result (head, ignored, malformed).",
    ["source", "result"],
)

ENRICHMENT = Counter(
    "fleetops_indexer_enrichment_total",
    "Enrichment rows handled by workers, by chain and outcome (ok, retrying, failed, undecodable, "
    "released while the breaker was open, race_lost).",
    ["chain", "outcome"],
)
ENRICHMENT_ROUND = Histogram(
    "fleetops_indexer_enrichment_round_seconds",
    "Time of one enrichment round (claim, decode, verdicts), by chain.",
    ["chain"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
DECODE_CONCURRENCY = Gauge(
    "fleetops_indexer_decode_concurrency",
    "Decode requests an enrichment round keeps in flight at most (the chain's decode_concurrency "
    "as the latest round in this process read it), by chain.",
    ["chain"],
)
ENRICHMENT_ROUND_FAILURES = Counter(
    "fleetops_indexer_enrichment_round_failures_total",
    "Enrichment rounds that raised (database errors and the like), by chain.",
    ["chain"],
)
DECODER_REQUESTS = Counter(
    "fleetops_indexer_decoder_requests_total",
    "Decoder calls by decoder and result (ok, undecodable, unreachable, http_<status>, malformed, "
    "breaker_open: refused without HTTP).",
    ["decoder", "result"],
)
DECODER_LATENCY = Histogram(
    "fleetops_indexer_decoder_latency_seconds",
    "Decoder HTTP request latency, by decoder.",
    ["decoder"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DECODER_BREAKER = Counter(
    "fleetops_indexer_decoder_breaker_transitions_total",
    "Decoder circuit breaker transitions (opened, closed), by decoder.",
    ["decoder", "transition"],
)
