"""Protocol migration metrics, declared once. Cursors, statuses and lag are computed from the database
at scrape time (`collect_states`), so every process agrees; counters and the window histogram are
written by the process doing the work (the backfill command or worker, and `indexer_run`)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from indexer import selectors as indexer_selectors
from migrations_app.models import Cursor, MigrationStatus, Protocol

# The seed's numbering (wallet_migration_status): 0 in_progress, 1 success, 2 failed; 3 not started.
STATUS_VALUES: dict[str, int] = {
    MigrationStatus.IN_PROGRESS: 0,
    MigrationStatus.SUCCESS: 1,
    MigrationStatus.FAILED: 2,
    MigrationStatus.NOT_STARTED: 3,
}

CAS_RESULTS = Counter(
    "fleetops_protocol_cas_results_total",
    "Cursor compare-and-swaps by writer (history, live, current_state, live_current_state) and result "
    "(swapped, lost, missing).",
    ["writer", "result"],
)
HANDOFFS = Counter(
    "fleetops_protocol_migration_handoffs_total",
    "Backfills that lost the cursor CAS to live ingestion (the handoff), by chain, protocol and migration.",
    ["chain", "protocol", "migration"],
)
HEIGHTS = Counter(
    "fleetops_protocol_migration_heights_total",
    "Heights committed by the backfills (history and current state).",
)
STATE_CHANGES = Counter(
    "fleetops_protocol_state_changes_written_total",
    "Protocol state-change rows written, by writer.",
    ["writer"],
)
WINDOW_SECONDS = Histogram(
    "fleetops_protocol_migration_window_seconds",
    "Time to read, classify and commit one backfill window.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
WINDOW_RETRIES = Counter(
    "fleetops_protocol_migration_window_retries_total",
    "Backfill windows thrown away and re-read because the indexer rolled those heights back meanwhile.",
)


def collect_states() -> Iterable[Metric]:
    protocols = list(Protocol.objects.select_related("chain"))
    cursors = dict(Cursor.objects.values_list("name", "height"))
    indexed = {chain_id: last for chain_id, (_, last) in indexer_selectors.indexed_ranges().items()}
    cursor = GaugeMetricFamily(
        "fleetops_protocol_migration_cursor",
        "Cursor height by chain, protocol and migration (history, current_state); absent until created.",
        labels=["chain", "protocol", "migration"],
    )
    status = GaugeMetricFamily(
        "fleetops_protocol_migration_status",
        "Migration status: 0 in_progress, 1 success, 2 failed, 3 not_started.",
        labels=["chain", "protocol", "migration"],
    )
    lag = GaugeMetricFamily(
        "fleetops_protocol_migration_lag_blocks",
        "Indexed height minus the cursor (0 once live ingestion writes the protocol).",
        labels=["chain", "protocol", "migration"],
    )
    for p in protocols:
        for migration, name, value in (
            ("history", p.history_cursor_name, p.history_migration_status),
            ("current_state", p.current_state_cursor_name, p.current_state_migration_status),
        ):
            labels = [p.chain.slug, p.protocol_id, migration]
            status.add_metric(labels, STATUS_VALUES.get(value, 3))
            if name in cursors:
                cursor.add_metric(labels, cursors[name])
                top = indexed.get(p.chain_id)
                if top is not None:
                    lag.add_metric(labels, max(0, top - cursors[name]))
    classification = GaugeMetricFamily(
        "fleetops_protocol_classification_status",
        "Classification status: 0 in_progress, 1 success, 2 failed, 3 not_started.",
        labels=["chain", "protocol"],
    )
    for p in protocols:
        classified = STATUS_VALUES.get(p.classification_status, 3)
        classification.add_metric([p.chain.slug, p.protocol_id], classified)
    yield cursor
    yield status
    yield lag
    yield classification
